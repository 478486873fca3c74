"""Routed experts computed on host CPU cores from the host expert store (``miss: cpu``).

One layer call's CPU experts, as pairs grouped by expert (legend: H hidden, I intermediate, P pairs):

    x        [n, H]        store dtype, host: the rows of the layer's input that CPU experts read
    experts  [n_e]         their ids in the store (this rank's local ids)
    offsets  [n_e + 1]     int64: the pairs of expert j are offsets[j] .. offsets[j+1]
    rows     [P]           int32: the row of x of each pair
    weights  [P]           fp32: its routing weight
    -> y     [n, H]        fp32: sum over the pairs of each row of w * W2 @ (silu(Wg @ x) * (Wu @ x))

Backends: ``native`` (``cpu_experts.cpp``: its own thread pool, one call per layer call, the GIL
released; the default) and ``torch`` (torch's CPU matmuls on one Python worker thread, at torch's
global thread count, which vLLM's GPU worker sets to 1: a reference and a fallback). Both read the
store's tensors in place: the one host copy serves the link and the CPU. int4 stores (``kernels.int4``'s
rows: codes, group scales, zero points) are read as they are by the native backend, whose x may be
fp32, bf16 or fp16 (the model's dtype); the torch backend dequantizes each expert it computes.

``submit`` returns at once; ``join`` waits and returns (y, seconds the computation took). The
tensors of a submitted call are held until it is joined, so nothing the pool reads is freed under it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from . import native

BACKENDS = ("native", "torch")
SPIN_US = 200.0  # an idle pool thread polls this long for the next call before sleeping (native backend)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # cpu_experts.cpp's DType


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads) -> int:
    n = available_cpus()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= n:
        raise ValueError(f"cpu_threads={threads!r}: give a whole number in [1, {n}] (the cores this process may use)")
    return threads


SMALL = 1024  # routings of at most this many token-slots are split in Python lists (decode), larger in numpy


def route_counts(ids) -> tuple[list[int], list[int]]:
    """(the unique expert ids >= 0 of a routing, ascending; each one's token-slot count). ``ids``: a
    flat list of ints (a decode step's) or an integer array."""
    if isinstance(ids, list):
        counts: dict[int, int] = {}
        for e in ids:
            if e >= 0:
                counts[e] = counts.get(e, 0) + 1
        experts = sorted(counts)
        return experts, [counts[e] for e in experts]
    ids = np.asarray(ids).reshape(-1)
    experts, counts = np.unique(ids[ids >= 0], return_counts=True)
    return experts.tolist(), counts.tolist()


def pairs_of(ids, weights, cpu_experts, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CPU part of a layer call's routing. ``ids`` [T, k] (the store's expert ids, -1 for none) and
    ``weights`` [T, k] as arrays, or both flattened to lists with ``k`` given (a decode step: lists
    are faster there); ``cpu_experts`` sorted ids. Returns (token_index [n] int64: the tokens that have
    a CPU expert, ascending; offsets [n_e + 1] int64; rows [P] int32 into token_index; pair weights
    [P] fp32), pairs grouped by expert in ``cpu_experts``' order, tokens ascending within."""
    if isinstance(ids, list):
        col = {e: j for j, e in enumerate(cpu_experts)}
        buckets: list[list[int]] = [[] for _ in cpu_experts]
        for p, e in enumerate(ids):
            j = col.get(e)
            if j is not None:
                buckets[j].append(p)
        pos = [p for b in buckets for p in b]
        tokens = sorted({p // k for p in pos})
        row_of = {t: i for i, t in enumerate(tokens)}
        offsets = [0]
        for b in buckets:
            offsets.append(offsets[-1] + len(b))
        return (np.array(tokens, dtype=np.int64), np.array(offsets, dtype=np.int64),
                np.array([row_of[p // k] for p in pos], dtype=np.int32),
                np.array([weights[p] for p in pos], dtype=np.float32))
    T, k = ids.shape
    flat = ids.reshape(-1)
    cpu = np.asarray(cpu_experts, dtype=flat.dtype)
    pos = np.flatnonzero(np.isin(flat, cpu))
    order = np.argsort(flat[pos], kind="stable")  # by expert, then by position (token order)
    pos = pos[order]
    tokens = pos // k
    token_index, rows = np.unique(tokens, return_inverse=True)
    offsets = np.searchsorted(flat[pos], cpu, side="left").astype(np.int64)
    offsets = np.append(offsets, np.int64(len(pos)))
    return (token_index.astype(np.int64), offsets, rows.astype(np.int32),
            weights.reshape(-1)[pos].astype(np.float32))


class CpuExperts:
    """The CPU experts of a ``HostExpertStore`` (bf16, fp16 or fp32; one call at a time). ``cpus``: the
    CPUs the native pool's threads run on (``ProphetMoE`` passes the store's NUMA node's on a machine
    with several: the experts are read where they live)."""

    def __init__(self, store, threads: int, backend: str = "native", spin_us: float = SPIN_US,
                 cpus: list[int] | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"cpu backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.int4 = store.fmt.kind == "int4"
        if store.dtype not in DTYPE_CODES and not self.int4:
            raise ValueError(f"the CPU computes bf16, fp16, fp32 or int4 experts; this store holds {store.dtype} "
                             "(fp8 experts on the CPU: not yet)")
        check_threads(threads)
        H, I = store.hidden, store.intermediate
        pack = 2 if self.int4 else 1  # (int4: two codes a byte)
        for l, (a, b) in enumerate(zip(store.w13, store.w2)):
            if a.stride()[1:] != (H // pack, 1) or b.stride()[1:] != (I // pack, 1):
                raise ValueError(f"layer {l}: the CPU reads each expert's rows contiguously; w13 strides "
                                 f"{a.stride()}, w2 strides {b.stride()}")
        self.store, self.threads, self.backend = store, threads, backend
        self.num_experts = store.num_experts
        # the activations' dtype: the store's (int4: the caller's x, any of DTYPE_CODES; bf16 when measuring)
        self.act_dtype = torch.bfloat16 if self.int4 else store.dtype

        def addresses(tensors):  # every (layer, expert)'s matrix addresses, gathered per call
            return np.array([[t[e].data_ptr() for e in range(store.num_experts)] for t in tensors], dtype=np.int64)
        self._w13, self._w2 = addresses(store.w13), addresses(store.w2)
        if self.int4:
            q = [store.quant(l) for l in range(store.num_layers)]
            self._s13, self._s2 = addresses([x.w13_scale for x in q]), addresses([x.w2_scale for x in q])
            self._z13 = addresses([x.w13_zeros for x in q]) if store.fmt.zero_points else None
            self._z2 = addresses([x.w2_zeros for x in q]) if store.fmt.zero_points else None
        self._pending = None
        if backend == "native":
            so = native.lib()
            self.cpus = sorted(set(cpus)) if cpus else None  # the CPUs the pool's threads run on (None: any)
            arr = (ctypes.c_int * len(self.cpus))(*self.cpus) if self.cpus else None
            self._pool = so.prophet_cpu_pool_create(threads, int(spin_us * 1e3), arr, len(self.cpus or ()))
            if not self._pool:
                raise RuntimeError(f"creating a pool of {threads} CPU threads failed")
            self._finalizer = weakref.finalize(self, so.prophet_cpu_pool_destroy, self._pool)
            self._submit, self._join = so.prophet_cpu_submit, so.prophet_cpu_join
            self._submit_q4 = so.prophet_cpu_submit_q4
            # [w13 (E) | w2 (E) | offsets (E + 1) | int4: w13 scales (E) | w2 scales (E) | w13 zeros (E) | w2 zeros (E)]
            self._meta = np.zeros(7 * self.num_experts + 1, np.int64)
            self._y, self._rows = torch.zeros((0, 1)), np.zeros(0, np.int32)
            self._grow(1, 1)
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prophet-cpu-experts")
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=True)

    def close(self) -> None:
        """Stop the threads (joins a call in flight); the object is unusable after."""
        if self._pending is not None:
            self.join()
        self._finalizer()

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, layer: int, x: torch.Tensor, experts, offsets: np.ndarray, rows: np.ndarray,
               weights: np.ndarray, check: bool = True) -> None:
        """Start the call (module docstring); refused before anything starts when an argument is wrong
        or a call is pending. ``check=False``: the arguments' values are trusted (``pairs_of``'s, from
        a routing already checked: ``ProphetMoE``), their shapes and dtypes still checked."""
        s = self.store
        if self._pending is not None:
            raise RuntimeError("a CPU experts call is pending: join() it first")
        if not check:
            self._start(layer, x, np.asarray(experts, dtype=np.int64), offsets, rows, weights)
            return
        if not 0 <= layer < s.num_layers:
            raise ValueError(f"layer {layer} outside [0, {s.num_layers})")
        want = "fp32, bf16 or fp16" if self.int4 else s.dtype
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != s.hidden \
                or not x.is_contiguous() or (x.dtype not in DTYPE_CODES if self.int4 else x.dtype != s.dtype):
            raise ValueError(f"x must be a contiguous host tensor [n, {s.hidden}] of {want}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))} on "
                             f"{getattr(x, 'device', '?')}")
        experts = np.asarray(experts, dtype=np.int64)
        n_e, P, n = len(experts), len(rows), x.shape[0]
        if n_e and (experts.min() < 0 or experts.max() >= s.num_experts):
            raise ValueError(f"expert ids must be in [0, {s.num_experts}), got {experts.tolist()}")
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if offsets.shape != (n_e + 1,) or offsets[0] != 0 or offsets[-1] != P or np.any(np.diff(offsets) < 0) \
                or weights.shape != (P,):
            raise ValueError(f"offsets must rise from 0 to the {P} pairs over {n_e} experts, and weights have one "
                             f"per pair; got offsets {offsets.tolist()}, {weights.shape[0]} weights")
        if P and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"pair rows must index x's {n} rows")
        self._start(layer, x, experts, offsets, rows, weights)

    def _start(self, layer, x, experts, offsets, rows, weights) -> None:
        s = self.store
        n_e, P, n = len(experts), len(rows), x.shape[0]
        if self.backend == "torch":
            y = torch.zeros((n, s.hidden), dtype=torch.float32)
            fut = self._executor.submit(self._torch_call, layer, x, experts, offsets, rows, weights, y)
            self._pending = (fut, y)
            return
        # the call's arrays live in buffers kept between calls (grown as needed), their addresses
        # computed once: a decode step's call costs microseconds of Python, not tens
        if n > self._y.shape[0] or P > self._rows.shape[0]:
            self._grow(n, P)
        y = self._y[:n]
        y.zero_()
        E = self.num_experts
        meta = self._meta
        meta[:n_e] = self._w13[layer, experts]
        meta[E:E + n_e] = self._w2[layer, experts]
        meta[2 * E:2 * E + n_e + 1] = offsets
        self._rows[:P] = rows
        self._weights[:P] = weights
        a = self._addr
        m = a["meta"]
        if self.int4:
            def at(i):  # the i-th int4 field of meta: w13 scales, w2 scales, w13 zeros, w2 zeros
                return 3 * E + 1 + i * E
            meta[at(0):at(0) + n_e] = self._s13[layer, experts]
            meta[at(1):at(1) + n_e] = self._s2[layer, experts]
            if self._z13 is not None:
                meta[at(2):at(2) + n_e] = self._z13[layer, experts]
                meta[at(3):at(3) + n_e] = self._z2[layer, experts]
            zeros = (m + 8 * at(2), m + 8 * at(3)) if self._z13 is not None else (None, None)
            err = self._submit_q4(self._pool, DTYPE_CODES[x.dtype], s.hidden, s.intermediate, s.fmt.group_size, n,
                                  n_e, m, m + 8 * E, m + 8 * at(0), m + 8 * at(1), *zeros, m + 16 * E, a["rows"],
                                  a["weights"], x.data_ptr(), a["xf"], a["af"], a["y"])
        else:
            err = self._submit(self._pool, DTYPE_CODES[s.dtype], s.hidden, s.intermediate, n_e, m, m + 8 * E,
                               m + 16 * E, a["rows"], a["weights"], x.data_ptr(), a["act"], a["y"])
        if err:
            raise RuntimeError(f"the CPU experts' native call refused its arguments (code {err})")
        self._pending = (None, y, x)  # alive until joined (the buffers are the object's)

    def _grow(self, n: int, P: int) -> None:
        s = self.store
        n, P = max(n, 2 * self._y.shape[0]), max(P, 2 * self._rows.shape[0])
        self._y = torch.zeros((n, s.hidden), dtype=torch.float32)
        # act [P, I] in the store's dtype; int4: x and act as fp32, even inputs first (cpu_experts.cpp)
        self._act = torch.empty((P, s.intermediate), dtype=torch.float32 if self.int4 else s.dtype)
        self._xf = torch.empty((n, s.hidden) if self.int4 else (0,), dtype=torch.float32)
        self._rows, self._weights = np.zeros(P, np.int32), np.zeros(P, np.float32)
        self._addr = {"meta": self._meta.ctypes.data, "rows": self._rows.ctypes.data,
                      "weights": self._weights.ctypes.data, "act": self._act.data_ptr(), "af": self._act.data_ptr(),
                      "xf": self._xf.data_ptr(), "y": self._y.data_ptr()}

    def join(self) -> tuple[torch.Tensor, float]:
        """(y [n, H] fp32, seconds the call computed) of the pending call; y is valid until the next
        submit (the native backend computes into a buffer it keeps)."""
        if self._pending is None:
            raise RuntimeError("no CPU experts call is pending")
        pending, self._pending = self._pending, None
        if pending[0] is not None:  # torch backend
            return pending[1], pending[0].result()
        return pending[1], self._join(self._pool)

    def __call__(self, layer, x, experts, offsets, rows, weights) -> torch.Tensor:
        self.submit(layer, x, experts, offsets, rows, weights)
        return self.join()[0]

    def _torch_call(self, layer, x, experts, offsets, rows, weights, y) -> float:
        import time

        start = time.perf_counter()
        s, I = self.store, self.store.intermediate
        rows_t, w_t = torch.from_numpy(rows).long(), torch.from_numpy(weights)
        for j, e in enumerate(experts.tolist()):
            a, b = int(offsets[j]), int(offsets[j + 1])
            if a == b:
                continue
            w13, w2 = self._weights_of(layer, e, x.dtype)
            h = x[rows_t[a:b]] @ w13.t()
            act = (F.silu(h[:, :I].float()) * h[:, I:].float()).to(x.dtype)
            y.index_add_(0, rows_t[a:b], (act @ w2.t()).float() * w_t[a:b, None])
        return time.perf_counter() - start

    def _weights_of(self, layer: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (w13, w2) as the torch backend multiplies them: the store's, or int4 dequantized to dtype."""
        s = self.store
        if not self.int4:
            return s.w13[layer][e], s.w2[layer][e]
        from ..kernels.int4 import dequantize_int4

        q = s.quant(layer)
        zeros = (None, None) if q.w13_zeros is None else (q.w13_zeros[e], q.w2_zeros[e])
        return (dequantize_int4(s.w13[layer][e], q.w13_scale[e], zeros[0]).to(dtype),
                dequantize_int4(s.w2[layer][e], q.w2_scale[e], zeros[1]).to(dtype))

    def read_seconds(self, t: torch.Tensor) -> float:
        """Seconds the pool's threads take to read ``t``'s bytes once (native backend): the machine's
        read rate as this pool sees it. The bytes counted are a multiple of 64."""
        if self.backend != "native":
            raise ValueError("read_seconds measures the native pool")
        if self._pending is not None:
            raise RuntimeError("a CPU experts call is pending: join() it first")
        check = ctypes.c_double()
        n = t.numel() * t.element_size() // 64 * 64
        return native.lib().prophet_cpu_read(self._pool, t.data_ptr(), n, ctypes.byref(check))
