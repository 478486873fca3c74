"""vLLM with and without Prophet on OLMoE-1B-7B (its config, random weights): vLLM's reported model
memory and KV-cache tokens, greedy decode tokens/s at batch 1 and 32, next to vLLM's own UVA
offload of all experts (`cpu_offload_params={"experts"}`). GPU only; each configuration runs in its
own process so that memory numbers are clean.

    python bench/bench_vllm.py                                   # off, prophet 0.25/0.5/0.75, offload
    python bench/bench_vllm.py --configs off prophet:0.5 --out-dir /tmp/x
    python bench/bench_vllm.py --configs off-graphs prophet-graphs:0.5    # decode speed with CUDA graphs
    python bench/bench_vllm.py --configs off-graphs prophet-device:0.5:same  # device mode, full CUDA graphs
    python bench/bench_vllm.py --configs prophet-device:0.5:same:read-through  # ... with read-through fills
    python bench/bench_vllm.py --configs off prophet:0.25 prophet-cpu:0.25 prophet-cpu:0  # misses on the host CPU
    python bench/bench_vllm.py --smoke       # this script end to end on a tiny model, no GPU needed

``--smoke`` runs the same path (checkpoint, one process per configuration, vLLM's log, the rows and
the table) on a tiny OLMoE-shaped model in fp32, on the CPU without a GPU: a check of the script
before GPU time is spent on it, not a benchmark (on the CPU vLLM sizes the KV cache from
VLLM_CPU_KVCACHE_SPACE, so there is no gain to see).

The weights are a seeded random checkpoint written once (`--weights random`, the default) so that
every engine, with experts on the host or the device, computes the same function and the greedy
tokens can be compared; vLLM's dummy weights (`--weights dummy`) are generated per device and give
every router the same values. Either way, decode speed and hit rates are not those of the trained
model's routing (the rows say so). The prediction for
the KV cache: Prophet frees the experts' bytes less the buffer's; vLLM turns that into
freed / (bytes per token of KV cache) more tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIGS = ["off", "prophet:0.5", "prophet:0.25", "prophet:0.75", "offload"]
SMOKE_CONFIGS = ["off", "prophet:0.5"]
NEW_TOKENS = 64
SMOKE_TOKENS = 16


OLMOE_1B_7B = dict(  # allenai/OLMoE-1B-7B-0924 config.json (planner catalogue: 6,919,161,856 params)
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
    num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=50279, pad_token_id=1)


SMOKE_DIMS = dict(  # --smoke: OLMoE's layout at a size the CPU serves in seconds; head dim 64 (vLLM's CPU
    # attention has no kernel for 16); prompt ids 100..115 < vocab
    vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=1, pad_token_id=1)


def kv_bytes_per_token(dims: dict, dtype_bytes: int) -> int:
    """KV-cache bytes of one token: layers x (K, V) x KV heads x head dim x bytes per element."""
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    return dims["num_hidden_layers"] * 2 * dims["num_key_value_heads"] * head_dim * dtype_bytes


def write_random_olmoe(path: Path, dims: dict, seed: int = 0) -> Path:
    """A seeded random OLMoE checkpoint in the published format (per-expert gate/up/down tensors),
    one safetensors shard per layer, so that every engine loads the same weights from disk (dummy
    weights differ between host- and device-created tensors) and routing is not degenerate.
    Scales 1/sqrt(fan-in) keep activations O(1); the router's spread makes routing vary by token."""
    import torch
    import transformers
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.OlmoeConfig(**dims, architectures=["OlmoeForCausalLM"])
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    H, I, E, V = dims["hidden_size"], dims["intermediate_size"], dims["num_experts"], dims["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    index, shards = {}, []
    shards.append(("model-embed.safetensors", {"model.embed_tokens.weight": rnd(V, H, std=1.0),
                                               "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
                                               "lm_head.weight": rnd(V, H, std=H**-0.5)}))
    for layer in range(dims["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.q_norm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rnd(E, H, std=4 * H**-0.5)}
        for proj in "qkvo":
            t[p + f"self_attn.{proj}_proj.weight"] = rnd(H, H, std=H**-0.5)
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(I, H, std=H**-0.5)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(I, H, std=H**-0.5)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(H, I, std=I**-0.5)
        shards.append((f"model-layer{layer:02d}.safetensors", t))
    for name, tensors in shards:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


def parse_config(name: str) -> tuple[dict | None, dict]:
    """A configuration's Prophet settings (None: Prophet off) and its extra engine arguments; a
    ValueError for a name this script does not run or settings the plugin would refuse (checked for
    every configuration before the first engine starts)."""
    base, _, rest = name.partition(":")
    if base in ("prophet", "prophet-graphs", "prophet-device", "prophet-cpu", "prophet-graphs-cpu", "prophet-stream"):
        # prophet:<buffer>[:<predictor>[:<fill>]]; -cpu: miss cpu (host mode); -stream: miss stream
        buffer, _, more = rest.partition(":")
        predictor, _, fill = more.partition(":")
        try:
            prophet = {"buffer": float(buffer), "policy": "next-use", "log_every_s": 0}
        except ValueError:
            raise ValueError(f"the buffer {buffer!r} is not a number") from None
        if predictor:
            prophet["predictor"] = predictor
        if base == "prophet-device":  # every decision on the GPU: vLLM's own compilation and full CUDA graphs
            prophet |= {"mode": "device", "fill": fill or "copy"}
        elif fill:
            raise ValueError("a fill is a device-mode setting (prophet-device:...)")
        if base.endswith("-cpu"):  # misses computed on the host CPU where a copy does not pay
            prophet["miss"] = "cpu"
        if base == "prophet-stream":  # every non-resident expert copied once per layer per step
            prophet["miss"] = "stream"
        from prophet_kernels.integration.settings import ProphetSettings

        ProphetSettings.resolve({"prophet": prophet}, environ={})
        return prophet, {}
    if name == "offload":
        return None, dict(cpu_offload_gb=13, cpu_offload_params={"experts"})
    if name in ("off", "off-graphs"):
        return None, {}
    raise ValueError("unknown; known: off, off-graphs, offload, prophet:<buffer>[:<predictor>], "
                     "prophet-graphs:<buffer>[:<predictor>], prophet-device:<buffer>[:<predictor>[:<fill>]], "
                     "prophet-cpu:<buffer>[:<predictor>], prophet-graphs-cpu:<buffer>[:<predictor>], prophet-stream:<buffer>")


def run_one(name: str, model: str, load_format: str = "auto", smoke: bool = False, batches=(1, 32)) -> dict:
    """In the child: build the engine, decode, report (printed as one RESULT line)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from prophet_kernels.integration.demo import greedy, make_llm
    from prophet_kernels.integration.vllm_plugin import prophet_stats, register

    register()
    # vLLM's defaults for the batch limit (None), not the demo's small CPU ones
    kwargs = dict(load_format=load_format, dtype="float32" if smoke else "bfloat16", max_model_len=2048,
                  max_num_seqs=None)
    if not smoke:
        kwargs["attention_backend"] = "TRITON_ATTN"
    prophet, extra = parse_config(name)
    kwargs.update(extra)
    graphs = with_graphs(name)
    if graphs:  # vLLM's CUDA graphs: its defaults without Prophet or in device mode; host mode: piecewise
        kwargs["enforce_eager"] = False
        if prophet is not None and prophet.get("mode") != "device":
            from prophet_kernels.integration.vllm_plugin import piecewise_compilation_config

            kwargs["compilation_config"] = piecewise_compilation_config()
    t0 = time.perf_counter()
    llm = make_llm(model, prophet, **kwargs)  # eager unless "-graphs"
    row = {"config": name, "engine_start_s": time.perf_counter() - t0, "enforce_eager": not graphs}
    try:  # a function reaches the worker when the engine is in this process (the default set above)
        row["memory"] = llm.collective_rpc(worker_memory)[0]
    except Exception as e:  # e.g. VLLM_ENABLE_V1_MULTIPROCESSING=1 given: the row keeps the rest
        row["memory_error"] = f"{type(e).__name__}: {e}"
    prompt = list(range(100, 116))
    new_tokens = SMOKE_TOKENS if smoke else NEW_TOKENS
    greedy(llm, [prompt], new_tokens)  # warm-up
    if prophet is not None:  # the counters then cover the timed batches, not vLLM's profiling and warm-up runs
        prophet_stats(llm, reset=True)
    copied = 0
    for batch in batches:
        t0 = time.perf_counter()
        tokens = greedy(llm, [prompt] * batch, new_tokens)
        seconds = time.perf_counter() - t0
        row[f"tok_s_b{batch}"] = batch * new_tokens / seconds
        if batch == 1:
            row["tokens_b1"] = tokens[0]
        if prophet is not None and prophet.get("miss") == "stream":  # the copy engine's share of the batch's time
            moved = prophet_stats(llm)[0]["total"]["bytes_h2d"]
            row[f"h2d_gbps_b{batch}"] = (moved - copied) / seconds / 1e9
            copied = moved
    if prophet is not None and prophet.get("miss") == "stream" and not smoke:
        import torch

        from prophet_kernels.benchmark.common import measure_h2d_bandwidth

        row["pinned_h2d_gbps"] = measure_h2d_bandwidth(torch.device("cuda")) / 1e9
        for batch in batches:  # copy engine busy: the streamed bytes' rate over the pinned copy rate
            row[f"copy_busy_b{batch}"] = row[f"h2d_gbps_b{batch}"] / row["pinned_h2d_gbps"]
    stats = prophet_stats(llm)
    if stats:
        s = stats[0]
        row |= {"slots": s["slots"], "expert_bytes": s["expert_bytes"], "layers": s["num_layers"],
                "experts": s["num_experts"], "prophet": s["total"],
                "prophet_counts": f"the timed batches ({', '.join(map(str, batches))})",
                "miss": s.get("miss"), "cpu_threads": s.get("cpu_threads"), "cpu_rates": s.get("cpu_rates")}
    return row


def worker_memory(worker) -> dict:
    """vLLM's own memory accounting, read in its worker (bytes; None where this vLLM keeps no such
    field): the weights it measured while loading (Prophet's buffer is allocated then, so it is in
    there), the activation peak and non-torch memory of its profiling run, its CUDA-graph estimate,
    and what it gave the KV cache, which is the requested memory less all of those. The KV gain of a
    Prophet run is then the weights it saved plus the activation peak it saved (its MoE scratch
    against vLLM's MoE workspace at the profiling run's token count), which the rows separate."""
    runner = getattr(worker, "model_runner", None)
    fields = {"weights_bytes": getattr(runner, "model_memory_usage", None),
              "peak_activation_bytes": getattr(worker, "peak_activation_memory", None),
              "non_torch_bytes": getattr(worker, "non_torch_memory", None),
              "cudagraph_estimate_bytes": getattr(worker, "cudagraph_memory_estimate", None),
              "kv_cache_bytes": getattr(worker, "available_kv_cache_memory_bytes", None)}
    return {k: int(v) if isinstance(v, (int, float)) else None for k, v in fields.items()}


def with_graphs(config: str) -> bool:
    """Whether a configuration runs vLLM's CUDA graphs ("off-graphs", "prophet-graphs:...",
    "prophet-device:...")."""
    base = config.partition(":")[0]
    return base.endswith("-graphs") or base in ("prophet-device", "prophet-graphs-cpu")


def compare_rows(rows: list[dict], kv_bytes: int) -> None:
    """Adds to each Prophet row its KV-token gain over the run without Prophet in the same mode (CUDA
    graphs take memory and may round differently; else eager "off"), the gain predicted from the
    freed expert bytes (``kv_bytes``: KV-cache bytes per token), their ratio, and whether the batch-1
    tokens match that run's."""
    from prophet_kernels.integration.demo import first_difference

    bases = {mode: next((r for r in rows if r["config"] == mode and r.get("kv_tokens")), None)
             for mode in ("off", "off-graphs")}
    for r in rows:
        base = bases["off-graphs"] if with_graphs(r["config"]) and bases["off-graphs"] else bases["off"]
        r["compared_with"] = base["config"] if base and r is not base else None
        if r["compared_with"] is None:
            continue
        if r.get("kv_tokens") and "slots" in r:
            freed = (r["layers"] * r["experts"] - r["slots"]) * r["expert_bytes"]
            r["kv_tokens_predicted_gain"] = freed / kv_bytes
            r["kv_tokens_gain"] = r["kv_tokens"] - base["kv_tokens"]
            r["gain_ratio"] = r["kv_tokens_gain"] / r["kv_tokens_predicted_gain"]
            # where the gain came from, in vLLM's own accounting (base minus this run: saved bytes)
            mb, mr = base.get("memory") or {}, r.get("memory") or {}
            both = [k for k in mb if mb.get(k) is not None and mr.get(k) is not None]
            saved = {k: mb[k] - mr[k] for k in ("weights_bytes", "peak_activation_bytes", "non_torch_bytes") if k in both}
            r["saved_bytes"] = saved
            if "weights_bytes" in saved:
                r["weights_saved_ratio"] = saved["weights_bytes"] / freed
            if "kv_cache_bytes" in both:
                r["kv_cache_bytes_gain"] = mr["kv_cache_bytes"] - mb["kv_cache_bytes"]
        if "tokens_b1" in r:
            r["tokens_identical_to_off"] = r["tokens_b1"] == base.get("tokens_b1")
            # vLLM's own MoE kernels and Prophet's round bf16 differently, so a late divergence can
            # be rounding; the buffer itself must not change a bit: every Prophet run of one mode
            # uses the same kernels, whatever the buffer size (checked below)
            r["first_divergence_vs_off"] = first_difference(r["tokens_b1"], base.get("tokens_b1") or [])
    for graphs in (False, True):
        prophet = [r for r in rows if "slots" in r and "tokens_b1" in r and with_graphs(r["config"]) == graphs]
        for r in prophet[1:]:
            r["tokens_identical_to_" + prophet[0]["config"]] = r["tokens_b1"] == prophet[0]["tokens_b1"]


def summary_table(rows: list[dict]) -> str:
    nan = float("nan")
    lines = [f"\n{'config':20s}{'model GiB':>10s}{'KV tokens':>12s}{'gain':>10s}{'predicted':>11s}{'ratio':>7s}"
             f"{'wts/freed':>10s}{'peak saved':>11s}{'tok/s B=1':>11s}{'tok/s B=32':>12s}{'same tokens':>12s}{'differ at':>10s}  vs"]
    for r in rows:
        g = r.get("kv_tokens_gain")
        peak = (r.get("saved_bytes") or {}).get("peak_activation_bytes")
        lines.append(f"{r['config']:20s}{r.get('model_GiB') or nan:>10.2f}{r.get('kv_tokens') or 0:>12,d}"
                     f"{g if g is not None else '-':>10}{r.get('kv_tokens_predicted_gain', nan):>11.0f}"
                     f"{r.get('gain_ratio', nan):>7.3f}{r.get('weights_saved_ratio', nan):>10.3f}"
                     f"{peak / 2**20 if peak is not None else nan:>11.0f}{r.get('tok_s_b1', nan):>11.1f}"
                     f"{r.get('tok_s_b32', nan):>12.1f}{str(r.get('tokens_identical_to_off', '-')):>12s}"
                     f"{str(r.get('first_divergence_vs_off', '-')):>10s}  {r.get('compared_with') or '-'}")
    lines.append("gain: KV tokens over the run in 'vs'; predicted: (experts - slots) x expert bytes / KV bytes per "
                 "token; wts/freed: weights vLLM measured saved / those bytes; peak saved: vLLM's profiling "
                 "activation peak, 'vs' minus this run, MiB (MoE scratch at max_num_batched_tokens)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=None,
                    help="off, prophet:<buffer>[:<predictor>], offload (eager), off-graphs, "
                         "prophet-graphs:<buffer>[:<predictor>] (CUDA graphs; piecewise around Prophet's MoE op), "
                         "prophet-device:<buffer>[:<predictor>[:<fill>]] (device mode: vLLM's compilation and "
                         "full CUDA graphs), prophet-cpu:<buffer>[:<predictor>] and prophet-graphs-cpu:... (miss: "
                         "cpu, host mode; buffer 0: a staging ring only); "
                         f"default {' '.join(DEFAULT_CONFIGS)} ({' '.join(SMOKE_CONFIGS)} with --smoke)")
    ap.add_argument("--batches", default="1,32", help="decode batches timed per configuration (default 1,32)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    ap.add_argument("--weights", choices=["random", "dummy"], default="random",
                    help="random: a seeded checkpoint written once and loaded by every engine (default); "
                         "dummy: vLLM's load_format=dummy (differs between host and device tensors)")
    ap.add_argument("--out-dir", default=None,
                    help="JSON rows and logs (default bench/results; with --smoke a temporary directory)")
    ap.add_argument("--smoke", action="store_true",
                    help="this script end to end on a tiny OLMoE-shaped model in fp32, without a GPU (not a benchmark)")
    args = ap.parse_args(argv)
    for name in args.configs or ():
        try:
            parse_config(name)
        except ValueError as e:
            ap.error(f"configuration {name!r}: {e}")
    if args.one:
        load_format = "dummy" if args.weights == "dummy" else "auto"
        print("RESULT " + json.dumps(run_one(args.one, args.model, load_format, args.smoke,
                                             [int(b) for b in args.batches.split(",")])), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("bench_vllm.py needs a GPU; --smoke runs it on a tiny model without one (the plugin itself "
                 "is tested on the CPU by tests/test_vllm_plugin.py)")
    from prophet_kernels.benchmark.common import provenance, write_rows

    configs = args.configs or (SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    dims, label = (SMOKE_DIMS, "tiny OLMoE-shaped (--smoke)") if args.smoke else (OLMOE_1B_7B, "OLMoE-1B-7B")
    out = Path(args.out_dir or (tempfile.mkdtemp(prefix="prophet-vllm-smoke-") if args.smoke
                                else Path(__file__).parent / "results"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="prophet-vllm-")) / "olmoe"
    if args.smoke:  # the demo's settings for vLLM on the CPU (a 1 GiB KV cache, caches under the run's directory)
        from prophet_kernels.integration.demo import vllm_env

        vllm_env(str(root.parent))
    if args.weights == "random":
        t0 = time.perf_counter()
        write_random_olmoe(root, dims)
        print(f"random {label} checkpoint written in {time.perf_counter() - t0:.0f} s: {root}", flush=True)
    else:
        import transformers

        transformers.OlmoeConfig(**dims, architectures=["OlmoeForCausalLM"]).save_pretrained(root)
    model = str(root)
    rows = []
    for name in configs:
        log = out / "logs" / f"vllm_{name.replace(':', '_')}.log"
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name, "--model", model, "--weights", args.weights,
                                "--batches", args.batches]
                               + (["--smoke"] if args.smoke else []),
                               capture_output=True,
                               text=True, timeout=args.timeout)
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {args.timeout} s", -1
            text = text if isinstance(text, str) else text.decode(errors="replace")
        log.write_text(text)
        res = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        row = res[0] if res else {"config": name, "error": f"rc={rc}, see {log.name}"}
        m = re.search(r"Model loading took ([\d.]+) GiB", text)
        k = re.search(r"KV cache size: ([\d,]+) tokens", text)
        row["model_GiB"] = float(m.group(1)) if m else None
        row["kv_tokens"] = int(k.group(1).replace(",", "")) if k else None
        rows.append(row)
        print(f"{name}: model {row['model_GiB']} GiB, KV {row['kv_tokens']} tokens, "
              "tok/s " + " / ".join(f"B={b} {row.get(f'tok_s_b{b}', float('nan')):.1f}" for b in args.batches.split(","))
              + "".join(f", copy engine busy at B={b} {row[f'copy_busy_b{b}']:.0%}" for b in args.batches.split(",")
                        if f"copy_busy_b{b}" in row)
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
    compare_rows(rows, kv_bytes_per_token(dims, 4 if args.smoke else 2))
    print(summary_table(rows))
    prov = provenance(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import vllm

        prov["vllm"] = vllm.__version__
    except ImportError:
        pass
    for r in rows:
        r.update(prov, weights=args.weights, model=label,
                 note="smoke run: not a benchmark" if args.smoke else
                 "random (or dummy) weights: decode speed and hits are not those of the trained model's routing")
    print(f"rows -> {write_rows('bench_vllm_smoke' if args.smoke else 'bench_vllm', rows, str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
