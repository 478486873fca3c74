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
from .fp8 import quantize_fp8
from .weight_format import Quant, WeightFormat
from .launch_config import get_config
from .residency import ReadThrough
from .route_plan import narrow_ids, raise_shared_slots, route_plan

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_identity_tables: dict = {}


def check_inputs(x, w13, w2, topk_weights, topk_ids, page_table=None, w13_scale=None, w2_scale=None,
                 block_shape=None, w13_zeros=None, w2_zeros=None, group_size=None
                 ) -> tuple[int, int, int, int, int, int, WeightFormat]:
    """The host-side contract of the MoE ops (shapes, dtypes, devices; no device work, no sync).
    Weights have x's dtype, or are float8_e4m3fn with fp32 scales (per output channel, or per block
    of ``block_shape``; :mod:`fp8`), or uint8 int4 codes (two per byte along K) with fp32 scales per
    ``group_size`` inputs and optional uint8 zero points (:mod:`int4`). Returns (T, H, I, k, E, S,
    the weights' format); raises TypeError / ValueError naming the problem."""
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
    fmt = WeightFormat.of(x.dtype, w13, w2, quant, block_shape, group_size)
    T, H = x.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [S, 2I, H{fmt.packing}] and w2 [S, H, I{fmt.packing}]; got "
                         f"{list(w13.shape)} and {list(w2.shape)}")
    S, two_i, H13 = w13.shape
    if H < 1 or fmt.k_of(H13) != H:
        raise ValueError(f"hidden size mismatch: x has H={H}, w13 has H={fmt.k_of(H13)}"
                         + (f" ({H13} bytes of int4 codes)" if fmt.kind == "int4" else ""))
    if two_i < 2 or two_i % 2:
        raise ValueError(f"w13 dim 1 must be 2*I (gate rows then up rows) with I >= 1, got {two_i}")
    I = two_i // 2
    if tuple(w2.shape) != (S, H, fmt.stored_k(I)) or (fmt.kind == "int4" and I % 2):
        raise ValueError(f"w2 must be [S, H, I{fmt.packing}] = {[S, H, fmt.stored_k(I)]} to match w13 "
                         f"{list(w13.shape)}, got {list(w2.shape)}")
    if S < 1:
        raise ValueError("the expert weights hold no expert (S = 0)")
    fmt.check(w13, w13_scale, w13_zeros, "w13")
    fmt.check(w2, w2_scale, w2_zeros, "w2")
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
    return T, H, I, k, E, S, fmt


def _validate(x, w13, w2, topk_weights, topk_ids, page_table=None, quant: Quant = Quant(), block_shape=None,
              group_size=None):
    """:func:`check_inputs`, then the kernels' forms of the routing (no sync): ids [T, k] int32 (an
    int64 id outside [0, E) becomes -1 before narrowing), weights [T*k] fp32, the page table
    contiguous (the kernels index it without a stride), and the weights' format (``WeightFormat``,
    with ``block_shape`` as the checked tuple of ints the launch and the references use: a list,
    tensor or integral floats given by the caller never reach them). Returns (T, H, I, k, E, S,
    ids, weights, pt, fmt)."""
    T, H, I, k, E, S, fmt = check_inputs(x, w13, w2, topk_weights, topk_ids, page_table, quant.w13_scale,
                                         quant.w2_scale, block_shape, quant.w13_zeros, quant.w2_zeros, group_size)
    ids = narrow_ids(topk_ids, E)
    weights = topk_weights.to(torch.float32).reshape(-1).contiguous()
    pt = page_table.contiguous() if page_table is not None else None
    return T, H, I, k, E, S, ids, weights, pt, fmt


def check_read_through(rt, w13_slots, w2_slots, page_table, scales=(None, None), fmt: WeightFormat = WeightFormat()
                       ) -> None:
    """The host-side contract of a read-through fill (``residency.ReadThrough``): source tensors
    indexed by expert (E = the page table's length) with the slots' dtype and every stride but the
    first the slots', scales with the slots' scales, an int32 fill list [F + 1, 2] and count [1] on
    the slots' device, a source on that device or pinned host memory. TypeError / ValueError."""
    if not isinstance(rt, ReadThrough):
        raise TypeError(f"read_through must be a kernels.residency.ReadThrough, got {type(rt).__name__}")
    if page_table is None:
        raise ValueError("a read-through fill writes experts into their slots: it needs a page table")
    if fmt.kind == "int4":
        raise ValueError("a read-through fill is not built for int4 experts (their zero points): use fill='copy'")
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


