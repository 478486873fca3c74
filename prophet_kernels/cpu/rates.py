"""The rates a ``MissCost`` splits misses by, measured once per machine, model shape and thread count.

    cpu_gbps    the CPU backend over one expert at batch 1 (weight bytes per second)
    cpu_gflops  the CPU backend over one expert at batch 64
    link_gbps   one expert copied from the host store into a device slot (pinned host-to-device on a GPU)
    dram_gbps   the pool's threads reading one layer of the store once (the machine's read rate)
    call_us     a call with no expert: the wrapper's checks and the pool's start and join

Measured at start-up, before any expert is resident, and kept in the cache folder (``native.cache_dir``)
under a name that hashes the CPU, the thread count, the backend, the expert shape and dtype and the
device: the ranks of one engine on one node read the numbers the first of them measured (a file
lock orders them), so they split misses alike, and a restart measures nothing. Given rates (settings
``cpu_gbps``, ``cpu_gflops``, ``pcie_gbps``) replace the measured ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import torch

from . import native

BATCH_FOR_FLOPS = 64


@dataclasses.dataclass(frozen=True)
class Rates:
    cpu_gbps: float
    cpu_gflops: float
    link_gbps: float
    dram_gbps: float
    call_us: float = 0.0
    source: str = "measured"


def _key(cpu, device: torch.device) -> str:
    s = cpu.store  # (the library's build key too: a rebuilt kernel is measured again)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = [native.SOURCE.read_text(), native._cpu_flags(), str(cpu.threads), cpu.backend, str(s.hidden), str(s.intermediate), str(s.dtype), str(s.fmt), dev]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _best(f, n: int = 3) -> float:
    f()  # first touch, page faults
    return min(f() for _ in range(n))


def measure(cpu, slot: torch.Tensor | None, cache: bool = True) -> Rates:
    """The rates of ``cpu`` (a ``CpuExperts``) and of copies into ``slot`` (one device slot's block,
    the store's one-block layout; None: copies are not measured, link = the read rate). Layer 0,
    expert 0 of the store is read; ``slot`` is overwritten (call before anything is resident)."""
    device = slot.device if slot is not None else torch.device("cpu")
    path = native.cache_dir() / f"rates-{_key(cpu, device)}.json"
    if cache:
        with _locked(path):
            if path.exists():
                return Rates(**{**json.loads(path.read_text()), "source": f"measured earlier ({path})"})
            rates = _measure(cpu, slot)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(rates)))
            os.replace(tmp, path)
            return rates
    return _measure(cpu, slot)


def _measure(cpu, slot) -> Rates:
    s = cpu.store
    H, I = s.hidden, s.intermediate
    g = torch.Generator().manual_seed(0)

    def experts_at(batch: int):
        x = torch.randn(batch, H, generator=g).to(cpu.act_dtype)  # (int4: bf16 activations)
        offsets, rows, w = np.array([0, batch], np.int64), np.arange(batch, dtype=np.int32), np.ones(batch, np.float32)
        return lambda: (cpu.submit(0, x, [0], offsets, rows, w), cpu.join())[1][1]

    cpu_gbps = s.expert_bytes / _best(experts_at(1)) / 1e9
    cpu_gflops = BATCH_FOR_FLOPS * 6 * H * I / _best(experts_at(BATCH_FOR_FLOPS), 2) / 1e9
    block = s.blocks[0] if s.blocks[0] is not None else s.w13[0]
    dram_gbps = block.numel() * block.element_size() / _best(lambda: cpu.read_seconds(block)) / 1e9 \
        if cpu.backend == "native" else cpu_gbps
    link_gbps = dram_gbps
    if slot is not None and s.blocks[0] is not None:
        src = s.blocks[0][0]
        if slot.is_cuda:
            def copy():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                slot.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3
        else:
            def copy():
                t = time.perf_counter()
                slot.copy_(src)
                return time.perf_counter() - t
        link_gbps = s.expert_bytes / _best(copy) / 1e9
    x, none = torch.zeros(1, H, dtype=cpu.act_dtype), np.zeros(1, np.int64)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))

    def call():
        t = time.perf_counter()
        cpu.submit(0, x, [], none, *empty)
        cpu.join()
        return time.perf_counter() - t
    call_us = sorted(call() for _ in range(51))[25] * 1e6  # the median: the cost a call pays
    return Rates(cpu_gbps, cpu_gflops, link_gbps, dram_gbps, call_us)
