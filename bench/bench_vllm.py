"""vLLM with and without Prophet on OLMoE-1B-7B (config only, dummy weights): vLLM's reported model
memory and KV-cache tokens, greedy decode tokens/s at batch 1 and 32, next to vLLM's own UVA
offload of all experts (`cpu_offload_params={"experts"}`). GPU only; each configuration runs in its
own process so that memory numbers are clean.

    python bench/bench_vllm.py                                   # off, prophet 0.25/0.5/0.75, offload
    python bench/bench_vllm.py --configs off prophet:0.5 --out-dir /tmp/x

With dummy weights every router sees the same values, so routing is degenerate: decode speed under
Prophet here measures the host-driven overhead, not hit rates (the rows say so). The prediction for
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
NEW_TOKENS = 64


def olmoe_dir(root: Path) -> Path:
    """config.json of OLMoE-1B-7B-0924 (transformers' OlmoeConfig defaults are that model's)."""
    import transformers

    d = root / "olmoe-1b-7b"
    d.mkdir(parents=True, exist_ok=True)
    cfg = transformers.OlmoeConfig(torch_dtype="bfloat16", architectures=["OlmoeForCausalLM"])
    cfg.save_pretrained(d)
    return d


def run_one(name: str, model: str) -> dict:
    """In the child: build the engine, decode, report (printed as one RESULT line)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from integration.vllm_plugin import prophet_stats, register

    register()
    kwargs = dict(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=2048, seed=0, attention_backend="TRITON_ATTN", enforce_eager=True)
    if name.startswith("prophet:"):
        kwargs["additional_config"] = {"prophet": {"buffer": float(name.split(":")[1]), "policy": "lru",
                                                   "log_every_s": 0}}
    elif name == "offload":
        kwargs.update(cpu_offload_gb=13, cpu_offload_params={"experts"})
    elif name != "off":
        raise ValueError(f"unknown configuration {name!r}")
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    row = {"config": name, "engine_start_s": time.perf_counter() - t0, "enforce_eager": True}
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(100, 116))}]
    llm.generate(prompt, sp, use_tqdm=False)  # warm-up
    for batch in (1, 32):
        t0 = time.perf_counter()
        outs = llm.generate(prompt * batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        row[f"tok_s_b{batch}"] = batch * NEW_TOKENS / dt
        if batch == 1:
            row["tokens_b1"] = list(outs[0].outputs[0].token_ids)
    stats = prophet_stats(llm)
    if stats:
        s = stats[0]
        row |= {"slots": s["slots"], "expert_bytes": s["expert_bytes"], "layers": s["num_layers"],
                "experts": s["num_experts"], "prophet": s["total"]}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="off, prophet:<buffer>, offload")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    ap.add_argument("--out-dir", default=None, help="JSON rows and logs (default bench/results)")
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.model)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_vllm.py needs a GPU (the CPU path is tested by tests/test_vllm_plugin.py)")
    from bench.common import provenance, write_rows

    out = Path(args.out_dir or Path(__file__).parent / "results")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model = str(olmoe_dir(Path(tempfile.mkdtemp(prefix="prophet-vllm-"))))
    rows = []
    for name in args.configs:
        log = out / "logs" / f"vllm_{name.replace(':', '_')}.log"
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name, "--model", model], capture_output=True,
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
              f"tok/s {row.get('tok_s_b1', float('nan')):.1f} / {row.get('tok_s_b32', float('nan')):.1f}"
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
    base = next((r for r in rows if r["config"] == "off" and r.get("kv_tokens")), None)
    kv_bytes_per_token = 16 * 2 * 16 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16
    for r in rows:
        if base and r is not base and r.get("kv_tokens") and "slots" in r:
            freed = (r["layers"] * r["experts"] - r["slots"]) * r["expert_bytes"]
            r["kv_tokens_predicted_gain"] = freed / kv_bytes_per_token
            r["kv_tokens_gain"] = r["kv_tokens"] - base["kv_tokens"]
            r["gain_ratio"] = r["kv_tokens_gain"] / r["kv_tokens_predicted_gain"]
        if base and r is not base and "tokens_b1" in r:
            r["tokens_identical_to_off"] = r["tokens_b1"] == base.get("tokens_b1")
    print(f"\n{'config':14s}{'model GiB':>10s}{'KV tokens':>12s}{'gain':>10s}{'predicted':>11s}{'ratio':>7s}"
          f"{'tok/s B=1':>11s}{'tok/s B=32':>12s}{'same tokens':>12s}")
    for r in rows:
        g = r.get("kv_tokens_gain")
        print(f"{r['config']:14s}{r['model_GiB'] or float('nan'):>10.2f}{r['kv_tokens'] or 0:>12,d}"
              f"{g if g is not None else '-':>10}{r.get('kv_tokens_predicted_gain', float('nan')):>11.0f}"
              f"{r.get('gain_ratio', float('nan')):>7.3f}{r.get('tok_s_b1', float('nan')):>11.1f}"
              f"{r.get('tok_s_b32', float('nan')):>12.1f}{str(r.get('tokens_identical_to_off', '-')):>12s}")
    prov = provenance(torch.device("cuda"))
    try:
        import vllm

        prov["vllm"] = vllm.__version__
    except ImportError:
        pass
    for r in rows:
        r.update(prov, note="dummy weights: routing degenerate, decode speed is not a hit-rate result")
    print(f"rows -> {write_rows('bench_vllm', rows, str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
