"""Tune the grouped-GEMM launch configs on the GPU and write them as data.

For each shape and batch size T, and each candidate ``block_m``: the route plans of a few rotated
routings are built once, then every gate_up and every down candidate tile is timed alone as CUDA
graph replays over the rotations (median; rotation keeps weights out of L2, and graphs keep the
host's launch cost out of microsecond kernels). Plan and combine are timed too; at decode sizes
the two-launch GEMV path (:mod:`prophet_kernels.kernels.gemv`) competes. The best total is
written to ``prophet_kernels/kernels/configs/<device>.json``
(or ``--out``), merged with what the file already holds.

    python bench/tune_moe.py                       # OLMoE + Mixtral shapes, all bench T, bf16
    python bench/tune_moe.py --shapes olmoe --T 1 4
    python bench/tune_moe.py --experts fp8 --T 1 16          # fp8 experts (scales per output channel)
    python bench/tune_moe.py --experts fp8 --block 128       # fp8 experts with 128x128 block scales
    python bench/tune_moe.py --experts fp8 --T 1024 4096 --a8 all   # W8A8 against W8A16, timed
    python bench/tune_moe.py --experts int4 --group 128 --T 1 16     # int4 (w4a16) experts

fp8 experts get keys of their own (``launch_config.shape_key``); without them the kernels use the
unquantized key's configs. With fp8 experts on a GPU with an fp8 type, W8A8 (activations quantized
to e4m3 per token, fp8 x fp8 dots, ``"a8": true`` in the config) competes on the grouped path
where it is timed (``--a8``): the faster one is written, measured, not assumed.
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

from prophet_kernels.benchmark.moe import time_graph
from prophet_kernels.benchmark.common import (BATCH_SIZES, MOE_SHAPES, make_experts, random_routing,
                                              weight_format_from_flags)
from prophet_kernels.kernels.fp8 import quantize_fp8
from prophet_kernels.kernels.gemv import gemv_experts, launch_gemv_gate_up, pdl_level
from prophet_kernels.kernels.grouped_gemm import launch_down, launch_gate_up
from prophet_kernels.kernels.launch_config import CONFIG_DIR, device_file_name, shape_key, table_path
from prophet_kernels.kernels.moe import uses_a8
from prophet_kernels.kernels.route_plan import route_plan
from prophet_kernels.kernels.weight_format import Quant, WeightFormat


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


def bench(calls) -> float:
    """Median us per call, all calls replayed from one CUDA graph (rotated inputs: cold L2)."""
    try:
        return time_graph(calls, repeats=10)[0]
    except Exception:  # out of shared memory / registers for this tile: not a candidate
        return float("inf")


def gemv_candidates():
    tiles = itertools.product([8, 16, 32, 64], [64, 128, 256, 512], [4, 8], [2, 4])
    return [dict(BN=n, BK=k, num_warps=w, num_stages=s) for n, k, w, s in tiles]


def tune_one(shape, T, dtype, device, w13, w2, rotations=4, quant: Quant = Quant(), fmt: WeightFormat = WeightFormat(),
             a8="prefill"):
    """(best us, config) for one shape and T; ``quant``/``fmt``: quantized experts' scales and format.
    ``a8`` (fp8 experts on a GPU with an fp8 type): also time W8A8 (activations quantized to e4m3,
    fp8 x fp8 dots; the quantization counted) on the grouped path: "prefill" where it has more than
    16 rows per expert (where the MMA time is not hidden under the weight reads), "all", or "off"."""
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    g = torch.Generator(device=device).manual_seed(T)
    inputs = []
    for _ in range(rotations):
        x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
        ids, w = random_routing(T, E, k, device, generator=g)
        inputs.append((x, ids, w.reshape(-1).contiguous()))
    rows_per_expert = T * k / E
    bms, tiles = candidates(rows_per_expert)
    best = None

    def pick(make_call, cands):
        return min(((bench([make_call(c, r) for r in range(rotations)]), c) for c in cands),
                   key=lambda p: p[0])

    def grouped(bm, w8a8):
        """(total us, config) of the best tiles at block_m ``bm``, W8A16 or W8A8."""
        plans = [route_plan(i, E, bm) for _, i, _ in inputs]
        plan_us = bench([lambda i=i: route_plan(i, E, bm) for _, i, _ in inputs])
        cands, xs, quant_us = tiles, [(x, {}) for x, _, _ in inputs], 0.0
        if w8a8:  # e4m3 activations: x per token, the intermediate rows per row (timed: part of the cost)
            cands = a8_tiles
            quant_us = bench([lambda x=x: quantize_fp8(x) for x, _, _ in inputs])
            xs = [(q, {"x_scale": sc, "out_dtype": dtype}) for q, sc in (quantize_fp8(x) for x, _, _ in inputs)]

        def gate_up(c, r):
            return lambda: launch_gate_up(xs[r][0], w13, plans[r], k, c, quant, fmt, **xs[r][1])

        def acts_of(c):  # (gate_up's outputs, down's inputs: the same, or quantized per row)
            raw = [gate_up(c, r)() for r in range(rotations)]
            return raw, [(a, {}) for a in raw] if not w8a8 else \
                [(q, {"act_scale": sc, "out_dtype": dtype}) for q, sc in (quantize_fp8(a) for a in raw)]

        def down(c, r):
            return lambda: launch_down(acts[r][0], w2, inputs[r][2], plans[r], c, quant, fmt, **acts[r][1])

        gu = pick(gate_up, cands)
        raw, acts = acts_of(gu[1])
        dn = pick(down, cands)
        if rows_per_expert > 16:  # large batches: then the grouped order of the best tiles
            gu = min([gu, pick(gate_up, [dict(gu[1], GROUP_M=m) for m in (4, 8, 16)])], key=lambda p: p[0])
            raw, acts = acts_of(gu[1])
            dn = min([dn, pick(down, [dict(dn[1], GROUP_M=m) for m in (4, 8, 16)])], key=lambda p: p[0])
        if w8a8:
            quant_us += bench([lambda a=a: quantize_fp8(a) for a in raw])
        outs = [down(dn[1], r)() for r in range(rotations)]
        sum_us = bench([lambda o=o: o.view(T, k, H).sum(1) for o in outs]) if k > 1 else 0.0
        total = plan_us + quant_us + gu[0] + dn[0] + sum_us
        print(f"  T={T:5d} block_m={bm:3d}{' W8A8' if w8a8 else ''}: plan {plan_us:6.1f}"
              f"{f' + quantize {quant_us:5.1f}' if w8a8 else ''} + gate_up {gu[0]:7.1f} {gu[1]} + "
              f"down {dn[0]:7.1f} {dn[1]} + sum {sum_us:5.1f} = {total:7.1f} us", flush=True)
        return total, {**({"a8": True} if w8a8 else {}), "block_m": bm, "gate_up": gu[1], "down": dn[1]}

    # the tiles a W8A8 config may use: those moe.uses_a8 runs as W8A8 (fp8 experts, an fp8 type,
    # K tiles of 32 or more within the scale blocks)
    a8_tiles = [c for c in tiles if uses_a8({"a8": True, "gate_up": c, "down": c}, fmt, device)]
    time_a8 = bool(a8_tiles) and (a8 == "all" or (a8 == "prefill" and rows_per_expert > 16))
    for bm in bms:
        for w8a8 in (False, True) if time_a8 else (False,):
            found = grouped(bm, w8a8)
            if best is None or found[0] < best[0]:
                best = found
    if T * k <= E:  # decode with mostly distinct experts: also time the two-launch GEMV path
        gcands = gemv_candidates()
        flat = [i.reshape(-1).contiguous() for _, i, _ in inputs]
        gu = pick(lambda c, r: lambda: launch_gemv_gate_up(inputs[r][0], w13, None, flat[r], E, k,
                                                           c, quant=quant, fmt=fmt), gcands)

        def gemv_call(c, r):
            return lambda: gemv_experts(inputs[r][0], w13, w2, None, inputs[r][2], inputs[r][1], E,
                                        {"gate_up": gu[1], "down": c}, quant, fmt)

        timed = sorted(((bench([gemv_call(c, r) for r in range(rotations)]), c) for c in gcands),
                       key=lambda p: p[0])
        full = timed[0]
        if pdl_level({"pdl": 1}, device):  # programmatic dependent launch of down, best 8 tiles
            pdl = [dict(c, pdl=lvl) for _, c in timed[:8] for lvl in (1, 2)]
            full = min([full, pick(gemv_call, pdl)], key=lambda p: p[0])
        print(f"  T={T:5d} gemv: gate_up {gu[0]:7.1f} {gu[1]}; gate_up + down {full[0]:7.1f} "
              f"{full[1]}", flush=True)
        if full[0] < best[0]:
            best = (full[0], {"gemv": True, "block_m": 16, "gate_up": gu[1], "down": full[1]})
    return best


def starting_table(out: Path, device: torch.device, own: bool) -> dict:
    """What the run merges into: ``out``'s table; for a GPU's own file that does not exist yet, the
    table it reads until then (a sibling GPU's, ``launch_config.table_path``), so that a partial
    tuning does not replace the sibling's tiles at the shapes and batch sizes it does not time."""
    if out.exists():
        return json.loads(out.read_text())
    seed = table_path(device) if own else out
    if seed != out and seed.exists():
        print(f"starting from {seed.name} (the table this GPU read so far); the tuned entries replace its own")
        return json.loads(seed.read_text())
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(MOE_SHAPES))
    ap.add_argument("--T", type=int, nargs="+", default=list(BATCH_SIZES))
    ap.add_argument("--dtype", default="bfloat16", help="activations' dtype (default bfloat16)")
    ap.add_argument("--experts", choices=["auto", "fp8", "int4"], default="auto",
                    help="auto: experts in --dtype; fp8: e4m3 experts with fp32 scales; int4: w4a16 with a "
                         "scale per --group inputs (quantized experts have their own table keys)")
    ap.add_argument("--group", type=int, default=128, help="with --experts int4: inputs per scale (32, 64, 128)")
    ap.add_argument("--zero-points", action="store_true", help="with --experts int4: asymmetric, stored zero points")
    ap.add_argument("--block", type=int, default=None,
                    help="with --experts fp8: square scale blocks of this size (e.g. 128); default per output channel")
    ap.add_argument("--a8", choices=["prefill", "all", "off"], default="prefill",
                    help="with --experts fp8 on sm_89+: also time W8A8 (fp8 activations) on the grouped path, "
                         "at batches of more than 16 rows per expert (prefill, default), every batch, or never")
    ap.add_argument("--out", default=None, help="config JSON to write (default: the device's file)")
    args = ap.parse_args(argv)
    try:
        fmt = weight_format_from_flags(args.experts, args.block, args.group, args.zero_points)
    except ValueError as e:
        sys.exit(str(e))
    if not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a GPU: launch configs are tuned on the device they serve")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    out = Path(args.out) if args.out else CONFIG_DIR / device_file_name(device)
    table = starting_table(out, device, own=not args.out)
    t0 = time.time()
    for name in args.shapes:
        shape = MOE_SHAPES[name]
        w13, w2 = make_experts(shape["E"], shape["H"], shape["I"], dtype, device)
        quant = Quant()
        if fmt.kind != "float":
            (w13, s13, z13), (w2, s2, z2) = fmt.quantize(w13), fmt.quantize(w2)
            quant = Quant(s13, s2, z13, z2)
        key = shape_key(shape["E"], shape["H"], shape["I"], shape["k"], dtype, fmt)
        print(f"{name} {key}", flush=True)
        for T in args.T:
            us, cfg = tune_one(shape, T, dtype, device, w13, w2, quant=quant, fmt=fmt, a8=args.a8)
            table.setdefault(key, {})[str(T)] = cfg
            print(f"  -> T={T}: {us:.1f} us {cfg}  [{time.time() - t0:.0f} s]", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        del w13, w2, quant
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
