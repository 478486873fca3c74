"""Tune the grouped-GEMM launch configs on the GPU and write them as data.

For each shape and batch size T, and each candidate ``block_m``: the route plan is built once,
then every gate_up and every down candidate tile is timed alone with ``triton.testing.do_bench``
(median; it flushes L2 before each run, so weights come from HBM). The best (block_m, gate_up,
down) by summed time is written to ``prophet_kernels/kernels/configs/<device>.json``
(or ``--out``), merged with what the file already holds.

    python bench/tune_moe.py                       # OLMoE + Mixtral shapes, all bench T, bf16
    python bench/tune_moe.py --shapes olmoe --T 1 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.testing

from bench.common import BATCH_SIZES, MOE_SHAPES, make_experts, random_routing
from prophet_kernels.kernels.grouped_gemm import launch_down, launch_gate_up
from prophet_kernels.kernels.launch_config import CONFIG_DIR, device_file_name, shape_key
from prophet_kernels.kernels.route_plan import route_plan


def candidates(rows_per_expert: float):
    """(block_m list, tile list). Decode: thin blocks, narrow N tiles, deep K (GEMV-like)."""
    if rows_per_expert <= 16:
        bms = [16]
        tiles = list(itertools.product([16, 32, 64], [128, 256], [4], [3, 4, 5]))
        tiles += [(64, 128, 8, 4), (64, 256, 8, 4), (32, 512, 4, 3)]
    elif rows_per_expert <= 64:
        bms = [32, 64, 128] if rows_per_expert > 32 else [16, 32, 64]
        tiles = itertools.product([64, 128], [64, 128], [4, 8], [3, 4])
    else:
        bms = [64, 128]
        tiles = list(itertools.product([128, 256], [64], [4, 8], [3, 4]))
        tiles += [(128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4)]
    return bms, [dict(BN=n, BK=k, num_warps=w, num_stages=s) for n, k, w, s in tiles]


def bench(fn) -> float:
    try:
        fn()
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3
    except Exception:  # out of shared memory / registers for this tile: not a candidate
        return float("inf")


def tune_one(shape, T, dtype, device, w13, w2):
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    g = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    ids, w = random_routing(T, E, k, device, generator=g)
    wf = w.reshape(-1).contiguous()
    bms, tiles = candidates(T * k / E)
    best = None
    for bm in bms:
        plan = route_plan(ids, E, bm)
        plan_us = bench(lambda: route_plan(ids, E, bm))
        gu = min(((bench(lambda c=c: launch_gate_up(x, w13, plan, k, c)), c) for c in tiles),
                 key=lambda p: p[0])
        act = launch_gate_up(x, w13, plan, k, gu[1])
        dn = min(((bench(lambda c=c: launch_down(act, w2, wf, plan, c)), c) for c in tiles),
                 key=lambda p: p[0])
        total = gu[0] + dn[0]
        print(f"  T={T:5d} block_m={bm:3d}: plan {plan_us:6.1f} us  gate_up {gu[0]:8.1f} us {gu[1]}  down {dn[0]:8.1f} us "
              f"{dn[1]}", flush=True)
        if best is None or total < best[0]:
            best = (total, {"block_m": bm, "gate_up": gu[1], "down": dn[1]})
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(MOE_SHAPES))
    ap.add_argument("--T", type=int, nargs="+", default=list(BATCH_SIZES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="config JSON to write (default: the device's file)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a GPU: launch configs are tuned on the device they serve")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    out = Path(args.out) if args.out else CONFIG_DIR / device_file_name(device)
    table = json.loads(out.read_text()) if out.exists() else {}
    t0 = time.time()
    for name in args.shapes:
        shape = MOE_SHAPES[name]
        w13, w2 = make_experts(shape["E"], shape["H"], shape["I"], dtype, device)
        key = shape_key(shape["E"], shape["H"], shape["I"], shape["k"], dtype)
        print(f"{name} {key}", flush=True)
        for T in args.T:
            us, cfg = tune_one(shape, T, dtype, device, w13, w2)
            table.setdefault(key, {})[str(T)] = cfg
            print(f"  -> T={T}: {us:.1f} us {cfg}  [{time.time() - t0:.0f} s]", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        del w13, w2
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
