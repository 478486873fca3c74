"""The frontier's arithmetic against numbers other systems reported (bench/results/frontier_check.md).

Each report below is a setup the frontier can express: a model, a GPU, a batch, where the routed experts
live and compute, the weights' bytes, and the host's memory as the report states it. The prediction is
``planner.frontier``'s own arithmetic for that setup (``cpu_moe_seconds``: the same function as the table's
cpu-moe rows), with nothing fitted to the reported number:

    host read rate   memory channels x transfer rate x 8 bytes x sockets used x HOST_EFFICIENCY (one
                     fixed share of the DIMMs' peak for every row: the share the frontier's server-200
                     estimate assumes, ~200 of 307 GB/s), unless the report gives a measured figure
    host compute     cores x the FLOP/s per core this VM's native CPU backend measures (never the bound at
                     batch 1 here)
    weights          every weight at the report's file's average bytes per parameter (its file size /
                     the catalogue's parameter count)
    GPU              the catalogue's constants (datasheet x the H100's measured share where not measured)

A report that does not state its host memory, or how the model is split, is listed "not checkable",
never fitted. The error is (predicted - reported) / reported; where it is above 30% the note says which
term is off, from the rate the report implies for the CPU part (its step minus the predicted GPU part).

    .venv/bin/python bench/frontier_check.py            # -> bench/results/frontier_check.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "results" / "frontier_check.md"
HOST_EFFICIENCY = 200.0 / 307.2  # the frontier's server-200 estimate: ~200 GB/s read of 8 x DDR5-4800 (307 peak)
KT = "https://github.com/kvcache-ai/ktransformers/blob/main/doc/en/DeepseekR1_V3_tutorial.md"
Q4KM_DSV3_BYTES = 404.43e9  # DeepSeek-V3(-0324) Q4_K_M GGUF, bartowski's listing (huggingface.co/bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF)
Q4KM_QWEN3_30B_BYTES = 17.28e9  # Qwen3-30B-A3B Q4_K_M GGUF ("original Q4_K_M (17.28 GB)": huggingface.co/GOBA-AI-Labs/PrunedHub-Qwen3-30B-A3B-EN-80pct-MxMoE)
MXFP4_GPT_OSS_20B_BYTES = 12.1e9  # gpt-oss-20b MXFP4 GGUF, bartowski's listing (huggingface.co/bartowski/openai_gpt-oss-20b-GGUF)
LLMFIT = "https://github.com/AlexsJones/llmfit/pull/"
# GPUs of the reports that the catalogue does not hold: datasheet figures x the H100's measured/datasheet ratios, as
# planner.frontier.gpu_constants does for the catalogue's unmeasured GPUs (NOT measured)
_RATIO = 2999.5 / 3350.0
EXTRA_GPUS = {"RTX2080-8GB": {"hbm_gbps": 448.0 * _RATIO, "pcie_gbps": 12.0, "tflops": 40.3 * 680.47 / 989.4,
                              "source": "NOT measured: datasheet 448 GB/s, 40.3 fp16 TFLOP/s (fp32 accumulate), PCIe 3.0"}}


@dataclasses.dataclass
class Report:
    system: str
    source: str
    model: str
    top_k: int  # experts per token as run (KTransformers' "6 experts": top-6 of DeepSeek-V3's 8)
    gpu: str
    file_bytes: float | None  # the weights' file (its average bytes per parameter); None: not stated
    channels: int | None  # DIMM channels per socket; None: not stated
    mts: int | None  # DIMM transfer rate (MT/s)
    sockets: int  # sockets whose memory the experts are read from
    cores: int
    placement: str  # "all-cpu": every routed expert on the CPU (cpu-moe N = L); "n-cpu-moe": n_cpu layers'; else not
    reported_tok_s: float
    what: str
    n_cpu: int | None = None  # --n-cpu-moe N
    read_gbps: float | None = None  # the host's read rate as the report measured it (in place of channels x MT/s)


REPORTS = [
    Report("KTransformers 0.2.1", KT + " (V0.2.1, 8 experts, prompt 'hi')", "DeepSeek-V3", 8, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 2, 64, "all-cpu", 13.4, "decode, 2-token prompt"),
    Report("KTransformers 0.2.1", KT + " (V0.2.1, 8 experts, 1K prompt)", "DeepSeek-V3", 8, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 2, 64, "all-cpu", 13.5, "decode, 969-token prompt"),
    Report("KTransformers 0.2.1", KT + " (V0.2.1, 6 experts, prompt 'hi')", "DeepSeek-V3", 6, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 2, 64, "all-cpu", 16.8, "decode, 2-token prompt, top-6"),
    Report("KTransformers 0.2", KT + " (V0.2, dual socket, 8 experts)", "DeepSeek-V3", 8, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 2, 64, "all-cpu", 12.208, "decode, 500-token prompt (a 4090D)"),
    Report("KTransformers 0.2", KT + " (V0.2, single socket, 8 experts)", "DeepSeek-V3", 8, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 1, 32, "all-cpu", 8.73, "decode, 500-token prompt, one socket (a 4090D)"),
    Report("KTransformers 0.2", KT + " (V0.2, single socket, 6 experts)", "DeepSeek-V3", 6, "RTX4090-24GB",
           Q4KM_DSV3_BYTES, 8, 4800, 1, 32, "all-cpu", 10.303, "decode, 500-token prompt, one socket, top-6"),
    Report("llama.cpp (llmfit community bench)", LLMFIT + "755 (generation speed the server measured)", "Qwen3-30B-A3B", 8,
           "RTX2080-8GB", Q4KM_QWEN3_30B_BYTES, 4, None, 1, 10, "n-cpu-moe", 36.7,
           "decode, -ngl 99 --n-cpu-moe 36, i9-10900X", n_cpu=36, read_gbps=102.0),
    Report("llama.cpp (llmfit community bench)", LLMFIT + "775 (average with the prompt: a lower bound of decode)",
           "gpt-oss-20b", 4, "RTX2080-8GB", MXFP4_GPT_OSS_20B_BYTES, 4, None, 1, 10, "n-cpu-moe", 36.4,
           "average incl. the prompt, --n-cpu-moe 12, i9-10900X (its DDR4 as measured in #755)", n_cpu=12,
           read_gbps=102.0),
    Report("vLLM expert cache (PR 37190, --moe-expert-cache-size)", "https://github.com/vllm-project/vllm/pull/37190",
           "DeepSeek-V2", 6, "H100-80GB", None, None, None, 1, 0, "not stated", 0.0,
           "LRU expert cache over pinned host memory; the thread states no decode speed with its host and GPU"),
    Report("llama.cpp (in KTransformers' table)", KT + " (V0.2, llama.cpp 8 experts, 2 x 32 cores)", "DeepSeek-V3", 8,
           "RTX4090-24GB", Q4KM_DSV3_BYTES, 8, 4800, 2, 64, "not stated", 4.51,
           "decode, 500-token prompt; how llama.cpp split the model between the GPU and the CPU is not stated"),
    Report("llama.cpp (loftllc.dev Scout benchmark)",
           "https://loftllc.dev/en/docs/tech/llm-research/llama-4-scout-17b-16e-cpu-vs-gpu-benchmark/", "Llama-4-Scout", 1,
           "no GPU", None, 12, 6400, 1, 16, "no GPU", 16.3,
           "Q6_K, every weight on an EPYC 9175F (12 ch DDR5-6400), decode 16.3-17.5 tok/s; no GPU, so no row of the "
           "frontier's (its 16.1B active parameters x 0.82 B imply a 216-232 GB/s read, 35-38% of peak)"),
]


def predict(r: Report) -> dict:
    from prophet_kernels.planner import frontier as fr
    from prophet_kernels.planner.catalog import get_model
    from prophet_kernels.planner.memory import count_params, routed_expert_params

    if r.placement not in ("all-cpu", "n-cpu-moe") or r.file_bytes is None or (r.channels is None and not r.read_gbps):
        return {"checkable": False}
    base = get_model(r.model)
    m = dataclasses.replace(base, moe=dataclasses.replace(base.moe, top_k=r.top_k))
    bpp = r.file_bytes / sum(count_params(base).values())
    rates = fr.cpu_targets(fr.routing_proxy(m)[0])["this-vm"]  # this VM's measured per-core FLOP/s, call time
    per_core = rates["gflops_per_core"]
    peak = r.read_gbps if r.read_gbps else r.channels * r.mts * 8 / 1000 * r.sockets
    cpu = {"cpu_gbps": r.read_gbps or peak * HOST_EFFICIENCY, "cpu_gflops": per_core * r.cores, "call_us": rates["call_us"]}
    L = m.moe_layers
    n = L if r.n_cpu is None else r.n_cpu
    gpu = EXTRA_GPUS.get(r.gpu)
    step = fr.cpu_moe_seconds(m, r.gpu, 1, r.top_k, n, cpu, gpu_rates=gpu, weight_bpp=bpp)
    gpu_part = fr.cpu_moe_gpu_seconds(m, r.gpu, 1, r.top_k, n, gpu_rates=gpu, weight_bpp=bpp)
    cpu_bytes = n * r.top_k * routed_expert_params(m) * bpp
    implied = cpu_bytes / (1 / r.reported_tok_s - gpu_part - n * cpu["call_us"] * 1e-6) / 1e9
    # the same setup at the share of the DIMMs' read rate the frontier's int4 CPU rows assume (server-200 int4:
    # this VM's native int4 kernel's measured share of its read rate, at batch 1)
    int4 = fr.cpu_targets(fr.routing_proxy(m)[0], dtype="int4")["server-200"]
    int4_share = int4["cpu_gbps"] / int4["dram_gbps"]
    cpu4 = cpu | {"cpu_gbps": cpu["cpu_gbps"] * int4_share}
    step4 = fr.cpu_moe_seconds(m, r.gpu, 1, r.top_k, n, cpu4, gpu_rates=gpu, weight_bpp=bpp)
    return {"predicted_int4_share": 1 / step4, "error_int4_share": (1 / step4 - r.reported_tok_s) / r.reported_tok_s,
            "int4_share": int4_share, "checkable": True, "bpp": bpp, "peak_gbps": peak, "cpu_gbps": cpu["cpu_gbps"], "gpu_ms": gpu_part * 1e3,
            "cpu_ms": (step - gpu_part) * 1e3, "predicted": 1 / step, "error": (1 / step - r.reported_tok_s) / r.reported_tok_s,
            "implied_cpu_gbps": implied, "cpu_gb_per_token": cpu_bytes / 1e9}


def render(rows: list[tuple[Report, dict]]) -> str:
    out = ["# The frontier against reported numbers", "",
           "Generated by `bench/frontier_check.py` (its docstring: what is assumed, what is not fitted). Host read rate: "
           f"channels x MT/s x 8 B x sockets x {HOST_EFFICIENCY:.3f} (one fixed share of peak for every row). "
           "Prediction: `planner.frontier.cpu_moe_seconds` with every routed expert on the CPU (cpu-moe N = L). "
           "Last column: the same at the share of that read rate the frontier's int4 CPU rows assume (this VM's native "
           f"int4 kernel's measured share at batch 1: {rows[0][1].get('int4_share', 0):.0%}), a second fixed share.", "",
           "| system | model, setup | reported tok/s | predicted tok/s | error | GPU part (ms) | CPU part (ms) | "
           "CPU GB per token | host read assumed (GB/s) | implied by the report (GB/s) | predicted at the int4 CPU "
           "share (error) | source |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r, p in rows:
        if not p["checkable"]:
            out.append(f"| {r.system} | {r.model} top-{r.top_k}, {r.gpu}, {r.what} | {r.reported_tok_s or 'none'} | not checkable "
                       f"| | | | | | | | {r.source} |")
            continue
        host = (f"{r.channels} ch DDR4 read {r.read_gbps:g} GB/s as measured" if r.read_gbps else
                f"{r.sockets} x {r.channels} ch DDR5-{r.mts}")
        out.append(f"| {r.system} | {r.model} top-{r.top_k}, {r.gpu}, {host}, "
                   f"{r.cores} cores, {r.what} | {r.reported_tok_s} | {p['predicted']:.1f} | {p['error']:+.0%} | "
                   f"{p['gpu_ms']:.1f} | {p['cpu_ms']:.1f} | {p['cpu_gb_per_token']:.1f} | {p['cpu_gbps']:.0f}"
                   + ("" if r.read_gbps else f" of {p['peak_gbps']:.0f} peak") + f" | {p['implied_cpu_gbps']:.0f} |"
                   f" {p['predicted_int4_share']:.1f} "
                   f"({p['error_int4_share']:+.0%}) | {r.source} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    rows = [(r, predict(r)) for r in REPORTS]
    text = render(rows)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
