"""Measure what `prophet plan --frontier` needs (hours on 2 CPU cores; rows appended as they complete,
a rerun skips rows already there):

    unique            unique experts per layer at batch B on the shape's realistic held-out trace
    quality_resident  held-out bits per byte with every expert resident in fp32 / bf16 / fp8 / int4
    sim_wait          Prophet today (misses wait): the trace simulator at each GPU, batch, buffer and expert
                      dtype, with the routing study's chosen policy and predictor -> stall per step, landed
    no_wait           a bf16 buffer whose misses do not wait: the model decoding the held-out windows
                      beside the buffers (routing/quality.py) for stand-in / substitute / skip / skip-renorm;
                      host-cpu from the simulator (the exact expert: quality = fp32's)
    miss_cpu          Prophet with miss: cpu (ProphetMoE's own split, MissCost) at each GPU, batch, buffer (0: a
                      staging ring of E slots) and target host (planner.frontier.cpu_targets: this VM measured,
                      two stated estimates) -> stall, the CPU's added time, experts the CPU computed per token
    stream            Prophet with miss: stream at each GPU, batch (16 and up), buffer (0: the ring alone) and
                      expert dtype: the schedule's replay in steady state (routing.simulator.stream_step) at the
                      batch's layer time -> step, its wait for copies, the copy engine's busy share; the share of a
                      layer call's experts that are resident (hit rate) on the held-out trace

Every row records its inputs (policy, predictor, timing constants, windows, commit, date).

Another catalogue model (``--models``): its simulation rows replay the held-out trace of its routing proxy
(``planner.frontier.routing_proxy``: the study shape of the nearest sparsity k / E) with its own bytes and layer
time, one trace expert standing for ``unit`` = k_model / k_shape of its experts; the per-step figures are the
trace's layers scaled to its MoE layers. Those rows carry ``model``, ``trace_layers`` and ``unit``; they
have no unique, quality or no-wait rows (those are the study model's own).

    .venv/bin/python bench/frontier_inputs.py --shapes olmoe --checkpoints checkpoints
    .venv/bin/python bench/frontier_inputs.py --shapes olmoe --parts unique,quality_resident,sim_wait
    .venv/bin/python bench/frontier_inputs.py --parts unique,sim_wait,stream --batches 16,64,128,256
    .venv/bin/python bench/frontier_inputs.py --models DeepSeek-V3,Qwen3-235B-A22B --parts sim_wait,miss_cpu,stream

Checkpoints: `prophet trace train --shape S --out checkpoints/S` (docs/routing.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # the CPU's PyTorch path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("unique", "quality_resident", "sim_wait", "no_wait", "miss_cpu", "stream")
OUT = Path(__file__).resolve().parent / "results" / "frontier_inputs.jsonl"
WARMUP_STEPS = 4  # sim_wait at batch 64-256 (16-128 steps of the traces): steps replayed first, not counted


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("kind", "shape", "gpu", "batch", "capacity", "expert_dtype", "dtype", "strategy",
                                      "cpu_target", "model"))


def main(argv=None) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from prophet_kernels.memory.buffer import slots_for
    from prophet_kernels.memory.predictors import fit_predictor
    from prophet_kernels.planner import frontier as fr
    from prophet_kernels.planner.catalog import get_model
    from prophet_kernels.planner.memory import expert_bytes
    from prophet_kernels.provenance import git_commit, utc_now
    from prophet_kernels.routing.quality import decode_bits_per_byte, resident_bits_per_byte
    from prophet_kernels.memory.stream import min_stream_slots
    from prophet_kernels.routing.simulator import make_replay, simulate, stream_step
    from prophet_kernels.routing.traces import load_trace
    from prophet_kernels.routing.traces.dedup import unique_per_layer
    from prophet_kernels.routing.traces.tokenizer import tokenize_corpus
    from prophet_kernels.routing.traces.train import get_shape, heldout_windows, model_class

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="olmoe,mixtral,qwen3")
    ap.add_argument("--models", help="catalogue models, comma-separated, each simulated on its routing proxy's trace "
                                     "(instead of --shapes)")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--gpus", default=",".join(fr.GPUS_DEFAULT))
    ap.add_argument("--batches", default=",".join(map(str, fr.BATCHES)))
    ap.add_argument("--capacities", default=",".join(map(str, fr.CAPACITIES)))
    ap.add_argument("--policy", default="next-use", help="Prophet's policy in the sim_wait and no_wait rows")
    ap.add_argument("--predictor", default="gate", help="sim_wait rows' predictor (none, or one the trace replays; "
                                                        "default gate, depth 1: the routing study's choice)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=2048, help="decode steps per simulation (default 2048)")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows for the quality rows (default 16)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: {', '.join(PARTS)}")
    gpus = fr.check_gpus(args.gpus.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    # the decoded no-wait rows run the held-out windows as concurrent sequences: `groups` groups of B
    groups_of = lambda B: max(1, min(8, args.windows // B))  # noqa: E731
    undecodable = [B for B in batches if args.windows % (groups_of(B) * B)]
    if undecodable and "no_wait" in args.parts.split(","):
        print(f"note: --windows {args.windows} cannot form batches of {undecodable}: the decoded no-wait rows "
              f"(stand-in, substitute, skip, skip-renorm) at those batches are not measured; host-cpu's are "
              f"(give --windows a multiple of {max(undecodable)} to measure them)", file=sys.stderr)
    caps = [float(c) for c in args.capacities.split(",")]
    out = Path(args.out)
    done = {_key(json.loads(x)) for x in out.read_text().splitlines() if x.strip()} if out.exists() else set()
    stamp = {"commit": git_commit(), "date": utc_now(), "device": "cpu (simulation and reference code)",
             "torch": torch.__version__}

    def emit(row):
        row = row | stamp
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(_key(row))
        print(json.dumps({k: v for k, v in row.items() if k not in stamp}), flush=True)

    corpus = None
    if args.models:
        targets = [(get_model(x),) + fr.routing_proxy(get_model(x)) for x in args.models.split(",")]
        own = [m.name for m, _, _ in targets if m.name in fr.SHAPE_OF]
        if own or {"unique", "quality_resident", "no_wait"} & set(parts):
            ap.error(f"--models: other catalogue models than the study ones ({', '.join(own)}: --shapes), with "
                     "--parts among sim_wait, miss_cpu, stream")
    else:
        targets = [(get_model(get_shape(x).mimics), x, 1.0) for x in args.shapes.split(",")]
    for m, shape_name, unit in targets:
        shape = get_shape(shape_name)
        proxy = m.name not in fr.SHAPE_OF
        held = load_trace(f"{shape_name}-heldout")
        L, E = held.num_layers, held.num_experts
        Lm, Em = m.moe_layers, m.moe.experts
        scale = Lm / L  # the trace's layers' per-step figures, scaled to the model's MoE layers
        tag = {"model": m.name, "trace_layers": L, "unit": unit} if proxy else {}
        bytes_of = lambda dtype: int(expert_bytes(m, dtype) * unit)  # noqa: E731  (one trace expert's bytes)
        flops = int(fr.expert_flops(m) * unit) if proxy else None
        unique, unique_m = {}, {}
        for B in batches:
            unique[B] = unique_per_layer(held, B)[0]
            unique_m[B] = min(float(Em), B * m.moe.top_k, unique[B] * unit)
            row = {"kind": "unique", "shape": shape_name, "batch": B, "unique_per_layer": unique[B],
                   "trace": f"{shape_name}-heldout"}
            if "unique" in parts and _key(row) not in done:
                emit(row)
        model = windows = None
        if {"quality_resident", "no_wait"} & set(parts):
            corpus = corpus or tokenize_corpus()
            windows = heldout_windows(corpus, args.windows, args.seq_len, seed=999)
            ckpt = Path(args.checkpoints) / shape_name

            def load():
                return model_class(shape).from_pretrained(ckpt, dtype=torch.float32).eval()

            model = load()
        if "quality_resident" in parts:
            for dtype in ("fp32", "bf16", "fp8", "int4"):
                row = {"kind": "quality_resident", "shape": shape_name, "dtype": dtype}
                if _key(row) in done:
                    continue
                emit(row | {"bits_per_byte": resident_bits_per_byte(load(), windows, corpus.token_bytes, dtype),
                            "windows": args.windows, "seq_len": args.seq_len})
        predictor = None if args.predictor == "none" else fit_predictor(args.predictor, None, held)
        stream_hits = {}  # (batch, slots) -> the stream replay's hit rate and steps on the held-out trace
        for g in gpus:
            pcie = fr.gpu_constants(g)["pcie_gbps"]
            for B in batches:
                for cap in ([0.0] + caps) if "stream" in parts and B in fr.STREAM_BATCHES else []:
                    for dtype in ("bf16", "fp8"):
                        row = {"kind": "stream", "shape": shape_name, "gpu": g, "batch": B, "capacity": cap,
                               "expert_dtype": dtype, **tag}
                        slots = min_stream_slots(Lm, Em) if cap == 0 else slots_for(cap, Lm, Em)
                        trace_slots = min_stream_slots(L, E) if cap == 0 else slots_for(cap, L, E)
                        if _key(row) in done or slots < min_stream_slots(Lm, Em) or trace_slots < min_stream_slots(L, E):
                            continue  # (a buffer below the ring does not stream: the ring alone is the 0 row)
                        layer_us = fr.layer_seconds(m, g, unique_m[B], dtype) * 1e6
                        st = stream_step(Lm, Em, slots, expert_bytes(m, dtype), pcie * 1e9, layer_us * 1e-6)
                        if (B, trace_slots) not in stream_hits:  # (the resident share: the same at any GPU and dtype)
                            r = simulate(held, trace_slots, miss="stream", batch=B, layer_us=layer_us, pcie_gbps=pcie,
                                         expert_bytes=bytes_of(dtype), max_steps=args.max_steps)
                            stream_hits[B, trace_slots] = r.hit_rate, r.steps
                        hit_rate, trace_steps = stream_hits[B, trace_slots]
                        emit(row | {"slots": slots, "layer_us": layer_us, "pcie_gbps": pcie, "unique_per_layer": unique_m[B],
                                    "step_us": st["step_s"] * 1e6, "stall_us_per_step": st["stall_s"] * 1e6,
                                    "copy_busy": st["copy_busy"], "resident_per_layer": st["resident_per_layer"],
                                    "streamed_per_step": st["streamed_per_step"], "hit_rate": hit_rate,
                                    "trace_steps": trace_steps})
                for cap in caps:
                    if "sim_wait" in parts:
                        for dtype in ("bf16", "fp8", "int4"):
                            row = {"kind": "sim_wait", "shape": shape_name, "gpu": g, "batch": B, "capacity": cap,
                                   "expert_dtype": dtype, **tag}
                            if _key(row) in done:
                                continue
                            layer_us = fr.layer_seconds(m, g, unique_m[B], dtype) * 1e6
                            t0 = time.time()
                            warmup = WARMUP_STEPS if B in fr.LARGE_BATCHES else 0  # a few steps there: a cold
                            r = simulate(held, cap, args.policy, predictor, args.depth, batch=B, layer_us=layer_us,
                                         pcie_gbps=pcie, expert_bytes=bytes_of(dtype), max_steps=args.max_steps,
                                         warmup_steps=warmup)  # buffer's fill would weigh on them
                            emit(row | {"policy": args.policy, "predictor": r.predictor, "depth": r.depth,
                                        "max_steps": args.max_steps, "warmup_steps": warmup,
                                        "layer_us": layer_us, "pcie_gbps": pcie, "hit_rate": r.hit_rate,
                                        "ready_hit_rate": r.ready_hit_rate,
                                        "stall_us_per_step": r.stall_s / r.steps * 1e6 * scale,
                                        "steps": r.steps, "seconds": time.time() - t0})
                    for dtype in ("bf16", "int4") if "miss_cpu" in parts else ():
                        # (int4: the store's int4 rows on the link and the CPU, at the CPU's int4 rates)
                        for target, rates in fr.cpu_targets(shape_name, dtype=dtype).items():
                            for c in ([0.0] if cap == caps[0] else []) + [cap]:  # 0: the staging ring only
                                row = {"kind": "miss_cpu", "shape": shape_name, "gpu": g, "batch": B, "capacity": c,
                                       "cpu_target": target, **({"expert_dtype": dtype} if dtype != "bf16" else {}),
                                       **tag}
                                if _key(row) in done:
                                    continue
                                layer_us = fr.layer_seconds(m, g, unique_m[B], dtype) * 1e6
                                link = min(pcie, rates["dram_gbps"])  # a host copies no faster than it reads
                                slots = Em if c == 0 else slots_for(c, Lm, Em)
                                t0 = time.time()
                                r = simulate(held, c, args.policy, None, 1, batch=B, layer_us=layer_us,
                                             pcie_gbps=link, expert_bytes=bytes_of(dtype), miss="cpu",
                                             max_steps=args.max_steps, expert_flops=flops,
                                             cpu_rates={k: rates[k] for k in ("cpu_gbps", "cpu_gflops", "dram_gbps",
                                                                             "call_us")})
                                emit(row | {"policy": args.policy, "predictor": "none",
                                            "max_steps": args.max_steps, "slots": slots, "layer_us": layer_us,
                                            "host_us_per_layer": fr.HOST_US_PER_LAYER, "link_gbps": link,
                                            **{k: rates[k] for k in ("cpu_gbps", "cpu_gflops", "dram_gbps", "call_us")},
                                            "cpu_source": rates["source"], "hit_rate": r.hit_rate,
                                            "ready_hit_rate": r.ready_hit_rate,
                                            "stall_us_per_step": r.stall_s / r.steps * 1e6 * scale,
                                            "extra_us_per_step": r.extra_s / r.steps * 1e6 * scale,
                                            "cpu_experts_per_token": r.fallbacks / r.tokens * unit * scale,
                                            "steps": r.steps, "seconds": time.time() - t0})
                    if "no_wait" not in parts:
                        continue
                    layer_us = fr.layer_seconds(m, g, unique[B], "bf16") * 1e6
                    hbm = fr.gpu_constants(g)["hbm_gbps"] * 1e9
                    eb = expert_bytes(m, "bf16")
                    cost = {"stand-in": (fr.int4_expert_bytes(m) / (fr.CONSTANTS["moe_hbm_fraction"] * hbm), False, 0.0),
                            "substitute": (0.0, False, 0.0), "skip": (0.0, False, 0.0), "skip-renorm": (0.0, False, 0.0),
                            "host-cpu": (eb / (fr.CONSTANTS["cpu_gbps"] * 1e9), True,
                                         fr.CONSTANTS["host_round_trip_us"] * 1e-6)}
                    for strategy in fr.NO_WAIT:
                        row = {"kind": "no_wait", "shape": shape_name, "gpu": g, "batch": B, "capacity": cap,
                               "strategy": strategy}
                        if _key(row) in done:
                            continue
                        fs, parallel, latency = cost[strategy]
                        base = {"policy": args.policy, "layer_us": layer_us, "pcie_gbps": pcie, "fallback_us": fs * 1e6,
                                "fallback_parallel": parallel, "fallback_latency_us": latency * 1e6}
                        t0 = time.time()
                        if strategy == "host-cpu":  # the exact expert: routing as recorded, quality = fp32's
                            r = simulate(held, cap, args.policy, None, 1, batch=B, layer_us=layer_us, pcie_gbps=pcie,
                                         expert_bytes=eb, miss="no-wait", fallback_s=fs, fallback_parallel=parallel,
                                         fallback_latency_s=latency, max_steps=args.max_steps)
                            emit(row | base | {"bits_per_byte": None, "quality_from": "exact (= fp32 experts)",
                                               "hit_rate": r.hit_rate, "ready_hit_rate": r.ready_hit_rate,
                                               "fallbacks_per_token": r.fallbacks / r.tokens,
                                               "extra_us_per_step": r.extra_s / r.steps * 1e6,
                                               "seconds": time.time() - t0})
                            continue
                        if B in undecodable:
                            continue  # (said at the start)
                        groups = groups_of(B)
                        make = lambda: make_replay(L, E, slots_for(cap, L, E), args.policy, None, 0, eb, pcie * 1e9,
                                                   layer_us * 1e-6, miss="no-wait", fallback_s=fs,
                                                   fallback_parallel=parallel, fallback_latency_s=latency,
                                                   min_slots=min(E, B * held.top_k))
                        q = decode_bits_per_byte(model, windows, corpus.token_bytes, make, batch=B, groups=groups,
                                                 strategy=strategy)
                        steps = groups * q["steps_per_group"]
                        emit(row | base | {"bits_per_byte": q["bits_per_byte"], "quality_from": "decoded",
                                           "hit_rate": q["hit_rate"], "ready_hit_rate": q["ready_hit_rate"],
                                           "fallbacks_per_token": q["fallbacks"] / q["tokens"],
                                           "extra_us_per_step": q["extra_s"] / steps * 1e6,
                                           "windows": args.windows, "seq_len": args.seq_len, "groups": groups,
                                           "seconds": time.time() - t0})
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
