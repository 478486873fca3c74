"""Paged grouped expert GEMMs: gate_up with fused SiLU-and-mul, down with routing weight.

Legend: T tokens, k experts per token, N = T*k token-slots, H hidden size, I expert intermediate
size, S slots in the expert buffer, P padded rows of the route plan, NB = P / BM blocks.

Pipeline (the route plan comes from :mod:`route_plan`)::

    x              [T, H]      fp16/bf16/fp32   activations
    w13_slots      [S, 2I, H]  same dtype, or fp8 e4m3 with scales   per slot: gate rows [0, I), up rows [I, 2I)
    w2_slots       [S, H, I]   same dtype, or fp8 e4m3 with scales
    (fp8: scales per output channel or per block, :mod:`fp8`; weights are converted exactly to x's
    dtype, products accumulate in fp32, each block's partial sum (or each row's total) is scaled)
    sorted_ids     [P]         int32   token-slots sorted by expert, padded with sentinel N
    block_slot     [NB]        int32   slot read by each BM-row block, -1 = skip
      -> gate_up:  act[p] = silu(x[t] @ Wg[s]^T) * (x[t] @ Wu[s]^T),  t = sorted_ids[p] // k
                   act            [P, I]   x dtype
      -> down:     out[n] = topk_weights[n] * (act[p] @ W2[s]^T),     n = sorted_ids[p]
                   out            [N, H]   x dtype (row per token-slot, never shared: no atomics)
      -> combine:  y[t] = sum_j out[t*k + j] over the token-slots with a valid expert and slot
                   y              [T, H]   x dtype

A token-slot whose expert id is outside [0, E) or whose expert has no slot in [0, S) is in no
block, so its row of ``out`` is never written: the combine leaves it out (as the GEMV path's down
kernel does), so it contributes exactly zero. Both GEMM kernels launch one program per (block,
column tile); programs of unused blocks return at once. Programs run in grouped order
(``GROUP_M`` blocks sweep the column tiles together) so that the blocks of one expert share each
weight tile through L2 and large batches do not re-read their rows from HBM for every column tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import load_weights_as
from .gemv import _group_zero, _slot_of, int4_codes
from .weight_format import Quant, WeightFormat


@triton.jit
def _block_coords(pid, NB, num_n, GROUP_M: tl.constexpr):
    # Grouped order (Triton matmul tutorial): GROUP_M consecutive blocks sweep all column tiles
    # before the next group starts, so their rows stay in L2 while the weight tiles stream; and
    # the blocks of one expert, which share each weight tile, run together. GROUP_M >= NB is
    # "block index fastest" over the whole grid.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(NB - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _scale_at(s_base, rows, k0, GN, GK, stride_sn, stride_sk, mask):
    # fp32 scales of weight rows `rows` in the K block starting at k0 (scale[s, row // GN, k0 // GK])
    return tl.load(s_base + (rows // GN).to(tl.int64) * stride_sn + (k0 // GK) * stride_sk, mask=mask, other=0.0)


@triton.jit
def _int4_dot(w_ptrs, cols, ok, xe, xo, s_base, z_base, k0, GK, stride_sn, stride_sk, stride_zn, stride_zk,
              ZP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # one K tile of int4 weight columns `cols` [BN] (bytes at w_ptrs [BK/2, BN]) against the rows'
    # even and odd inputs xe, xo [BM, BK/2]: [BM, BN] partial sums, with the group's scale
    z = _group_zero(z_base, cols, k0, GK, stride_zn, stride_zk, ok, ZP)[None, :]
    lo, hi = int4_codes(tl.load(w_ptrs, mask=ok[None, :], other=0), z, xe.dtype)
    part = tl.dot(xo, hi, tl.dot(xe, lo, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
    return part * _scale_at(s_base, cols, k0, 1, GK, stride_sn, stride_sk, ok)[None, :]


@triton.jit(do_not_specialize=["N", "NB"])  # one compile serves every batch size
def _gate_up_kernel(
    # pointers
    x_ptr,  # (T, H)
    w_ptr,  # (S, 2I, H)
    act_ptr,  # (P, I) out
    sorted_ptr,  # (P,) int32
    block_slot_ptr,  # (NB,) int32
    s_ptr,  # (S, R, C) fp32 scales of fp8 weights (SCALE > 0)
    xs_ptr,  # (T,) fp32 A8: x's per-token scales (x is fp8)
    z_ptr,  # (S, 2I, H/G) uint8 ZP: int4 zero points
    # sizes
    N, NB, H, I, TOPK, GN, GK,
    # strides
    stride_xt, stride_xh,
    stride_ws, stride_wn, stride_wh,
    stride_ap, stride_ai,
    stride_ss, stride_sn, stride_sk,
    stride_zs, stride_zn, stride_zk,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE: tl.constexpr, FP8_BITS: tl.constexpr,
    A8: tl.constexpr, INT4: tl.constexpr, ZP: tl.constexpr,
):
    """grid = (NB * cdiv(I, BN),), grouped order (see _block_coords). A8 (W8A8): x is e4m3 with a
    scale per token, the dots are fp8 x fp8 with fp32 accumulation, x's scale applied before silu.
    INT4: w holds [S, 2I, H/2] bytes of int4 codes; a K tile is two dots of BK/2 (x's even and odd
    inputs against the tile's low and high nibbles), scaled by the tile's group."""
    pid_m, pid_n = _block_coords(tl.program_id(0), NB, tl.cdiv(I, BN), GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    ts = tl.load(sorted_ptr + offs_m)
    row_ok = ts < N
    tok = (ts // TOPK).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BK)

    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
    # slot * stride_ws overflows int32 for a large buffer (S * 2I * H elements): int64.
    w_base = w_ptr + slot.to(tl.int64) * stride_ws + offs_k[:, None] * stride_wh
    wg_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn
    wu_ptrs = w_base + (offs_n[None, :] + I).to(tl.int64) * stride_wn

    s_base = s_ptr + slot.to(tl.int64) * stride_ss
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    if INT4:
        offs_b = tl.arange(0, BK // 2)
        xe_ptrs = x_ptr + tok[:, None] * stride_xt + (2 * offs_b)[None, :] * stride_xh
        bg_ptrs = w_ptr + slot.to(tl.int64) * stride_ws + offs_b[:, None] * stride_wh + offs_n[None, :].to(tl.int64) * stride_wn
        z_base = z_ptr + slot.to(tl.int64) * stride_zs
        for k0 in range(0, H, BK):  # H is a multiple of the group, the group of BK
            xe = tl.load(xe_ptrs, mask=row_ok[:, None], other=0.0)
            xo = tl.load(xe_ptrs + stride_xh, mask=row_ok[:, None], other=0.0)
            acc_g += _int4_dot(bg_ptrs, offs_n, n_ok, xe, xo, s_base, z_base, k0, GK, stride_sn, stride_sk,
                               stride_zn, stride_zk, ZP, DOT_PRECISION)
            acc_u += _int4_dot(bg_ptrs + I * stride_wn, offs_n + I, n_ok, xe, xo, s_base, z_base, k0, GK, stride_sn,
                               stride_sk, stride_zn, stride_zk, ZP, DOT_PRECISION)
            xe_ptrs += BK * stride_xh
            bg_ptrs += (BK // 2) * stride_wh
    else:
        for k0 in range(0, H, BK):
            if EVEN_K:
                xv = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                wg = tl.load(wg_ptrs, mask=n_ok[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k + k0 < H
                xv = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if SCALE == 2:  # block scales: scale this K block's partial sums (BK divides GK)
                sg = _scale_at(s_base, offs_n, k0, GN, GK, stride_sn, stride_sk, n_ok)
                su = _scale_at(s_base, offs_n + I, k0, GN, GK, stride_sn, stride_sk, n_ok)
                acc_g += tl.dot(xv, load_weights_as(wg, xv.dtype, FP8_BITS), input_precision=DOT_PRECISION) * sg[None, :]
                acc_u += tl.dot(xv, load_weights_as(wu, xv.dtype, FP8_BITS), input_precision=DOT_PRECISION) * su[None, :]
            else:  # (fp8 weights convert exactly to x's dtype; other weights already have it)
                acc_g = tl.dot(xv, load_weights_as(wg, xv.dtype, FP8_BITS), acc_g, input_precision=DOT_PRECISION)
                acc_u = tl.dot(xv, load_weights_as(wu, xv.dtype, FP8_BITS), acc_u, input_precision=DOT_PRECISION)
            x_ptrs += BK * stride_xh
            wg_ptrs += BK * stride_wh
            wu_ptrs += BK * stride_wh
        if SCALE == 1:  # per output channel: one scale per row, on the total
            acc_g *= _scale_at(s_base, offs_n, 0, GN, GK, stride_sn, stride_sk, n_ok)[None, :]
            acc_u *= _scale_at(s_base, offs_n + I, 0, GN, GK, stride_sn, stride_sk, n_ok)[None, :]
    if A8:  # x's per-token scale: constant over K, so applied once to the totals
        xs = tl.load(xs_ptr + tok, mask=row_ok, other=0.0)
        acc_g *= xs[:, None]
        acc_u *= xs[:, None]

    act = acc_g * tl.sigmoid(acc_g) * acc_u
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_ap + offs_n[None, :] * stride_ai
    tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["N", "NB"])
def _down_kernel(
    # pointers
    act_ptr,  # (P, I)
    w_ptr,  # (S, H, I)
    out_ptr,  # (N, H) out
    topk_w_ptr,  # (N,) fp32
    sorted_ptr,  # (P,) int32
    block_slot_ptr,  # (NB,) int32
    s_ptr,  # (S, R, C) fp32 scales of fp8 weights (SCALE > 0)
    as_ptr,  # (P,) fp32 A8: act's per-row scales (act is fp8)
    z_ptr,  # (S, H, I/G) uint8 ZP: int4 zero points
    # sizes
    N, NB, H, I, GN, GK,
    # strides
    stride_ap, stride_ai,
    stride_ws, stride_wh, stride_wi,
    stride_on, stride_oh,
    stride_ss, stride_sn, stride_sk,
    stride_zs, stride_zn, stride_zk,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE: tl.constexpr, FP8_BITS: tl.constexpr,
    A8: tl.constexpr, INT4: tl.constexpr, ZP: tl.constexpr,
):
    """grid = (NB * cdiv(H, BN),), grouped order (see _block_coords). A8: act is e4m3 with a scale
    per row (fp8 x fp8 dots). INT4: as in the gate_up kernel, along I."""
    pid_m, pid_n = _block_coords(tl.program_id(0), NB, tl.cdiv(H, BN), GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:  # unused block, or an expert without a valid slot: the combine skips its rows
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    ts = tl.load(sorted_ptr + offs_m)
    row_ok = ts < N
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    o_ptrs = out_ptr + ts[:, None].to(tl.int64) * stride_on + offs_n[None, :] * stride_oh
    offs_k = tl.arange(0, BK)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_ap + offs_k[None, :] * stride_ai
    w_ptrs = (w_ptr + slot.to(tl.int64) * stride_ws + offs_k[:, None] * stride_wi
              + offs_n[None, :].to(tl.int64) * stride_wh)
    s_base = s_ptr + slot.to(tl.int64) * stride_ss
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if INT4:
        offs_b = tl.arange(0, BK // 2)
        ae_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_ap + (2 * offs_b)[None, :] * stride_ai
        b_ptrs = (w_ptr + slot.to(tl.int64) * stride_ws + offs_b[:, None] * stride_wi
                  + offs_n[None, :].to(tl.int64) * stride_wh)
        z_base = z_ptr + slot.to(tl.int64) * stride_zs
        for k0 in range(0, I, BK):  # I is a multiple of the group, the group of BK
            acc += _int4_dot(b_ptrs, offs_n, n_ok, tl.load(ae_ptrs), tl.load(ae_ptrs + stride_ai), s_base, z_base,
                             k0, GK, stride_sn, stride_sk, stride_zn, stride_zk, ZP, DOT_PRECISION)
            ae_ptrs += BK * stride_ai
            b_ptrs += (BK // 2) * stride_wi
    else:
        for k0 in range(0, I, BK):
            if EVEN_K:
                av = tl.load(a_ptrs)
                wv = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k + k0 < I
                av = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                wv = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if SCALE == 2:
                sc = _scale_at(s_base, offs_n, k0, GN, GK, stride_sn, stride_sk, n_ok)
                acc += tl.dot(av, load_weights_as(wv, av.dtype, FP8_BITS), input_precision=DOT_PRECISION) * sc[None, :]
            else:
                acc = tl.dot(av, load_weights_as(wv, av.dtype, FP8_BITS), acc, input_precision=DOT_PRECISION)
            a_ptrs += BK * stride_ai
            w_ptrs += BK * stride_wi
        if SCALE == 1:
            acc *= _scale_at(s_base, offs_n, 0, GN, GK, stride_sn, stride_sk, n_ok)[None, :]
    if A8:
        acc *= tl.load(as_ptr + offs_m)[:, None]
    rw = tl.load(topk_w_ptr + ts, mask=row_ok, other=0.0)
    out = (acc * rw[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(o_ptrs, out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(
    # pointers
    out_ptr,  # (N, H) per token-slot rows of down
    y_ptr,  # (T, H) out
    ids_ptr,  # (N,) int32
    pt_ptr,  # (E,) int32 (unused without HAS_PT)
    # sizes
    H, E, S, TOPK,
    # strides
    stride_on, stride_oh, stride_yt, stride_yh,
    # meta-parameters
    BN: tl.constexpr, K_PAD: tl.constexpr, HAS_PT: tl.constexpr,
):
    """grid = (T, cdiv(H, BN)). y[t] = sum of the token's rows whose expert and slot are valid."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    j = tl.arange(0, K_PAD)
    n = t * TOPK + j  # token-slots of this token
    ok = _slot_of(ids_ptr, pt_ptr, n, j < TOPK, E, S, HAS_PT) >= 0
    rows = tl.load(out_ptr + n.to(tl.int64)[:, None] * stride_on + offs_n[None, :] * stride_oh,
                   mask=ok[:, None] & (offs_n[None, :] < H), other=0.0)
    y = tl.sum(rows.to(tl.float32), axis=0)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + offs_n * stride_yh, y.to(y_ptr.dtype.element_ty),
             mask=offs_n < H)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"), not Triton's tf32 default, so fp32 matches the
    # reference to fp32 rounding. fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_gate_up(x, w13_slots, plan, topk: int, cfg: dict, quant: Quant = Quant(), fmt: WeightFormat = WeightFormat(),
                   x_scale=None, out_dtype=None) -> torch.Tensor:
    """act [P, I] = silu(gate) * up for every used block of ``plan`` (``quant``, ``fmt``: the
    weights' scales and format; ``x_scale`` [T] fp32: x is e4m3 with a scale per token, W8A8; act
    in ``out_dtype``, default x's)."""
    P = plan.sorted_ids.numel()
    NB = plan.block_slot.numel()
    H = x.shape[1]
    I = w13_slots.shape[1] // 2
    act = torch.empty((P, I), dtype=out_dtype or x.dtype, device=x.device)
    bn = cfg["BN"]
    w_arg, (s, gn, gk, *s_strides), zargs, wmeta, bk = fmt.kernel_args(w13_slots, *quant.of(0), cfg["BK"])
    grid = lambda meta: (NB * triton.cdiv(I, meta["BN"]),)  # noqa: E731
    _gate_up_kernel[grid](
        x, w_arg, act, plan.sorted_ids, plan.block_slot, s, x_scale if x_scale is not None else s, zargs[0],
        plan.num_token_slots, NB, H, I, topk, gn, gk,
        x.stride(0), x.stride(1),
        w13_slots.stride(0), w13_slots.stride(1), w13_slots.stride(2),
        act.stride(0), act.stride(1), *s_strides, *zargs[1:],
        BM=plan.block_m, BN=bn, BK=bk, GROUP_M=cfg.get("GROUP_M", 64), EVEN_K=H % bk == 0,
        DOT_PRECISION=_dot_precision(x.dtype), **wmeta, A8=x_scale is not None,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return act


def launch_down(act, w2_slots, topk_weights_flat, plan, cfg: dict, quant: Quant = Quant(),
                fmt: WeightFormat = WeightFormat(), act_scale=None, out_dtype=None) -> torch.Tensor:
    """out [N, H] = routing weight * (act @ W2^T) per token-slot (``quant``, ``fmt``: the weights'
    scales and format; ``act_scale`` [P] fp32: act is e4m3 with a scale per row, W8A8; out in
    ``out_dtype``, default act's)."""
    NB = plan.block_slot.numel()
    N = plan.num_token_slots
    H, I = w2_slots.shape[1], act.shape[1]
    out = torch.empty((N, H), dtype=out_dtype or act.dtype, device=act.device)
    bn = cfg["BN"]
    w_arg, (s, gn, gk, *s_strides), zargs, wmeta, bk = fmt.kernel_args(w2_slots, *quant.of(1), cfg["BK"])
    grid = lambda meta: (NB * triton.cdiv(H, meta["BN"]),)  # noqa: E731
    _down_kernel[grid](
        act, w_arg, out, topk_weights_flat, plan.sorted_ids, plan.block_slot, s, act_scale if act_scale is not None else s,
        zargs[0], N, NB, H, I, gn, gk,
        act.stride(0), act.stride(1),
        w2_slots.stride(0), w2_slots.stride(1), w2_slots.stride(2),
        out.stride(0), out.stride(1), *s_strides, *zargs[1:],
        BM=plan.block_m, BN=bn, BK=bk, GROUP_M=cfg.get("GROUP_M", 64), EVEN_K=I % bk == 0,
        DOT_PRECISION=_dot_precision(act.dtype), **wmeta, A8=act_scale is not None,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out


def launch_combine(out, ids_flat, page_table, num_experts: int, num_slots: int, topk: int) -> torch.Tensor:
    """y [T, H] = sum over each token's valid token-slots of ``out`` [T*k, H] (``ids_flat`` [T*k] int32)."""
    N, H = out.shape
    T = N // topk
    y = torch.empty((T, H), dtype=out.dtype, device=out.device)
    bn = min(512, triton.next_power_of_2(H))
    has_pt = page_table is not None
    _combine_kernel[(T, triton.cdiv(H, bn))](
        out, y, ids_flat, page_table if has_pt else ids_flat,  # dummy when unused
        H, num_experts, num_slots, topk,
        out.stride(0), out.stride(1), y.stride(0), y.stride(1),
        BN=bn, K_PAD=triton.next_power_of_2(topk), HAS_PT=has_pt, num_warps=4,
    )
    return y
