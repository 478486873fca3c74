"""Decoders' inter-token time when a prefill chunk joins their step, with experts streamed (issue 43).

With ``miss: stream`` every step copies each layer's non-resident experts whatever the tokens, so a
prefill chunk that joins B decoders changes only the layers' compute: each layer takes the decode
layer time plus the chunk's FLOPs at the grouped GEMM's measured rate, while the copies run as
before. The step (the decoders' inter-token time) is the schedule's replay (``stream_step``) at that
layer time; the chunked-prefill size (vLLM's ``max_num_batched_tokens``) is the knob.

    python bench/stream_prefill.py [--model Mixtral-8x7B] [--gpu H100-80GB] [--capacity 0.25]
                                   [--dtype fp8] [--batch 64] [--chunks 0,512,2048,8192,32768]

Inputs: the frontier's decode layer time and PCIe (``planner.frontier``; the H100's measured, the
RTX 4090's not), and the chunk's compute rate: ``GROUPED_TFLOPS`` (the H100's measured; the RTX 4090's
an estimate from its datasheet, said so in each row). Prints a table; rows to
bench/results/stream_prefill.jsonl (simulation on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prophet_kernels.benchmark.common import write_rows  # noqa: E402
from prophet_kernels.memory.buffer import slots_for  # noqa: E402
from prophet_kernels.memory.stream import min_stream_slots  # noqa: E402
from prophet_kernels.planner import frontier as fr  # noqa: E402
from prophet_kernels.planner.catalog import get_model  # noqa: E402
from prophet_kernels.planner.memory import count_params  # noqa: E402
from prophet_kernels.provenance import git_commit, utc_now  # noqa: E402
from prophet_kernels.routing.simulator import stream_step  # noqa: E402

GROUPED_TFLOPS = {  # a prefill chunk's expert GEMMs (and the layer's dense parts) at this rate
    "H100-80GB": (500.0, "measured: Prophet's grouped GEMM, Mixtral T=4096, gate_up (PERF_NOTES, 2026-11)"),
    "RTX4090-24GB": (120.0, "ESTIMATE: 165 TFLOP/s bf16 dense (datasheet, fp32 accumulate) x the H100's "
                            "grouped/cuBLAS ratio (500/680)"),
}


def chunk_flops_per_layer(m, tokens: int) -> float:
    """A chunk's FLOPs in one MoE layer: its tokens through k experts (6 x H x I each) and the layer's
    dense weights (2 per parameter; attention's score FLOPs, small at these lengths, left out)."""
    p = count_params(m)
    dense = (sum(p.values()) - p["routed_experts"] - m.vocab * m.hidden * 2) / m.moe_layers
    return tokens * (m.moe.top_k * 6 * m.hidden * m.moe.intermediate + 2 * dense)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Mixtral-8x7B")
    ap.add_argument("--gpu", default="H100-80GB", choices=sorted(GROUPED_TFLOPS))
    ap.add_argument("--capacity", type=float, default=0.25, help="buffer: fraction of the experts (0: the ring alone)")
    ap.add_argument("--dtype", default="fp8", choices=["bf16", "fp8"])
    ap.add_argument("--batch", type=int, default=64, help="decoders in the step")
    ap.add_argument("--chunks", default="0,512,2048,8192,32768", help="prefill chunk sizes (tokens)")
    ap.add_argument("--out", help="folder for stream_prefill.jsonl (default bench/results)")
    a = ap.parse_args(argv)
    m = get_model(a.model)
    L, E = m.moe_layers, m.moe.experts
    slots = min_stream_slots(L, E) if a.capacity == 0 else slots_for(a.capacity, L, E)
    if slots < min_stream_slots(L, E):
        ap.error(f"--capacity {a.capacity}: {slots} slots, below the ring's {min_stream_slots(L, E)}")
    eb = fr.one_expert_bytes(m, a.dtype)
    pcie = fr.gpu_constants(a.gpu)["pcie_gbps"]
    decode_layer = fr.layer_seconds(m, a.gpu, E, a.dtype)  # a step of B >= 64 decoders needs every expert
    tflops, source = GROUPED_TFLOPS[a.gpu]
    rows, base = [], None
    print(f"{m.name} on {a.gpu}, {a.dtype} experts, {slots} slots, {a.batch} decoders; chunk compute at "
          f"{tflops:.0f} TFLOP/s ({source})")
    print(f"{'chunk tokens':>13s}{'layer us':>11s}{'step ms':>10s}{'vs no chunk':>13s}{'copy busy':>11s}")
    for c in (int(x) for x in a.chunks.split(",")):
        layer_s = decode_layer + chunk_flops_per_layer(m, c) / (tflops * 1e12)
        st = stream_step(L, E, slots, eb, pcie * 1e9, layer_s)
        base = base or st["step_s"]
        rows.append(dict(model=m.name, gpu=a.gpu, expert_dtype=a.dtype, slots=slots, decoders=a.batch, chunk=c,
                         layer_us=layer_s * 1e6, step_ms=st["step_s"] * 1e3, vs_no_chunk=st["step_s"] / base,
                         copy_busy=st["copy_busy"], pcie_gbps=pcie, chunk_tflops=tflops, chunk_tflops_source=source,
                         device="simulated on the CPU (the frontier's constants)", commit=git_commit(), date=utc_now()))
        print(f"{c:>13,d}{layer_s * 1e6:>11.0f}{st['step_s'] * 1e3:>10.1f}{st['step_s'] / base:>12.2f}x"
              f"{st['copy_busy']:>10.0%}")
    print(f"rows: {write_rows('stream_prefill', rows, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
