"""Public MoE expert ops: paged and contiguous fused experts, and their PyTorch references.

Legend: T tokens, k experts per token, E experts, H hidden size, I expert intermediate size,
S slots of the paged expert buffer. Each op is route plan -> gate_up -> down -> combine
(see :mod:`route_plan` and :mod:`grouped_gemm` for the intermediate arrays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8, use_triton
from .gemv import gemv_experts
from .grouped_gemm import launch_combine, launch_down, launch_gate_up
from .fp8 import FP8, check_block_shape, check_scales, dequantize_fp8, quantize_fp8
from .launch_config import get_config
from .residency import ReadThrough
from .route_plan import narrow_ids, raise_shared_slots, route_plan

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_identity_tables: dict = {}


def check_inputs(x, w13, w2, topk_weights, topk_ids, page_table=None, w13_scale=None, w2_scale=None,
                 block_shape=None) -> tuple[int, int, int, int, int, int]:
    """The host-side contract of the MoE ops (shapes, dtypes, devices; no device work, no sync).
    Weights have x's dtype, or are float8_e4m3fn with fp32 scales (per output channel, or per block
    of ``block_shape``; :mod:`fp8`). Returns (T, H, I, k, E, S); raises TypeError / ValueError
    naming the problem."""
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not ((w13.dtype == w2.dtype == x.dtype) or (w13.dtype == w2.dtype == FP8)):
        raise TypeError(f"weights must have x's dtype {x.dtype} (or both be float8_e4m3fn, with scales); "
                        f"got w13 {w13.dtype}, w2 {w2.dtype}")
    T, H = x.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [S, 2I, H] and w2 [S, H, I]; got {list(w13.shape)} and "
                         f"{list(w2.shape)}")
    S, two_i, H13 = w13.shape
    if H < 1 or H13 != H:
        raise ValueError(f"hidden size mismatch: x has H={H}, w13 has H={H13}")
    if two_i < 2 or two_i % 2:
        raise ValueError(f"w13 dim 1 must be 2*I (gate rows then up rows) with I >= 1, got {two_i}")
    I = two_i // 2
    if tuple(w2.shape) != (S, H, I):
        raise ValueError(f"w2 must be [S, H, I] = {[S, H, I]} to match w13 {list(w13.shape)}, "
                         f"got {list(w2.shape)}")
    if S < 1:
        raise ValueError("the expert weights hold no expert (S = 0)")
    block_shape = check_block_shape(block_shape)
    check_scales(w13, w13_scale, "w13", block_shape)
    check_scales(w2, w2_scale, "w2", block_shape)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T={T}, k], got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64 expert ids, got {topk_ids.dtype}")
    k = topk_ids.shape[1]
    if tuple(topk_weights.shape) != (T, k):
        raise ValueError(f"topk_weights must be [T, k] = {[T, k]}, got {list(topk_weights.shape)}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if page_table is not None:
        if not isinstance(page_table, torch.Tensor) or page_table.dim() != 1:
            raise ValueError("page_table must be a 1-D int32 tensor [E]")
        if page_table.dtype != torch.int32:
            raise TypeError(f"page_table must be int32, got {page_table.dtype}")
        E = page_table.shape[0]
        if E < 1:
            raise ValueError("page_table is empty (E = 0)")
    else:
        E = S
    if k < 1:
        raise ValueError("topk_ids has k = 0 experts per token")
    # (k > E is allowed: under expert parallelism a rank may hold fewer experts than a token's k, the
    # others' slots arriving as -1; a token's repeated expert adds its weights)
    tensors = [x, w13, w2, topk_weights, topk_ids] + ([page_table] if page_table is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return T, H, I, k, E, S


def _validate(x, w13, w2, topk_weights, topk_ids, page_table=None, scales=(None, None), block_shape=None):
    """:func:`check_inputs`, then the kernels' forms of the routing (no sync): ids [T, k] int32 (an
    int64 id outside [0, E) becomes -1 before narrowing), weights [T*k] fp32, the page table
    contiguous (the kernels index it without a stride), and ``block_shape`` as the checked tuple of
    ints the launch and the references use (a list, tensor or integral floats given by the caller
    never reach them). Returns (T, H, I, k, E, S, ids, weights, pt, block_shape)."""
    block_shape = check_block_shape(block_shape)
    T, H, I, k, E, S = check_inputs(x, w13, w2, topk_weights, topk_ids, page_table, *scales, block_shape)
    ids = narrow_ids(topk_ids, E)
    weights = topk_weights.to(torch.float32).reshape(-1).contiguous()
    pt = page_table.contiguous() if page_table is not None else None
    return T, H, I, k, E, S, ids, weights, pt, block_shape


def check_read_through(rt, w13_slots, w2_slots, page_table, scales=(None, None)) -> None:
    """The host-side contract of a read-through fill (``residency.ReadThrough``): source tensors
    indexed by expert (E = the page table's length) with the slots' dtype and every stride but the
    first the slots', scales with the slots' scales, an int32 fill list [F + 1, 2] and count [1] on
    the slots' device, a source on that device or pinned host memory. TypeError / ValueError."""
    if not isinstance(rt, ReadThrough):
        raise TypeError(f"read_through must be a kernels.residency.ReadThrough, got {type(rt).__name__}")
    if page_table is None:
        raise ValueError("a read-through fill writes experts into their slots: it needs a page table")
    E = page_table.shape[0]
    dev = w13_slots.device
    pairs = (("w13", rt.w13, w13_slots), ("w2", rt.w2, w2_slots), ("w13_scale", rt.w13_scale, scales[0]),
             ("w2_scale", rt.w2_scale, scales[1]))
    for name, src, slots in pairs:
        if (src is None) != (slots is None):
            raise ValueError(f"read_through.{name} must be given exactly when the slots have it")
        if src is None:
            continue
        if not isinstance(src, torch.Tensor) or src.dtype != slots.dtype:
            raise TypeError(f"read_through.{name} must be a {slots.dtype} tensor like the slots'")
        if tuple(src.shape) != (E, *slots.shape[1:]) or src.stride()[1:] != slots.stride()[1:]:
            raise ValueError(f"read_through.{name} must be [E={E}, {', '.join(map(str, slots.shape[1:]))}] with the "
                             f"slots' strides after the first; got shape {list(src.shape)}, strides {list(src.stride())}")
        if src.device != dev and not (src.device.type == "cpu" and dev.type == "cuda" and src.is_pinned()):
            raise ValueError(f"read_through.{name} is on {src.device}: the kernels read it from {dev} "
                             "(same device, or pinned host memory)")
    f, c = rt.fills, rt.fill_count
    if not (isinstance(f, torch.Tensor) and f.dtype == torch.int32 and f.dim() == 2 and f.shape[1] == 2
            and f.shape[0] >= 2 and f.device == dev):
        raise ValueError(f"read_through.fills must be an int32 [F + 1, 2] tensor (F >= 1) on {dev}")
    if not (isinstance(c, torch.Tensor) and c.dtype == torch.int32 and c.numel() == 1 and c.device == dev):
        raise ValueError(f"read_through.fill_count must be an int32 [1] tensor on {dev}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run(x, w13, w2, page_table, weights, ids, T, H, I, k, E, S, check, config, scales=(None, None),
         block_shape=None, read_through=None):
    if T == 0:
        return x.new_empty((0, H))
    cfg = config or get_config(T, E, H, I, k, x.dtype, x.device, weight_dtype=w13.dtype, block_shape=block_shape)
    if read_through is not None and not cfg.get("gemv"):  # the grouped path reads slots: fill them first
        read_through.fill_now(w13, w2, *scales, max_fills=min(E, T * k))
        read_through = None
    checking = check and not _capturing(x.device)
    if cfg.get("gemv"):
        if checking:  # host sync: bad ids, missing slots, a shared slot raise before any GEMM
            route_plan(ids, E, 16, page_table, num_slots=S).check(num_slots=S, page_table=page_table)
        return gemv_experts(x, w13, w2, page_table, weights, ids, E, cfg, scales, block_shape, read_through)
    plan = route_plan(ids, E, cfg["block_m"], page_table, num_slots=S)
    if checking:
        plan.check(num_slots=S, page_table=page_table)  # host sync: bad ids, missing/shared slots raise
    if uses_a8(cfg, w13.dtype, x.device, block_shape):  # W8A8: activations e4m3 per token (row), fp8 dots
        xq, xs = quantize_fp8(x)
        act = launch_gate_up(xq, w13, plan, k, cfg["gate_up"], scales[0], block_shape, x_scale=xs, out_dtype=x.dtype)
        aq, a_s = quantize_fp8(act)
        out = launch_down(aq, w2, weights, plan, cfg["down"], scales[1], block_shape, act_scale=a_s,
                          out_dtype=x.dtype)
    else:
        act = launch_gate_up(x, w13, plan, k, cfg["gate_up"], scales[0], block_shape)
        out = launch_down(act, w2, weights, plan, cfg["down"], scales[1], block_shape)
    return launch_combine(out, ids.reshape(-1).contiguous(), page_table, E, S, k)


def uses_a8(cfg: dict, weight_dtype: torch.dtype, device: torch.device, block_shape=None) -> bool:
    """Whether a grouped-path launch config runs W8A8: it asks for it (``"a8": true``, which
    ``bench/tune_moe.py`` writes where timing says it is faster), the experts are fp8, the GPU has
    an fp8 type (sm_89+) and both K tiles are at least 32 wide (fp8 dots need it; block scales cap
    the tile at the block's K); otherwise the config runs W8A16."""
    if not cfg.get("a8") or cfg.get("gemv") or weight_dtype != FP8 or not fp8.has_fp8_type(device):
        return False
    cap = block_shape[1] if block_shape else cfg["gate_up"]["BK"]
    return min(cfg["gate_up"]["BK"], cfg["down"]["BK"], cap) >= 32


def fused_experts_paged(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, *,
                        w13_scale=None, w2_scale=None, block_shape=None,
                        check: bool = True, config: dict | None = None, read_through=None) -> torch.Tensor:
    """MoE experts reading weights through a page table into a paged expert buffer.

    ``y[t] = sum_j w[t,j] * W2[s] @ (silu(Wg[s] @ x[t]) * (Wu[s] @ x[t]))``, ``s = page_table[topk_ids[t,j]]``.

    Parameters
    ----------
    x : ``[T, H]`` fp16, bf16 or fp32
    w13_slots : ``[S, 2I, H]`` x's dtype, or float8_e4m3fn; per slot gate rows ``[0, I)`` then up rows ``[I, 2I)``
    w2_slots : ``[S, H, I]`` x's dtype, or float8_e4m3fn
    page_table : ``[E]`` int32, slot of each expert or -1 (not resident)
    topk_weights : ``[T, k]`` floating (used as fp32)
    topk_ids : ``[T, k]`` int32 (int64 accepted)
    w13_scale, w2_scale : fp32, with fp8 weights only
        Per output channel ``[S, 2I]`` / ``[S, H]`` (``block_shape`` None), or per block of
        ``block_shape = (bn, bk)``: ``[S, cdiv(2I, bn), cdiv(H, bk)]`` / ``[S, cdiv(H, bn), cdiv(I, bk)]``
        (see :mod:`fp8`); weight = fp8 value x scale.
    check : bool
        Verify on the device that every id is in ``[0, E)``, every routed expert has a slot in
        ``[0, S)`` and no two experts share a slot; costs one host synchronisation and is skipped
        under CUDA-graph capture. With ``check=False`` a token-slot whose id is invalid or whose
        expert has no slot contributes zero (it is dropped, as if its routing weight were 0).
    config : dict, optional
        Launch config (see :mod:`launch_config`); default: tuned table lookup.
    read_through : ``residency.ReadThrough``, optional
        Experts to fill into their slots (already in the page table) from a source, as the decode
        path reads them (one pass, no copy launch); the grouped path and the references copy them
        first. Checked on the host (``check_read_through``); the listed slots are written.

    Returns
    -------
    y : ``[T, H]`` x's dtype
    """
    scales = (w13_scale, w2_scale)
    T, H, I, k, E, S, ids, weights, pt, block_shape = _validate(x, w13_slots, w2_slots, topk_weights, topk_ids,
                                                                page_table, scales, block_shape)
    if read_through is not None:
        check_read_through(read_through, w13_slots, w2_slots, page_table, scales)
    if not use_triton(x.device, x.dtype):
        if read_through is not None and T:
            read_through.fill_now(w13_slots, w2_slots, *scales)
        return fused_experts_paged_reference(x, w13_slots, w2_slots, page_table, topk_weights,
                                             topk_ids, compute_dtype=x.dtype, check=check, w13_scale=w13_scale,
                                             w2_scale=w2_scale, block_shape=block_shape)
    return _run(x, w13_slots, w2_slots, pt, weights, ids, T, H, I, k, E, S, check, config, scales, block_shape,
                read_through)


def fused_experts(x, w13, w2, topk_weights, topk_ids, *, w13_scale=None, w2_scale=None, block_shape=None,
                  check: bool = True, config: dict | None = None) -> torch.Tensor:
    """MoE experts on contiguous weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (fp8 with scales as in
    :func:`fused_experts_paged`): the same kernels with expert e in slot e (no page table read)."""
    scales = (w13_scale, w2_scale)
    T, H, I, k, E, S, ids, weights, _, block_shape = _validate(x, w13, w2, topk_weights, topk_ids, None, scales,
                                                               block_shape)
    if not use_triton(x.device, x.dtype):
        return fused_experts_reference(x, w13, w2, topk_weights, topk_ids, compute_dtype=x.dtype,
                                       check=check, w13_scale=w13_scale, w2_scale=w2_scale, block_shape=block_shape)
    return _run(x, w13, w2, None, weights, ids, T, H, I, k, E, S, check, config, scales, block_shape)


@torch.library.custom_op("prophet::fused_experts_paged", mutates_args=())
def fused_experts_paged_op(x: torch.Tensor, w13_slots: torch.Tensor, w2_slots: torch.Tensor, page_table: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                           w2_scale: torch.Tensor | None = None, block_shape: list[int] | None = None) -> torch.Tensor:
    """:func:`fused_experts_paged` with ``check=False`` as a ``torch.library`` op (no host sync, opaque to
    torch.compile): what the device mode calls, so a compiled multi-layer step has no graph break."""
    return fused_experts_paged(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, w13_scale=w13_scale,
                               w2_scale=w2_scale, block_shape=block_shape, check=False)


@fused_experts_paged_op.register_fake
def _(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, w13_scale=None, w2_scale=None, block_shape=None):
    return x.new_empty((x.shape[0], w13_slots.shape[2]))


@torch.library.custom_op("prophet::fused_experts_read_through",
                         mutates_args=("w13_slots", "w2_slots", "w13_scale", "w2_scale"))
def fused_experts_read_through_op(x: torch.Tensor, w13_slots: torch.Tensor, w2_slots: torch.Tensor,
                                  page_table: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                                  src_w13: torch.Tensor, src_w2: torch.Tensor, fills: torch.Tensor,
                                  fill_count: torch.Tensor, w13_scale: torch.Tensor | None,
                                  w2_scale: torch.Tensor | None, src_w13_scale: torch.Tensor | None,
                                  src_w2_scale: torch.Tensor | None,
                                  block_shape: list[int] | None = None) -> torch.Tensor:
    """:func:`fused_experts_paged_op` with a read-through fill (device mode's ``fill="read-through"``):
    it writes the listed experts into their slots, so the slots are declared mutated. (The scales
    have no default: torch 2.11's dispatcher drops trailing arguments equal to their default, and
    then misses the mutated ones by position.)"""
    rt = ReadThrough(src_w13, src_w2, src_w13_scale, src_w2_scale, fills, fill_count)
    return fused_experts_paged(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, w13_scale=w13_scale,
                               w2_scale=w2_scale, block_shape=block_shape, check=False, read_through=rt)


@fused_experts_read_through_op.register_fake
def _(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, src_w13, src_w2, fills, fill_count, w13_scale,
      w2_scale, src_w13_scale, src_w2_scale, block_shape=None):
    return x.new_empty((x.shape[0], w13_slots.shape[2]))


# ----------------------------------------------------------------------------- references


def fused_experts_reference(x, w13, w2, topk_weights, topk_ids, *,
                            compute_dtype: torch.dtype = torch.float32, check: bool = True,
                            w13_scale=None, w2_scale=None, block_shape=None,
                            quantize_activations: bool = False) -> torch.Tensor:
    """Plain PyTorch: loop over the routed experts, gather their tokens, two matmuls, one row per token-slot.
    Computes in ``compute_dtype`` (fp32 by default) and returns x's dtype. Syncs the host.
    ``check``: an id outside [0, E) raises; without it, that token-slot contributes zero (the kernels' rule).
    fp8 weights are dequantized with their scales (:func:`fp8.dequantize_fp8`) first.
    ``quantize_activations`` (W8A8): x rounded to e4m3 with a scale per token, and each
    intermediate row (silu(gate) * up, in x's dtype) with a scale per row, as the kernels do."""
    T, H, I, k, E, S, ids, weights, _, block_shape = _validate(x, w13, w2, topk_weights, topk_ids, None,
                                                               (w13_scale, w2_scale), block_shape)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    if check and T and not bool(valid.all()):
        raise ValueError(f"topk_ids holds expert ids outside [0, {E})")
    tok = torch.arange(T, device=x.device).repeat_interleave(k)
    xc = _rounded_to_fp8(x).to(compute_dtype) if quantize_activations and T else x.to(compute_dtype)
    # One output row per token-slot, summed over j in order afterwards (as the kernels do): the
    # result does not depend on which slot an expert sits in, so paged == contiguous exactly.
    rows = torch.zeros((T * k, H), dtype=compute_dtype, device=x.device)
    def weight(w, scale, e):  # expert e's matrix in compute_dtype (fp8: dequantized, only the experts used)
        return (w[e] if scale is None else dequantize_fp8(w[e], scale[e], block_shape)).to(compute_dtype)

    for e in torch.unique(flat[valid]).tolist():
        sel = flat == e
        h = xc[tok[sel]] @ weight(w13, w13_scale, e).t()
        a = F.silu(h[:, :I]) * h[:, I:]
        if quantize_activations:
            a = _rounded_to_fp8(a.to(x.dtype)).to(compute_dtype)
        rows[sel] = (a @ weight(w2, w2_scale, e).t()) * weights[sel, None].to(compute_dtype)
    return rows.view(T, k, H).sum(dim=1).to(x.dtype)


def _rounded_to_fp8(a: torch.Tensor) -> torch.Tensor:
    # rows rounded to e4m3 with a scale per row (fp32 result): the W8A8 activations
    q, scale = quantize_fp8(a)
    return q.float() * scale[:, None]


def fused_experts_paged_reference(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, *,
                                  compute_dtype: torch.dtype = torch.float32, check: bool = True,
                                  w13_scale=None, w2_scale=None, block_shape=None,
                                  quantize_activations: bool = False) -> torch.Tensor:
    """Plain PyTorch paged reference: translate ids through the page table, then
    :func:`fused_experts_reference` on the slot buffer. Syncs the host. ``check``: an id outside
    [0, E), a routed expert without a slot in [0, S) or two experts sharing a slot raise; without
    it, such a token-slot contributes zero (the kernels' rule)."""
    T, H, I, k, E, S, ids, weights, pt, block_shape = _validate(x, w13_slots, w2_slots, topk_weights, topk_ids,
                                                                page_table, (w13_scale, w2_scale), block_shape)
    if T == 0:
        return x.new_empty((0, H))
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    if check and not bool(valid.all()):
        raise ValueError(f"topk_ids holds expert ids outside [0, {E})")
    slots = torch.where(valid, pt.long()[flat.clamp(0, E - 1)], -1)
    bad = valid & ((slots < 0) | (slots >= S))
    if check and bad.any():
        experts = torch.unique(flat[bad]).tolist()
        raise ValueError(f"routed expert(s) {experts} have no slot in [0, {S}) in page_table")
    if check:
        raise_shared_slots(pt)
    slots = torch.where((slots >= 0) & (slots < S), slots, -1)
    return fused_experts_reference(x, w13_slots, w2_slots, topk_weights, slots.view(T, k).to(torch.int32),
                                   compute_dtype=compute_dtype, check=False, w13_scale=w13_scale,
                                   w2_scale=w2_scale, block_shape=block_shape,
                                   quantize_activations=quantize_activations)
