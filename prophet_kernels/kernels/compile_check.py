"""Compile every Prophet Triton kernel for real GPUs on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which never lowers them to a GPU: a kernel
that the interpreter runs may still fail to compile for a GPU (an fp8 type the architecture lacks,
a construct the compiler rejects, a PDL intrinsic on a GPU without it), and without this check
the first sign of it would be a lent GPU's minutes. Triton compiles ahead of time for any target
without a device (its ptxas ships with it), so this module

1. records the kernels' launches (kernel, argument types, constexprs, launch options) of a
   workload that calls every public op in each of its kernel variants (unquantized fp16/bf16/fp32
   fp8 weights with both scale layouts and int4 codes with and without zero points, the GEMV and grouped paths with the tuned tables'
   configs, even and ragged K, read-through fills, the residency step in both policies and modes, the fills, the route
   plans of both sizes), under the interpreter with the kernels' bodies not run;
2. compiles each distinct launch for each target (``cuda:80`` A100, ``cuda:90`` H100/H200; any
   other with ``--arch``, e.g. 89 for L40S/L4) to a cubin in a fresh interpreter-free process, as
   the GPU would on the first call: specialized as Triton's JIT specializes on a GPU (unit strides
   as constants, 16-divisible pointers and sizes marked, so the kernels are pipelined as there),
   with the untuned defaults fitted to that target's shared memory and a shipped table's tiles
   only for its own GPU's target; a launch needing more shared memory than the target gives one
   block fails (Triton would refuse it: OutOfResources).

    python -m prophet_kernels.kernels.compile_check [--arch 80 90] [--every-config]

prints one line per kernel and target (variants compiled, failures, the most shared memory and
registers a variant needs, how many spill registers to local memory, the first failure's message)
and exits 1 on any failure (spills are reported, not failed: slow, not wrong). bf16 launches are the fp16 launches with the dtype substituted (the interpreter
cannot run bf16 dots, so the workload runs fp16); launches the CPU never makes (programmatic
dependent launch, Hopper only) are added for the targets that have it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time

import torch

ARCHS = (80, 90)  # A100; H100 / H200
# the most shared memory one block may use (opt-in), bytes (CUDA programming guide's table of compute
# capabilities: 163 KB on 8.0/8.7, 99 KB on 8.6/8.9, 227 KB on 9.0)
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_MODULE = "prophet_kernels.kernels.compile_check"


# ----------------------------------------------------------------------------- recording (phase 1)


def _arg_type(v) -> str | None:
    """Triton's signature type of a runtime argument (None: a constexpr)."""
    if isinstance(v, torch.Tensor):
        from triton._utils import canonicalize_dtype
        return "*" + canonicalize_dtype(v.dtype)
    if isinstance(v, bool):
        return "u1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _specialize(v, specialize: bool, align: bool):
    """(signature type, attribute key) of a runtime argument as Triton's JIT specializes it on a GPU:
    an int equal to 1 becomes a constexpr, ints and pointers divisible by 16 get "D" (divisibility
    16: vectorized loads, async copies, pipelining). None: Triton without the native specializer
    (types only)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    return native_specialize_impl(BaseBackend, v, False, specialize, align)


def _record(fn, args, kwargs, out: list, dont=(), dont_align=()) -> None:
    params = list(inspect.signature(fn).parameters.values())
    values = {p.name: a for p, a in zip(params, args)}
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values.get(p.name, p.default)
        if "constexpr" in str(p.annotation) or _arg_type(v) is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        spec = _specialize(v, p.name not in dont and i not in dont, p.name not in dont_align and i not in dont_align)
        kind, key = spec if spec is not None else (_arg_type(v), None)
        signature[p.name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[p.name] = key
        elif key:
            attrs[p.name] = key
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    out.append({"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                "constexprs": constexprs, "attrs": attrs, "options": options})


def record_launches(workload) -> list[dict]:
    """The distinct kernel launches ``workload()`` makes (under the interpreter; bodies not run)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 (set before triton is imported)")
    from triton.runtime.interpreter import InterpretedFunction

    seen: list[dict] = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            _record(self.fn, args, kwargs, seen, self.kwargs.get("do_not_specialize") or (),
                    self.kwargs.get("do_not_specialize_on_alignment") or ())

    InterpretedFunction.run = run
    try:
        workload()
    finally:
        InterpretedFunction.run = real
    unique = {json.dumps(r, sort_keys=True): r for r in seen}
    return list(unique.values())


