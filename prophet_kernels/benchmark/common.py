"""Shared benchmark plumbing (``prophet bench`` and the scripts in the repository's ``bench/``): result
rows with provenance, roofline measurements, MoE inputs."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from prophet_kernels.provenance import git_commit, utc_now

RESULTS_DIR = Path("bench") / "results"  # under the current directory: the repository's, run from its root

# Published expert shapes (HF configs: allenai/OLMoE-1B-7B-0924, mistralai/Mixtral-8x7B-v0.1).
MOE_SHAPES = {
    "olmoe": dict(E=64, k=8, H=2048, I=1024),
    "mixtral": dict(E=8, k=2, H=4096, I=14336),
}
BATCH_SIZES = (1, 4, 16, 64, 256, 1024, 4096)


def provenance(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": utc_now(),
    }


def write_rows(name: str, rows: list[dict], out_dir: str | None = None) -> Path:
    """Append rows as JSON lines to ``<out_dir or bench/results>/<name>.jsonl``."""
    d = Path(out_dir) if out_dir else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def measure_h2d_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Pinned host-to-device copy of ``nbytes``: bytes / time, best of 5, in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    del src, dst
    return nbytes / best


def measure_hbm_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, in bytes/s."""
    import triton.testing

    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def measure_matmul_peak(device, dtype=torch.bfloat16) -> float:
    """8192^3 matmul through torch (cuBLAS), in FLOP/s."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def weight_format_from_flags(experts: str, block: int | None, group: int, zero_points: bool):
    """The experts' ``WeightFormat`` the kernel benchmarks' flags ask for (``prophet bench``,
    ``bench/tune_moe.py``): ``--experts fp8`` (``--block B``: B x B scale blocks, else per output
    channel), ``int4`` (``--group G`` inputs per scale, ``--zero-points``), anything else the
    activations' dtype. ValueError for ``--block`` without fp8. (Imported here, not at the top: the
    kernels must be imported after ``TRITON_INTERPRET`` is set.)"""
    from prophet_kernels.kernels.fp8 import check_block_shape
    from prophet_kernels.kernels.int4 import check_group_size
    from prophet_kernels.kernels.weight_format import WeightFormat

    if block is not None and experts != "fp8":
        raise ValueError("--block goes with --experts fp8")
    if experts == "fp8":
        return WeightFormat("fp8", block_shape=check_block_shape((block, block)) if block else None)
    if experts == "int4":
        return WeightFormat("int4", group_size=check_group_size(group), zero_points=zero_points)
    return WeightFormat()


def random_routing(T: int, E: int, k: int, device, generator=None):
    """k distinct experts per token, uniform; softmax-like positive weights summing to 1."""
    scores = torch.rand(T, E, device=device, generator=generator)
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(T, k, device=device, generator=generator) + 0.1
    return ids, (w / w.sum(1, keepdim=True)).float()


def make_experts(E: int, H: int, I: int, dtype, device, seed: int = 0):
    """Random expert weights with unit-variance outputs: w13 [E, 2I, H], w2 [E, H, I]."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) * I**-0.5
    return w13, w2


def paged_copy(w13, w2, num_slots: int | None = None, seed: int = 0, *more):
    """Place every expert in a random slot of a fresh buffer: (w13_slots, w2_slots, page_table), and
    ``more`` per-expert tensors (e.g. fp8 scales) placed the same way after them."""
    E = w13.shape[0]
    S = num_slots or E
    g = torch.Generator().manual_seed(seed)
    slot_of = torch.randperm(S, generator=g)[:E]
    idx = slot_of.to(w13.device)
    placed = []
    for t in (w13, w2, *more):
        slots = torch.empty((S,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        slots[idx] = t
        placed.append(slots)
    return placed[0], placed[1], slot_of.to(torch.int32).to(w13.device), *placed[2:]