def _run(x, w13, w2, page_table, weights, ids, T, H, I, k, E, S, check, config, quant: Quant, fmt: WeightFormat,
         read_through=None):
    if T == 0:
        return x.new_empty((0, H))
    cfg = config or get_config(T, E, H, I, k, x.dtype, x.device, fmt=fmt)
    if read_through is not None and not cfg.get("gemv"):  # the grouped path reads slots: fill them first
        read_through.fill_now(w13, w2, quant.w13_scale, quant.w2_scale, max_fills=min(E, T * k))
        read_through = None
    checking = check and not _capturing(x.device)
    if cfg.get("gemv"):
        if checking:  # host sync: bad ids, missing slots, a shared slot raise before any GEMM
            route_plan(ids, E, 16, page_table, num_slots=S).check(num_slots=S, page_table=page_table)
        return gemv_experts(x, w13, w2, page_table, weights, ids, E, cfg, quant, fmt, read_through)
    plan = route_plan(ids, E, cfg["block_m"], page_table, num_slots=S)
    if checking:
        plan.check(num_slots=S, page_table=page_table)  # host sync: bad ids, missing/shared slots raise
    if uses_a8(cfg, fmt, x.device):  # W8A8: activations e4m3 per token (row), fp8 dots
        xq, xs = quantize_fp8(x)
        act = launch_gate_up(xq, w13, plan, k, cfg["gate_up"], quant, fmt, x_scale=xs, out_dtype=x.dtype)
        aq, a_s = quantize_fp8(act)
        out = launch_down(aq, w2, weights, plan, cfg["down"], quant, fmt, act_scale=a_s, out_dtype=x.dtype)
    else:
        act = launch_gate_up(x, w13, plan, k, cfg["gate_up"], quant, fmt)
        out = launch_down(act, w2, weights, plan, cfg["down"], quant, fmt)
    return launch_combine(out, ids.reshape(-1).contiguous(), page_table, E, S, k)


def uses_a8(cfg: dict, fmt: WeightFormat, device: torch.device) -> bool:
    """Whether a grouped-path launch config runs W8A8: it asks for it (``"a8": true``, which
    ``bench/tune_moe.py`` writes where timing says it is faster), the experts are fp8, the GPU has
    an fp8 type (sm_89+) and both K tiles are at least 32 wide (fp8 dots need it; block scales cap
    the tile at the block's K); otherwise the config runs W8A16."""
    if not cfg.get("a8") or cfg.get("gemv") or fmt.kind != "fp8" or not fp8.has_fp8_type(device):
        return False
    cap = fmt.block_shape[1] if fmt.block_shape else cfg["gate_up"]["BK"]
    return min(cfg["gate_up"]["BK"], cfg["down"]["BK"], cap) >= 32


