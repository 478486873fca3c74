"""``prophet bench cpu-experts``: one MoE layer's routed experts computed on this host's CPU.

For each shape (the published OLMoE-1B-7B, Mixtral-8x7B and Qwen3-30B-A3B experts), batch and
backend: a layer call of B tokens routed uniformly to top-k, every expert it uses computed on the CPU
(what ``miss: cpu`` does with the misses it keeps there). Backends:

    native      Prophet's CPU experts (``cpu/cpu_experts.cpp``, its own thread pool), bf16, fp32 and int4
                (the store's int4 rows: groups of 128, fp32 scales; bf16 activations)
    torch       torch's CPU matmuls per expert (``CpuExperts`` backend "torch"; int4: dequantized per call)
    torch-int8  torch's weight-only int8 CPU op (``_weight_int8pack_mm``, per-channel scales): a reference
    torch-int4  torch's weight-only int4 CPU op (``_weight_int4pack_mm_for_cpu``, groups of 32): a reference

kt-kernel (KTransformers' CPU MoE kernels) pins torch 2.9.1 and does not install beside vLLM 0.32's
torch 2.13: not run here. Each row: shape, backend, dtype, batch, threads, unique experts, median
microseconds, weight bytes read, GB/s of weight bytes, the machine's read rate measured in the same run
(the pool's threads reading the layer's weights once, just before) and the share of it reached,
GFLOP/s; with device, versions, commit and date. Rows go to bench/results/cpu_experts.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # published configs: allenai/OLMoE-1B-7B-0924, mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B
    "olmoe": dict(E=64, k=8, H=2048, I=1024),
    "mixtral": dict(E=8, k=2, H=4096, I=14336),
    "qwen3": dict(E=128, k=8, H=2048, I=768),
}
BATCHES = (1, 4, 16, 64)
BACKENDS = ("native", "torch", "torch-int8", "torch-int4")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int4": torch.bfloat16}  # (int4: its activations' dtype)
INT4_GROUP = 32  # the torch-int4 reference's groups (its CPU op's smallest)
STORE_INT4_GROUP = 128  # Prophet's int4 store (its default)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _provenance(threads: int) -> dict:
    from prophet_kernels.cpu import native
    from prophet_kernels.provenance import git_commit, utc_now

    return {"device": cpu_name(), "cpus": len(__import__("os").sched_getaffinity(0)), "threads": threads,
            "isa": native.isa() if native.is_available() else [], "torch": torch.__version__, "commit": git_commit(),
            "date": utc_now()}


class _QuantizedExperts:
    """The torch weight-only int8 / int4 references: each expert's two matrices quantized once, the
    same per-expert loop as the torch backend."""

    def __init__(self, w13, w2, bits: int):
        self.bits, self.I = bits, w2.shape[2]
        self.mats = [(self._q(w13[e]), self._q(w2[e])) for e in range(w13.shape[0])]
        self.nbytes = sum(self._bytes(m) for pair in self.mats for m in pair)

    def _q(self, w):
        w = w.float()
        N, K = w.shape
        if self.bits == 8:
            s = w.abs().amax(1).clamp_min(1e-8) / 127
            return (torch.round(w / s[:, None]).to(torch.int8), s.to(torch.bfloat16))
        g = w.view(N, K // INT4_GROUP, INT4_GROUP)
        mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((mx - mn) / 15).clamp_min(1e-8)
        q = ((g - mn) / scale).round().clamp(0, 15).to(torch.int32).view(N, K)
        sz = torch.stack([scale.squeeze(-1).t(), (mn + 8 * scale).squeeze(-1).t()], -1).contiguous().to(torch.bfloat16)
        return (torch._convert_weight_to_int4pack_for_cpu(q, 1), sz)

    def _bytes(self, m):
        return sum(t.numel() * t.element_size() for t in m)

    def _mm(self, x, m):
        if self.bits == 8:
            return torch._weight_int8pack_mm(x, m[0], m[1])
        return torch._weight_int4pack_mm_for_cpu(x, m[0], INT4_GROUP, m[1])

    def __call__(self, x, ids, weights):
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        flat = ids.reshape(-1)
        tok = torch.arange(x.shape[0]).repeat_interleave(ids.shape[1])
        for e in torch.unique(flat).tolist():
            sel = flat == e
            h = self._mm(x[tok[sel]], self.mats[e][0])
            a = (F.silu(h[:, :self.I].float()) * h[:, self.I:].float()).to(x.dtype)
            y.index_add_(0, tok[sel], self._mm(a, self.mats[e][1]).float() * weights.reshape(-1)[sel, None])
        return y


def _routing(T: int, E: int, k: int, g):
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(T, k, generator=g) + 0.1
    return ids, (w / w.sum(1, keepdim=True)).float()


def run(shapes, batches, backends, dtypes, threads: int, reps: int, out_dir=None, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from prophet_kernels.benchmark.common import write_rows
    from prophet_kernels.cpu import CpuExperts, pairs_of
    from prophet_kernels.memory.store import HostExpertStore

    torch.set_num_threads(threads)  # (this benchmark's process: torch's backends run at the same thread count)
    prov = _provenance(threads)
    rows = []
    jobs = [(s, d) for s in shapes for d in dtypes]
    bar = tqdm(total=len(jobs) * len(backends) * len(batches), desc="cpu-experts", disable=not progress)
    for shape, dname in jobs:
        c, dtype = SHAPES[shape], DTYPES[dname]
        E, k, H, I = c["E"], c["k"], c["H"], c["I"]
        g = torch.Generator().manual_seed(0)
        w13 = torch.randn(1, E, 2 * I, H, generator=g).mul_(H ** -0.5).to(dtype)
        w2 = torch.randn(1, E, H, I, generator=g).mul_(I ** -0.5).to(dtype)
        quantize = {"expert_dtype": "int4", "group_size": STORE_INT4_GROUP} if dname == "int4" else {}
        store = HostExpertStore.from_tensors(w13, w2, pin=False, **quantize)
        del w13, w2
        reader = CpuExperts(store, threads, "native")
        layer_block = store.blocks[0]

        def read_gbps():
            return layer_block.numel() * layer_block.element_size() / reader.read_seconds(layer_block) / 1e9

        for backend in backends:
            quant = None
            if backend.startswith("torch-int"):
                if dname != "bf16":
                    bar.update(len(batches))
                    continue
                quant = _QuantizedExperts(store.w13[0], store.w2[0], int(backend[-1]))
            cpu = CpuExperts(store, threads, backend) if quant is None else None
            for T in batches:
                ids, weights = _routing(T, E, k, g)
                x = torch.randn(T, H, generator=g).to(dtype)
                used = sorted(set(ids.flatten().tolist()))
                if quant is None:
                    token_index, offsets, rows_, pw = pairs_of(ids.numpy(), weights.numpy(), used)
                    xs = x[torch.from_numpy(token_index)].contiguous()

                    def call():
                        cpu.submit(0, xs, used, offsets, rows_, pw)
                        return cpu.join()[1]
                else:
                    def call():
                        t = time.perf_counter()
                        quant(x, ids, weights)
                        return time.perf_counter() - t
                bytes_read = (len(used) * store.expert_bytes if quant is None
                              else len(used) * quant.nbytes // E)
                call()  # warm-up
                n = max(2, min(reps, int(2.0 / max(call(), 1e-4))))  # ~2 s per row at most
                times, reads = [], []
                for _ in range(n):
                    reads.append(read_gbps())
                    times.append(call())
                s = statistics.median(times)
                rd = statistics.median(reads)
                gbps = bytes_read / s / 1e9
                rows.append({"shape": shape, "backend": backend, "dtype": "int8" if backend == "torch-int8" else
                             "int4" if backend == "torch-int4" else dname, "batch": T, "threads": threads,
                             "unique_experts": len(used), "us": s * 1e6, "weight_bytes": bytes_read,
                             "gbps": gbps, "read_gbps": rd, "pct_read": 100 * gbps / rd,
                             "gflops": T * k * 6 * H * I / s / 1e9, "reps": n, **prov})
                bar.update(1)
            if cpu is not None:
                cpu.close()
        reader.close()
        del store
    bar.close()
    path = write_rows("cpu_experts", rows, out_dir)
    return rows, path


def table(rows) -> str:
    head = f"{'shape':8} {'backend':10} {'dtype':5} {'B':>3} {'experts':>7} {'us':>9} {'GB/s':>6} {'read GB/s':>9} " \
           f"{'% read':>6} {'GFLOP/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:8} {r['backend']:10} {r['dtype']:5} {r['batch']:>3} {r['unique_experts']:>7} "
                     f"{r['us']:>9.0f} {r['gbps']:>6.1f} {r['read_gbps']:>9.1f} {r['pct_read']:>6.0f} "
                     f"{r['gflops']:>8.0f}")
    return "\n".join(lines)


def measured_rates(shape: str, dtype: str = "bf16", path=None) -> dict | None:
    """This host's rates for ``shape`` from the latest rows of bench/results/cpu_experts.jsonl: the
    native backend's GB/s at batch 1 and GFLOP/s at its largest batch, the read rate beside them;
    None where there are none (another CPU's rows do not count)."""
    import json
    from pathlib import Path

    from prophet_kernels.benchmark.common import RESULTS_DIR

    path = Path(path) if path else RESULTS_DIR / "cpu_experts.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["shape"] == shape and r["backend"] == "native" and r["dtype"] == dtype
            and r["device"] == cpu_name()]
    if not rows:
        return None
    latest = max(r["date"][:10] for r in rows)
    rows = [r for r in rows if r["date"][:10] == latest]
    one = [r for r in rows if r["batch"] == 1]
    big = max(rows, key=lambda r: r["batch"])
    if not one:
        return None
    return {"cpu_gbps": statistics.median(r["gbps"] for r in one), "cpu_gflops": big["gflops"],
            "dram_gbps": statistics.median(r["read_gbps"] for r in one),
            "source": f"{path} ({cpu_name()}, {rows[0]['threads']} threads, {latest})"}


def main(argv=None, prog: str = "prophet bench cpu-experts") -> int:
    from prophet_kernels.cpu import available_cpus

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--threads", type=int, default=available_cpus(), help="CPU threads (default: every core here)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per row (fewer where one takes long)")
    ap.add_argument("--out-dir", default=None, help="where cpu_experts.jsonl goes (default bench/results)")
    args = ap.parse_args(argv)
    if not 1 <= args.threads <= available_cpus():
        ap.error(f"--threads {args.threads}: this process may use 1..{available_cpus()} cores")
    if min(args.batch) < 1 or args.reps < 1:
        ap.error("--batch and --reps must be >= 1")
    rows, path = run(args.shapes, args.batch, args.backends, args.dtypes, args.threads, args.reps, args.out_dir)
    print(table(rows))
    print(f"\n{len(rows)} rows -> {path}")
    return 0