def _experts(n, H, I, dtype, block):
    """(w13, w2, w13_scale, w2_scale) of n experts, contiguous tensors (fp8: with scales)."""
    from .fp8 import FP8, scale_shape

    if dtype != FP8:
        return torch.empty((n, 2 * I, H), dtype=dtype), torch.empty((n, H, I), dtype=dtype), None, None
    return (torch.empty((n, 2 * I, H), dtype=FP8), torch.empty((n, H, I), dtype=FP8),
            torch.ones((n, *scale_shape(2 * I, H, block))), torch.ones((n, *scale_shape(H, I, block))))


def _moe_calls(dtype, weights: str, shape, cfg, T, k=2, read=False):
    """One fused_experts_paged call (outputs not computed: the kernels' bodies are not run);
    ``read``: with a read-through fill from a source of the slots' layout."""
    from .fp8 import FP8
    from .moe import fused_experts_paged
    from .residency import ReadThrough

    E, H, I, S, block = shape
    if weights.startswith("int4"):  # block: the group size; "int4-zp": with zero points
        def codes(n, k):  # [S, n, k/2] codes, [S, n, k/G] scales, zero points
            return (torch.zeros((S, n, k // 2), dtype=torch.uint8), torch.ones((S, n, k // block)),
                    torch.zeros((S, n, k // block), dtype=torch.uint8) if weights == "int4-zp" else None)
        (w13, s13, z13), (w2, s2, z2) = codes(2 * I, H), codes(H, I)
        kw = dict(w13_scale=s13, w2_scale=s2, w13_zeros=z13, w2_zeros=z2, group_size=block)
    else:
        wdtype = FP8 if weights == "fp8" else dtype
        w13, w2, s13, s2 = _experts(S, H, I, wdtype, block)
        kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block) if weights == "fp8" else {}
        if read:
            kw["read_through"] = ReadThrough(*_experts(E, H, I, wdtype, block),
                                             torch.zeros((E + 1, 2), dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    ids = torch.arange(T * k, dtype=torch.int32).view(T, k) % E
    pt = torch.arange(E, dtype=torch.int32) % S
    fused_experts_paged(torch.randn(T, H, dtype=dtype), w13, w2, pt, torch.rand(T, k), ids, check=False,
                        config=cfg, **kw)


# the compute capability of the GPUs whose tuned tables ship (configs/<device>.json); a table of a GPU
# not listed here is compiled for every target
_TABLE_ARCH = {"H100": 90, "H200": 90, "H800": 90, "H20": 90, "A100": 80, "A800": 80, "L40": 89, "L4": 89}


def _table_arch(file_name: str) -> int | None:
    words = file_name.removesuffix(".json").replace("-", "_").split("_")
    return next((a for gpu, a in _TABLE_ARCH.items() if gpu in words), None)


def tuned_configs() -> dict[int | None, list[tuple[int, dict, torch.dtype]]]:
    """(T, config, activations' dtype as the CPU launches it) of every distinct config in the
    shipped tables, by the compute capability of the tables' GPU (a table's tiles run only there)."""
    from .launch_config import CONFIG_DIR

    found: dict[int | None, dict] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for key, table in json.loads(path.read_text()).items():
            act = dict(f.split("=") for f in key.split(","))["dtype"]
            dtype = torch.float32 if act == "float32" else torch.float16  # (bf16: as fp16, see _with_variants)
            for t, cfg in table.items():
                found.setdefault(_table_arch(path.name), {}).setdefault(
                    json.dumps([cfg, str(dtype)], sort_keys=True), (int(t), cfg, dtype))
    return {arch: list(configs.values()) for arch, configs in found.items()}


def default_configs(arch: int) -> list[tuple[int, dict, torch.dtype]]:
    """The untuned GPU defaults (OLMoE's E and k) of each batch class, fitted to ``arch``'s shared
    memory for each activation dtype, as ``launch_config.default_config`` makes them on that GPU."""
    from .launch_config import _SMEM_BUDGET, fitted_default

    limit = SHARED_LIMIT.get(arch, _SMEM_BUDGET)
    return [(t, fitted_default(t, 8, 64, dtype, limit), dtype)
            for t in (1, 4, 16, 256, 4096) for dtype in (torch.float16, torch.float32)]


def moe_workload(configs) -> None:
    """The MoE ops' kernel variants at the given (T, config, dtype)s: unquantized weights, fp8 with
    both scale layouts, int4 at groups of 32 and 128 with and without zero points, read-through
    fills; even and ragged K."""
    even = (8, 256, 128, 4, None)  # E, H, I, S, block: every tile's K divides H and I
    ragged = (8, 200, 72, 4, None)
    for T, cfg, dtype in configs:
        for shape in (even, ragged):
            _moe_calls(dtype, "same", shape, cfg, min(T, 4))
        if dtype == torch.float32:  # fp8 weights and read-through fills: with 16-bit activations
            continue
        for group, weights in ((32, "int4"), (128, "int4-zp")):  # int4 codes, both zero-point kinds
            _moe_calls(dtype, weights, (8, 256, 128, 4, group), cfg, min(T, 4))
        for block in (None, (128, 128), (16, 16)):
            _moe_calls(dtype, "fp8", (8, 256, 128, 4, block), cfg, min(T, 4))
            if not cfg.get("gemv"):  # W8A8 (fp8 activations, where the GPU has an fp8 type)
                _moe_calls(dtype, "fp8", (8, 256, 128, 4, block), {**cfg, "a8": True}, min(T, 4))
        for weights, block in (("same", None), ("fp8", None), ("fp8", (128, 128))):  # read-through fills
            for shape in ((8, 256, 128, 4, block), (8, 200, 72, 4, None)):
                if weights == "same" or shape[4] == block:
                    _moe_calls(dtype, weights, shape, cfg, min(T, 4), read=True)


def other_workload() -> None:
    """The route plans (one fused launch; the three-launch plan of large batches), the residency
    step in both policies and modes, the fills."""
    from .residency import DEMAND, LRU, NEXT_USE, PREFETCH, ResidencyState, fill_slots, residency_step
    from .route_plan import route_plan

    for N in (16, 1 << 16):
        route_plan(torch.zeros((N, 2), dtype=torch.int32), 8, 16, torch.arange(8, dtype=torch.int32), num_slots=8)
    for policy in (LRU, NEXT_USE):
        state = ResidencyState.empty(2, 8, 4, "cpu", policy)
        fills, count = torch.zeros((9, 2), dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        for mode in (DEMAND, PREFETCH):
            residency_step(state, 0, torch.arange(4, dtype=torch.int32), mode, fills, count, budget=4)
    fill_slots(torch.empty((8, 1000), dtype=torch.uint8), torch.empty((4, 1000), dtype=torch.uint8), fills, count)


def workload_records(archs=ARCHS) -> list[dict]:
    """Every kernel variant the public ops launch (see the module docstring) on each of ``archs``:
    launches with a target's own tiles (its fitted defaults, a shipped table of its GPU) carry
    its compute capability (``min_arch`` = ``max_arch``)."""
    records = record_launches(other_workload)
    for arch in archs:
        records += [{**r, "min_arch": arch, "max_arch": arch}
                    for r in record_launches(lambda: moe_workload(default_configs(arch)))]
    for arch, configs in tuned_configs().items():
        tag = {} if arch is None else {"min_arch": arch, "max_arch": arch}
        records += [{**r, **tag} for r in record_launches(lambda: moe_workload(configs))]
    return records


def arch_records(archs=ARCHS) -> list[dict]:
    """The workload's launches as each GPU makes them: fp8 weights as fp8 (``min_arch`` 89), and as
    uint8 bytes decoded in the kernel (``max_arch`` 88: A100; ``fp8.has_fp8_type``)."""
    from . import fp8

    native = workload_records(archs)
    real = fp8.has_fp8_type
    fp8.has_fp8_type = lambda device: False
    try:
        as_bytes = workload_records(archs)
    finally:
        fp8.has_fp8_type = real
    tagged = [{**r, "min_arch": max(89, r.get("min_arch", 0))} if "*fp8e4nv" in r["signature"].values() else r
              for r in native]
    tagged += [{**r, "max_arch": min(88, r.get("max_arch", 88))} for r in as_bytes if r["constexprs"].get("FP8_BITS")]
    return [r for r in {json.dumps(r, sort_keys=True): r for r in tagged}.values()
            if r.get("min_arch", 0) <= r.get("max_arch", 999)]


_TILES = ("BM", "BN", "BK", "GROUP_M", "K_PAD", "CHUNK", "BLOCK")


def structural(records: list[dict]) -> list[dict]:
    """One record per kernel variant up to tile sizes and launch options (what the quick check
    compiles): the first one seen, i.e. the shipped tables' tiles where they have the variant."""
    out = {}
    for r in records:
        key = json.dumps([r["kernel"], r["signature"], {k: v for k, v in r["constexprs"].items() if k not in _TILES},
                          r.get("min_arch", 0), r.get("max_arch", 0)], sort_keys=True)
        out.setdefault(key, r)
    return list(out.values())


def _with_variants(records: list[dict]) -> list[dict]:
    """bf16 copies of the fp16 launches, and the GEMV kernels' PDL launches (never made on a CPU)."""
    out = list(records)
    for r in records:
        if any(t in ("*fp16",) for t in r["signature"].values()):
            out.append({**r, "signature": {k: ("*bf16" if t == "*fp16" else t) for k, t in r["signature"].items()}})
    for r in list(out):
        if r["kernel"] == "_gemv_down_kernel" and r["constexprs"].get("PDL") == 0:
            for level in (1, 2):
                out.append({**r, "constexprs": {**r["constexprs"], "PDL": level}, "options": {**r["options"], "launch_pdl": True},
                            "min_arch": 90})
        if r["kernel"] == "_gemv_gate_up_kernel" and not r["constexprs"].get("PDL"):
            out.append({**r, "constexprs": {**r["constexprs"], "PDL": True}, "min_arch": 90})
    out = [r for r in out if r.get("min_arch", 0) <= r.get("max_arch", 999)]
    return out


# ----------------------------------------------------------------------------- compiling (phase 2)


def compile_records(records: list[dict], arch: int) -> list[dict]:
    """Compile each record for ``cuda:<arch>``: the records with an ``error`` added where it failed.
    Runs without the interpreter (the kernels must be JITFunctions)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for r in records:
        if not r.get("min_arch", 0) <= arch <= r.get("max_arch", arch):
            continue
        fn = getattr(importlib.import_module(r["module"]), r["kernel"])
        attrs = {(fn.arg_names.index(name),): BaseBackend.parse_attr(key) for name, key in r.get("attrs", {}).items()}
        src = ASTSource(fn=fn, signature=r["signature"], constexprs=r["constexprs"], attrs=attrs)
        try:
            kernel = triton.compile(src, target=target, options=r["options"])
            shared = kernel.metadata.shared
            result = {**r, "arch": arch, "shared": shared, **_resources(kernel.asm["cubin"], r["kernel"])}
            if shared > SHARED_LIMIT.get(arch, shared):
                result["error"] = (f"needs {shared} bytes of shared memory, sm_{arch} allows {SHARED_LIMIT[arch]} "
                                   "per block (Triton would refuse the launch: OutOfResources)")
            results.append(result)
        except Exception as e:  # noqa: BLE001 (the message is the result)
            lines = [line for line in str(e).splitlines() if line.strip()]
            results.append({**r, "arch": arch, "error": lines[-1][:300] if lines else type(e).__name__})
    return results


def _resources(cubin: bytes, name: str) -> dict:
    """Registers per thread and spilled bytes per thread (local memory and stack) of a kernel's
    cubin, as ptxas allocated them (``cuobjdump --dump-resource-usage``, shipped with Triton); {}
    where the tool is missing."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {"registers": int(m[1]), "spilled": int(m[2]) + int(m[3])} if m else {}


def check(archs=ARCHS, every_config: bool = False, progress=print) -> list[dict]:
    """Record (this process, interpreter) and compile (a child process without it) for each arch;
    returns every compile result. ``every_config``: every tile configuration of the tables too
    (~15 min per arch on 2 cores), else one per kernel variant (``structural``)."""
    records = _with_variants(arch_records(archs))
    if not every_config:
        records = structural(records)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    procs = {arch: subprocess.Popen([sys.executable, "-m", _MODULE, "--compile", str(arch)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for arch in archs}  # one child per target, side by side
    results = []
    for arch, proc in procs.items():
        out, err = proc.communicate(json.dumps(records))
        if proc.returncode != 0:
            raise RuntimeError(f"compiling for cuda:{arch} failed to run:\n{err[-3000:]}")
        done = json.loads(out.strip().splitlines()[-1])
        results += done
        bad = [r for r in done if "error" in r]
        progress(f"cuda:{arch}: {len(done)} kernel variants compiled ({time.perf_counter() - t0:.0f} s), {len(bad)} failed")
    return results


def summary(results: list[dict]) -> str:
    """One line per (kernel, arch): variants, failures, the most shared memory and registers one
    variant needs, how many spill to local memory (slow, not wrong), the first failure's message."""
    rows = {}
    for r in results:
        key = (r["kernel"], r["arch"])
        n, bad, smem, regs, spills, msg = rows.get(key, (0, 0, 0, 0, 0, ""))
        rows[key] = (n + 1, bad + ("error" in r), max(smem, r.get("shared", 0)), max(regs, r.get("registers", 0)),
                     spills + (r.get("spilled", 0) > 0), msg or r.get("error", ""))
    lines = [f"{'kernel':<28} {'arch':>5} {'variants':>8} {'failed':>6} {'smem KiB':>8} {'regs':>4} {'spill':>5}  "
             "first error"]
    for (kernel, arch), (n, bad, smem, regs, spills, msg) in sorted(rows.items()):
        lines.append(f"{kernel:<28} {'sm_' + str(arch):>5} {n:>8} {bad:>6} {smem / 1024:>8.1f} {regs:>4} {spills:>5}  {msg}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="CUDA compute capabilities (default 80 90)")
    ap.add_argument("--every-config", action="store_true",
                    help="compile every tuned tile configuration too (default: one per kernel variant)")
    ap.add_argument("--compile", type=int, help=argparse.SUPPRESS)  # the child: records on stdin
    args = ap.parse_args(argv)
    if args.compile:
        print(json.dumps(compile_records(json.loads(sys.stdin.read()), args.compile)))
        return 0
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the recording runs under the interpreter, set before triton is imported: rerun so
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", _MODULE, *(argv if argv is not None else sys.argv[1:])],
                              env=env, check=False).returncode
    results = check(args.arch, args.every_config)
    print(summary(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
