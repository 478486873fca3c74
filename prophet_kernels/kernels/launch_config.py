"""Launch configurations for the grouped GEMMs, kept as data.

``configs/<device>.json`` (device = ``torch.cuda.get_device_name()`` with spaces as ``_``) maps a
shape key ``"E=64,H=2048,I=1024,k=8,dtype=bfloat16"`` to ``{"<T>": config}``; a config is::

    {"block_m": 16,
     "gate_up": {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
     "down":    {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}}

``"gemv": true`` selects the two-launch decode path of :mod:`gemv` (tiles then mean its tiles).
``"a8": true`` (fp8 experts, grouped path, sm_89+) runs W8A8: activations quantized to e4m3 per
token, fp8 x fp8 dots (``moe.uses_a8``); the tuner writes it only where it timed faster.
fp8 experts have keys of their own, ``...,dtype=bfloat16,weights=float8_e4m3fn`` (per output
channel) and ``...,weights=float8_e4m3fn,block=128x128`` (block scales): tuned with
``bench/tune_moe.py --experts fp8 [--block 128]``; where a device's file has none, the key of the
same activations with unquantized weights is used (the tiles move half the weight bytes then).

Lookup: the device's table (or, where it has none, a sibling GPU's: ``SIBLING_TABLES``, the H200
uses the H100's), the tuned T nearest to the batch (in log scale) for the exact shape key;
otherwise a default chosen by batch size, logged once. ``PROPHET_MOE_CONFIG`` (a JSON string or a path to a
JSON file holding one config) pins a config for every call. ``bench/tune_moe.py`` writes the files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("prophet_kernels")

CONFIG_DIR = Path(__file__).parent / "configs"
_warned: set = set()


def shape_key(E: int, H: int, I: int, k: int, dtype: torch.dtype, fmt=None) -> str:
    """The table key of a shape: activations' dtype, and the weights' format where the weights are
    quantized (``weight_format.WeightFormat.config_key``: fp8 with its scale blocks, int4 with its group)."""
    key = f"E={E},H={H},I={I},k={k},dtype={str(dtype).replace('torch.', '')}"
    return key + (fmt.config_key() if fmt is not None else "")


def device_file_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu.json"
    return torch.cuda.get_device_name(device).replace(" ", "_") + ".json"


# A GPU without a table of its own uses the table of a GPU with the same SMs (count and shared
# memory), whose tiles were timed there; ``bench/tune_moe.py`` on the GPU writes its own. The H200
# SXM is the H100 SXM's chip (132 SMs, sm_90) with 1.4x the memory bandwidth.
SIBLING_TABLES = {"NVIDIA_H200.json": "NVIDIA_H100_80GB_HBM3.json"}


def table_path(device: torch.device) -> Path:
    """The launch-config table ``get_config`` reads for ``device``: its own, else its sibling's
    (``SIBLING_TABLES``; logged once), else its own name (absent: the defaults)."""
    own = CONFIG_DIR / device_file_name(device)
    sibling = SIBLING_TABLES.get(own.name)
    if own.exists() or sibling is None or not (CONFIG_DIR / sibling).exists():
        return own
    if own.name not in _warned:
        _warned.add(own.name)
        log.warning("prophet_kernels: no tuned launch configs for this GPU (%s); using %s's, a GPU with the "
                    "same SMs (run bench/tune_moe.py to tune its own)", own.name, sibling)
    return CONFIG_DIR / sibling


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    with open(p) as f:
        return json.load(f)


_SMEM_BUDGET = 160 * 1024  # bytes of shared memory a default config may ask for (H100: 227 KiB)


def fitted_default(T: int, k: int, E: int, dtype: torch.dtype, shared_limit: int) -> dict:
    """The untuned GPU default for a batch of T tokens on a GPU whose blocks may have
    ``shared_limit`` bytes of shared memory: fitted to ``_SMEM_BUDGET``, or to that limit where it
    is less (compute capability 8.6/8.9: A10, L4, L40S, RTX 30xx/40xx, 99 KiB; found by
    ``compile_check --arch 89``: a 120 KiB default would not launch there). ``compile_check``
    compiles exactly these for each target."""
    return _fit_smem(_gpu_default(T, k, E), dtype.itemsize, min(_SMEM_BUDGET, shared_limit))


def _fit_smem(cfg: dict, elem_bytes: int, budget: int = _SMEM_BUDGET) -> dict:
    """Shrink num_stages, then BK, until the pipelined tiles of the gate_up kernel (one x tile and
    two weight tiles per stage: the larger of the two kernels; what Triton allocates, compiled)
    fit ``budget`` bytes of shared memory."""
    bm = cfg["block_m"]
    for part in ("gate_up", "down"):
        t = cfg[part]
        while True:
            stage = (bm * t["BK"] + 2 * t["BK"] * t["BN"]) * elem_bytes
            if stage * t["num_stages"] <= budget:
                break
            if t["num_stages"] > 2:
                t["num_stages"] -= 1
            elif t["BK"] > 32:
                t["BK"] //= 2
            else:
                break
    return cfg


def default_config(T: int, k: int, E: int, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Untuned defaults: small tiles for the interpreter (few programs), GEMV-like tiles at decode,
    fitted to shared memory for the dtype."""
    if device.type != "cuda":
        return {"block_m": 16, "gate_up": {"BN": 64, "BK": 64}, "down": {"BN": 64, "BK": 64}}
    props = torch.cuda.get_device_properties(device)
    return fitted_default(T, k, E, dtype, getattr(props, "shared_memory_per_block_optin", _SMEM_BUDGET))