def fused_experts_paged(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, *,
                        w13_scale=None, w2_scale=None, block_shape=None, w13_zeros=None, w2_zeros=None,
                        group_size=None, check: bool = True, config: dict | None = None,
                        read_through=None) -> torch.Tensor:
    """MoE experts reading weights through a page table into a paged expert buffer.

    ``y[t] = sum_j w[t,j] * W2[s] @ (silu(Wg[s] @ x[t]) * (Wu[s] @ x[t]))``, ``s = page_table[topk_ids[t,j]]``.

    Parameters
    ----------
    x : ``[T, H]`` fp16, bf16 or fp32
    w13_slots : ``[S, 2I, H]`` x's dtype, or float8_e4m3fn, or ``[S, 2I, H/2]`` uint8 int4 codes
        (two per byte along H, :mod:`int4`); per slot gate rows ``[0, I)`` then up rows ``[I, 2I)``
    w2_slots : ``[S, H, I]`` x's dtype, or float8_e4m3fn, or ``[S, H, I/2]`` uint8 int4 codes
    page_table : ``[E]`` int32, slot of each expert or -1 (not resident)
    topk_weights : ``[T, k]`` floating (used as fp32)
    topk_ids : ``[T, k]`` int32 (int64 accepted)
    w13_scale, w2_scale : fp32, with fp8 weights only
        Per output channel ``[S, 2I]`` / ``[S, H]`` (``block_shape`` None), or per block of
        ``block_shape = (bn, bk)``: ``[S, cdiv(2I, bn), cdiv(H, bk)]`` / ``[S, cdiv(H, bn), cdiv(I, bk)]``
        (see :mod:`fp8`); weight = fp8 value x scale. With int4 weights: ``[S, 2I, H/G]`` /
        ``[S, H, I/G]``, one per ``group_size`` G inputs of a row (32, 64 or 128).
    w13_zeros, w2_zeros : uint8, int4 only, optional
        Zero points of the same shapes as the scales (weight = (code - zero) x scale); None: 8.
    group_size : int, int4 only
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
    quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
    T, H, I, k, E, S, ids, weights, pt, fmt = _validate(x, w13_slots, w2_slots, topk_weights, topk_ids,
                                                        page_table, quant, block_shape, group_size)
    if read_through is not None:
        check_read_through(read_through, w13_slots, w2_slots, page_table, (w13_scale, w2_scale), fmt)
    if check and fmt.kind == "int4" and not _capturing(x.device):  # host sync (as the route check's)
        fmt.check_values(quant, pt[pt >= 0].long())
    if not use_triton(x.device, x.dtype):
        if read_through is not None and T:
            read_through.fill_now(w13_slots, w2_slots, w13_scale, w2_scale)
        return fused_experts_paged_reference(x, w13_slots, w2_slots, page_table, topk_weights,
                                             topk_ids, compute_dtype=x.dtype, check=check, **quant._asdict(),
                                             block_shape=fmt.block_shape, group_size=fmt.group_size)
    return _run(x, w13_slots, w2_slots, pt, weights, ids, T, H, I, k, E, S, check, config, quant, fmt,
                read_through)


def fused_experts(x, w13, w2, topk_weights, topk_ids, *, w13_scale=None, w2_scale=None, block_shape=None,
                  w13_zeros=None, w2_zeros=None, group_size=None, check: bool = True,
                  config: dict | None = None) -> torch.Tensor:
    """MoE experts on contiguous weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (fp8 or int4 with
    scales as in :func:`fused_experts_paged`): the same kernels with expert e in slot e (no page
    table read)."""
    quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
    T, H, I, k, E, S, ids, weights, _, fmt = _validate(x, w13, w2, topk_weights, topk_ids, None, quant,
                                                       block_shape, group_size)
    if check and fmt.kind == "int4" and not _capturing(x.device):  # host sync (as the route check's)
        fmt.check_values(quant)
    if not use_triton(x.device, x.dtype):
        return fused_experts_reference(x, w13, w2, topk_weights, topk_ids, compute_dtype=x.dtype, check=check,
                                       **quant._asdict(), block_shape=fmt.block_shape, group_size=fmt.group_size)
    return _run(x, w13, w2, None, weights, ids, T, H, I, k, E, S, check, config, quant, fmt)


@torch.library.custom_op("prophet::fused_experts_paged", mutates_args=())
def fused_experts_paged_op(x: torch.Tensor, w13_slots: torch.Tensor, w2_slots: torch.Tensor, page_table: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                           w2_scale: torch.Tensor | None = None, block_shape: list[int] | None = None,
                           w13_zeros: torch.Tensor | None = None, w2_zeros: torch.Tensor | None = None,
                           group_size: int | None = None) -> torch.Tensor:
    """:func:`fused_experts_paged` with ``check=False`` as a ``torch.library`` op (no host sync, opaque to
    torch.compile): what the device mode calls, so a compiled multi-layer step has no graph break."""
    return fused_experts_paged(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, w13_scale=w13_scale,
                               w2_scale=w2_scale, block_shape=block_shape, w13_zeros=w13_zeros, w2_zeros=w2_zeros,
                               group_size=group_size, check=False)


@fused_experts_paged_op.register_fake
def _(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, w13_scale=None, w2_scale=None, block_shape=None,
      w13_zeros=None, w2_zeros=None, group_size=None):
    return x.new_empty((x.shape[0], w2_slots.shape[1]))


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
    return x.new_empty((x.shape[0], w2_slots.shape[1]))


# ----------------------------------------------------------------------------- references


def fused_experts_reference(x, w13, w2, topk_weights, topk_ids, *,
                            compute_dtype: torch.dtype = torch.float32, check: bool = True,
                            w13_scale=None, w2_scale=None, block_shape=None, w13_zeros=None, w2_zeros=None,
                            group_size=None, quantize_activations: bool = False) -> torch.Tensor:
    """Plain PyTorch: loop over the routed experts, gather their tokens, two matmuls, one row per token-slot.
    Computes in ``compute_dtype`` (fp32 by default) and returns x's dtype. Syncs the host.
    ``check``: an id outside [0, E) raises; without it, that token-slot contributes zero (the kernels' rule).
    fp8 and int4 weights are dequantized with their scales (and zero points) first
    (:func:`fp8.dequantize_fp8`, :func:`int4.dequantize_int4`), expert by expert.
    ``quantize_activations`` (W8A8): x rounded to e4m3 with a scale per token, and each
    intermediate row (silu(gate) * up, in x's dtype) with a scale per row, as the kernels do."""
    quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
    T, H, I, k, E, S, ids, weights, _, fmt = _validate(x, w13, w2, topk_weights, topk_ids, None, quant,
                                                       block_shape, group_size)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    if check and T and not bool(valid.all()):
        raise ValueError(f"topk_ids holds expert ids outside [0, {E})")
    tok = torch.arange(T, device=x.device).repeat_interleave(k)
    xc = _rounded_to_fp8(x).to(compute_dtype) if quantize_activations and T else x.to(compute_dtype)
    # One output row per token-slot, summed over j in order afterwards (as the kernels do): the
    # result does not depend on which slot an expert sits in, so paged == contiguous exactly.
    rows = torch.zeros((T * k, H), dtype=compute_dtype, device=x.device)
    def weight(w, which, e):  # expert e's matrix in compute_dtype (fp8, int4: dequantized, only the experts used)
        scale, zeros = quant.of(which)
        return fmt.dequantize(w[e], None if scale is None else scale[e], None if zeros is None else zeros[e]
                              ).to(compute_dtype)

    for e in torch.unique(flat[valid]).tolist():
        sel = flat == e
        h = xc[tok[sel]] @ weight(w13, 0, e).t()
        a = F.silu(h[:, :I]) * h[:, I:]
        if quantize_activations:
            a = _rounded_to_fp8(a.to(x.dtype)).to(compute_dtype)
        rows[sel] = (a @ weight(w2, 1, e).t()) * weights[sel, None].to(compute_dtype)
    return rows.view(T, k, H).sum(dim=1).to(x.dtype)


def _rounded_to_fp8(a: torch.Tensor) -> torch.Tensor:
    # rows rounded to e4m3 with a scale per row (fp32 result): the W8A8 activations
    q, scale = quantize_fp8(a)
    return q.float() * scale[:, None]


def fused_experts_paged_reference(x, w13_slots, w2_slots, page_table, topk_weights, topk_ids, *,
                                  compute_dtype: torch.dtype = torch.float32, check: bool = True,
                                  w13_scale=None, w2_scale=None, block_shape=None, w13_zeros=None, w2_zeros=None,
                                  group_size=None, quantize_activations: bool = False) -> torch.Tensor:
    """Plain PyTorch paged reference: translate ids through the page table, then
    :func:`fused_experts_reference` on the slot buffer. Syncs the host. ``check``: an id outside
    [0, E), a routed expert without a slot in [0, S) or two experts sharing a slot raise; without
    it, such a token-slot contributes zero (the kernels' rule)."""
    quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
    T, H, I, k, E, S, ids, weights, pt, fmt = _validate(x, w13_slots, w2_slots, topk_weights, topk_ids,
                                                        page_table, quant, block_shape, group_size)
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
                                   compute_dtype=compute_dtype, check=False, **quant._asdict(),
                                   block_shape=fmt.block_shape, group_size=fmt.group_size,
                                   quantize_activations=quantize_activations)