def _gpu_default(T: int, k: int, E: int) -> dict:
    rows_per_expert = T * k / E
    if 2 * T * k <= E:  # decode, experts mostly distinct: the two-launch GEMV path
        tile = {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 3}
        return {"gemv": True, "block_m": 16, "gate_up": dict(tile), "down": dict(tile)}
    if rows_per_expert <= 16:
        tile = {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4}
        return {"block_m": 16, "gate_up": dict(tile), "down": dict(tile)}
    if rows_per_expert <= 64:
        tile = {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4}
        return {"block_m": 32, "gate_up": dict(tile), "down": dict(tile)}
    tile = {"BN": 128, "BK": 64, "num_warps": 8, "num_stages": 4}
    return {"block_m": 128 if rows_per_expert >= 256 else 64, "gate_up": dict(tile), "down": dict(tile)}


def _validate(cfg: dict, where: str) -> dict:
    try:
        bm = int(cfg["block_m"])
        for part in ("gate_up", "down"):
            for f in ("BN", "BK"):
                v = int(cfg[part][f])
                low = 8 if cfg.get("gemv") else 16  # tl.dot needs 16; the GEMV path does not
                if v < low or v & (v - 1):
                    raise ValueError(f"{part}.{f}={v} is not a power of two >= {low}")
    except (KeyError, TypeError) as e:
        raise ValueError(f"launch config from {where} is malformed ({e!r}): {cfg}") from None
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"launch config from {where}: block_m={bm} is not a power of two >= 16")
    if not isinstance(cfg.get("a8", False), bool):
        raise ValueError(f"launch config from {where}: a8 (W8A8 on fp8 experts) must be true or false, "
                         f"got {cfg['a8']!r}")
    return cfg


def get_config(T: int, E: int, H: int, I: int, k: int, dtype: torch.dtype,
               device: torch.device, table_file: str | None = None, fmt=None) -> dict:
    """The launch config for a batch of T tokens: ``PROPHET_MOE_CONFIG`` if set, else the device's
    table (``fmt``, a ``WeightFormat``: quantized experts' own key first, then the activations'),
    else the defaults."""
    pinned = os.environ.get("PROPHET_MOE_CONFIG")
    if pinned:
        text = Path(pinned).read_text() if os.path.exists(pinned) else pinned
        return _validate(json.loads(text), "PROPHET_MOE_CONFIG")
    fname = table_file or str(table_path(device))
    table = _load(fname)
    key = shape_key(E, H, I, k, dtype)
    keys = [shape_key(E, H, I, k, dtype, fmt), key]
    found = next((kk for kk in keys if table.get(kk)), None)
    if found is not None:
        if found != keys[0] and device.type == "cuda" and (fname, keys[0]) not in _warned:
            _warned.add((fname, keys[0]))
            log.warning("prophet_kernels: no tuned launch config for %s in %s; using %s's (run "
                        "bench/tune_moe.py --experts fp8/int4 to tune)", keys[0], fname, found)
        by_t = table[found]
        best = min(by_t, key=lambda t: abs(math.log2(max(int(t), 1)) - math.log2(max(T, 1))))
        return _validate(by_t[best], f"{fname}[{found}][{best}]")
    if device.type == "cuda" and (fname, key) not in _warned:
        _warned.add((fname, key))
        log.warning("prophet_kernels: no tuned launch config for %s in %s; using defaults "
                    "(run bench/tune_moe.py to tune)", key, fname)
    return default_config(T, k, E, device, dtype)
