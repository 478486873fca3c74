"""Decode path of the paged expert GEMMs: one program per token-slot (gate_up) or token (down).

At decode a token-slot rarely shares its expert with another (OLMoE T=1: 8 distinct experts of
64), so grouping buys nothing and the route plan, the padding and the combine are pure overhead
(three extra launches of a ~35 us layer). This path reads every weight through the same page
table with two launches and no plan: the combine over k and the routing weight are fused into
the down kernel, which writes y directly. ``moe.py`` takes it when the tuned config says so
(``"gemv": true``), which ``bench/tune_moe.py`` decides by timing both paths.

Legend: T tokens, k experts per token, N = T*k token-slots, E experts, H, I, S as in
:mod:`grouped_gemm`::

    x            [T, H]      activations
    topk_ids     [N]  int32  expert of each token-slot;  page_table [E] int32 slot or -1
      -> gate_up:  act [N, I]  x dtype   act[n] = silu(Wg[s] x[t]) * (Wu[s] x[t]), s = pt[ids[n]]
      -> down:     y   [T, H]  x dtype   y[t] = sum_j w[t,j] * W2[s_j] act[t*k+j]

The down kernel reads a token's k experts together as one [k, BN, BK] tile, so that a decode
batch of one token still has enough bytes in flight. A token-slot whose id or slot is invalid
contributes zero (``check=True`` in ``moe.py`` raises before launching instead).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fp8 import load_weights_as, scale_view
from .weight_format import Quant, WeightFormat

try:  # programmatic dependent launch (Hopper+): griddepcontrol.wait / launch_dependents
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: configs asking for it fall back to plain launches
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _slot_of(ids_ptr, pt_ptr, n, valid, E, S, HAS_PT: tl.constexpr):
    # Slot read by token-slot(s) n (scalar or vector), or -1 where invalid: n masked off, expert
    # id outside [0, E), page-table slot -1 or >= S.
    e = tl.load(ids_ptr + n, mask=valid, other=-1)
    ok = valid & (e >= 0) & (e < E)
    if HAS_PT:
        s = tl.load(pt_ptr + e, mask=ok, other=-1)
    else:
        s = e
    return tl.where(ok & (s >= 0) & (s < S), s, -1)


@triton.jit
def _scale_off(rows, k0, GN, GK, stride_sn, stride_sk):
    # offsets of the scales of weight rows `rows` (any shape) in the K block at k0
    return (rows // GN).to(tl.int64) * stride_sn + (k0 // GK) * stride_sk


@triton.jit
def _scales(s_base, rows, k0, GN, GK, stride_sn, stride_sk, mask):
    # fp32 scales of weight rows `rows` (any shape; s_base broadcasts) in the K block at k0
    return tl.load(s_base + _scale_off(rows, k0, GN, GK, stride_sn, stride_sk), mask=mask, other=0.0)


@triton.jit
def _scales_through(src, dst, rows, k0, GN, GK, stride_sn, stride_sk, mask, fill, READ: tl.constexpr):
    # _scales read from `src`; with READ also written to `dst` where `fill` (a read-through fill)
    off = _scale_off(rows, k0, GN, GK, stride_sn, stride_sk)
    v = tl.load(src + off, mask=mask, other=0.0)
    if READ:
        tl.store(dst + off, v, mask=mask & fill)
    return v


@triton.jit
def _group_zero(z_base, rows, k0, GK, stride_zn, stride_zk, mask, ZP: tl.constexpr):
    # fp32 zero points of int4 weight rows `rows` (any shape; z_base broadcasts) in the group at k0:
    # stored (ZP), else 8 (symmetric codes)
    if ZP:
        return tl.load(z_base + _scale_off(rows, k0, 1, GK, stride_zn, stride_zk), mask=mask, other=0).to(tl.float32)
    else:
        return (rows * 0).to(tl.float32) + 8.0


@triton.jit
def int4_codes(b, z, DTYPE: tl.constexpr):
    """A tile of packed int4 bytes [..., BK/2] and its rows' zero points [..., 1] -> (even inputs'
    codes - z, odd inputs' codes - z) in DTYPE: integers in [-15, 15], exact in fp16/bf16/fp32."""
    lo = (b & 0xF).to(tl.float32) - z
    hi = (b >> 4).to(tl.float32) - z
    return lo.to(DTYPE), hi.to(DTYPE)


@triton.jit
def _int4_rows(w_ptrs, rows, ok, xe, xo, s_base, z_base, k0, GK, stride_sn, stride_sk, stride_zn, stride_zk,
               ZP: tl.constexpr):
    # one K tile of int4 weight rows `rows` [BN] (bytes at w_ptrs [BN, BK/2]) against x's even and
    # odd elements xe, xo [1, BK/2]: the rows' partial sums [BN], with the group's scale
    lo, hi = int4_codes(tl.load(w_ptrs, mask=ok[:, None], other=0),
                        _group_zero(z_base, rows, k0, GK, stride_zn, stride_zk, ok, ZP)[:, None], tl.float32)
    return tl.sum(lo * xe + hi * xo, axis=1) * _scales(s_base, rows, k0, 1, GK, stride_sn, stride_sk, ok)


@triton.jit
def _listed(e, fills_ptr, count_ptr, F_PAD: tl.constexpr):
    # [F_PAD] experts of the fill list (its first count rows; -2 past them): a read-through fill
    f = tl.arange(0, F_PAD)
    return tl.load(fills_ptr + f * 2, mask=f < tl.load(count_ptr), other=-2)


@triton.jit(do_not_specialize=["T"])
def _gemv_gate_up_kernel(
    x_ptr,  # (T, H)
    w_ptr,  # (S, 2I, H)
    act_ptr,  # (N, I) out
    ids_ptr,  # (N,) int32
    pt_ptr,  # (E,) int32
    s_ptr,  # (S, R, C) fp32 scales of fp8 weights (SCALE > 0)
    src_ptr,  # (E, 2I, H) READ: the experts' source (the host store's layer), w_ptr's strides but the first
    src_s_ptr,  # (E, R, C) READ: their scales
    fills_ptr,  # (F + 1, 2) int32 READ: (expert, slot) of the experts to fill as they are read
    count_ptr,  # (1,) int32 READ: rows of fills_ptr in use
    z_ptr,  # (S, 2I, H/G) uint8 ZP: int4 zero points
    T, H, I, E, S, TOPK, GN, GK,
    stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, stride_an, stride_ai,
    stride_ss, stride_sn, stride_sk, stride_src, stride_src_s, stride_zs, stride_zn, stride_zk,
    BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, HAS_PT: tl.constexpr,
    PDL: tl.constexpr, SCALE: tl.constexpr, FP8_BITS: tl.constexpr, READ: tl.constexpr, F_PAD: tl.constexpr,
    INT4: tl.constexpr, ZP: tl.constexpr,
):
    """grid = (N, cdiv(I, BN)). PDL: let the down kernel launch while this one's last wave runs.
    READ (read-through fill): a token-slot whose expert is in the fill list reads its weights from
    the source and writes them into its slot as it goes. INT4: w holds [S, 2I, H/2] bytes of int4
    codes (``int4``); a K tile is BK/2 bytes of one group (GK = G, BK divides it), x read as its
    even and odd elements."""
    if PDL:
        gdc_launch_dependents()
    n = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < I
    slot = _slot_of(ids_ptr, pt_ptr, n, n >= 0, E, S, HAS_PT)
    t = n // TOPK
    offs_k = tl.arange(0, BK)
    acc_g = tl.zeros([BN], dtype=tl.float32)
    acc_u = tl.zeros([BN], dtype=tl.float32)
    if slot >= 0:
        x_ptrs = x_ptr + t.to(tl.int64) * stride_xt + offs_k * stride_xh
        # slot * stride_ws overflows int32 for large buffers: int64.
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        s_base = s_ptr + slot.to(tl.int64) * stride_ss
        src_w = w_base
        src_s = s_base
        fill = slot < 0  # (False)
        if READ:
            e = tl.load(ids_ptr + n)
            fill = tl.sum((_listed(e, fills_ptr, count_ptr, F_PAD) == e).to(tl.int32), axis=0) > 0
            src_w = tl.where(fill, src_ptr + e.to(tl.int64) * stride_src, w_base)
            src_s = tl.where(fill, src_s_ptr + e.to(tl.int64) * stride_src_s, s_base)
        if INT4:  # (no read-through: refused on the host for int4)
            offs_b = tl.arange(0, BK // 2)
            x_even = x_ptr + t.to(tl.int64) * stride_xt + (2 * offs_b) * stride_xh
            z_base = z_ptr + slot.to(tl.int64) * stride_zs
            b_off = offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :] * stride_wh
            for k0 in range(0, H, BK):  # H is a multiple of the group, the group of BK
                xe = tl.load(x_even).to(tl.float32)[None, :]
                xo = tl.load(x_even + stride_xh).to(tl.float32)[None, :]
                acc_g += _int4_rows(w_base + b_off, offs_n, n_ok, xe, xo, s_base, z_base, k0, GK, stride_sn,
                                    stride_sk, stride_zn, stride_zk, ZP)
                acc_u += _int4_rows(w_base + b_off + I * stride_wn, offs_n + I, n_ok, xe, xo, s_base, z_base, k0,
                                    GK, stride_sn, stride_sk, stride_zn, stride_zk, ZP)
                x_even += BK * stride_xh
                b_off += (BK // 2) * stride_wh
        else:
            wg_off = offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wh
            wu_off = wg_off + I * stride_wn
            for k0 in range(0, H, BK):
                if EVEN_K:
                    w_mask = n_ok[:, None]
                    xv = tl.load(x_ptrs).to(tl.float32)
                else:
                    k_ok = offs_k + k0 < H
                    w_mask = n_ok[:, None] & k_ok[None, :]
                    xv = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                wg = tl.load(src_w + wg_off, mask=w_mask, other=0.0)
                wu = tl.load(src_w + wu_off, mask=w_mask, other=0.0)
                if READ:
                    tl.store(w_base + wg_off, wg, mask=w_mask & fill)
                    tl.store(w_base + wu_off, wu, mask=w_mask & fill)
                if SCALE == 2:  # block scales: scale this K block's partial sums (BK divides GK)
                    acc_g += tl.sum(load_weights_as(wg, tl.float32, FP8_BITS) * xv[None, :], axis=1) * _scales_through(
                        src_s, s_base, offs_n, k0, GN, GK, stride_sn, stride_sk, n_ok, fill, READ)
                    acc_u += tl.sum(load_weights_as(wu, tl.float32, FP8_BITS) * xv[None, :], axis=1) * _scales_through(
                        src_s, s_base, offs_n + I, k0, GN, GK, stride_sn, stride_sk, n_ok, fill, READ)
                else:
                    acc_g += tl.sum(load_weights_as(wg, tl.float32, FP8_BITS) * xv[None, :], axis=1)
                    acc_u += tl.sum(load_weights_as(wu, tl.float32, FP8_BITS) * xv[None, :], axis=1)
                x_ptrs += BK * stride_xh
                wg_off += BK * stride_wh
                wu_off += BK * stride_wh
            if SCALE == 1:  # per output channel: one scale per row, on the total
                acc_g *= _scales_through(src_s, s_base, offs_n, 0, GN, GK, stride_sn, stride_sk, n_ok, fill, READ)
                acc_u *= _scales_through(src_s, s_base, offs_n + I, 0, GN, GK, stride_sn, stride_sk, n_ok, fill, READ)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + n.to(tl.int64) * stride_an + offs_n * stride_ai,
             act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["T"])
def _gemv_down_kernel(
    act_ptr,  # (N, I)
    w_ptr,  # (S, H, I)
    y_ptr,  # (T, H) out
    topk_w_ptr,  # (N,) fp32
    ids_ptr,  # (N,) int32
    pt_ptr,  # (E,) int32
    s_ptr,  # (S, R, C) fp32 scales of fp8 weights (SCALE > 0)
    src_ptr, src_s_ptr, fills_ptr, count_ptr,  # READ: as in the gate_up kernel
    z_ptr,  # (S, H, I/G) uint8 ZP: int4 zero points
    T, H, I, E, S, TOPK, GN, GK,
    stride_an, stride_ai, stride_ws, stride_wh, stride_wi, stride_yt, stride_yh,
    stride_ss, stride_sn, stride_sk, stride_src, stride_src_s, stride_zs, stride_zn, stride_zk,
    BN: tl.constexpr, BK: tl.constexpr, K_PAD: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_PT: tl.constexpr, PDL: tl.constexpr, SCALE: tl.constexpr, FP8_BITS: tl.constexpr,
    READ: tl.constexpr, F_PAD: tl.constexpr, INT4: tl.constexpr, ZP: tl.constexpr,
):
    """grid = (T, cdiv(H, BN)). All k experts of the token are read at once as a
    [K_PAD, BN, BK] tile (k times the bytes in flight of a loop over them), then combined.
    INT4: [K_PAD, BN, BK/2] bytes of int4 codes a tile, act read as its even and odd elements."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BK)
    j = tl.arange(0, K_PAD)
    slot_n = t * TOPK + j  # token-slots of this token
    slot = _slot_of(ids_ptr, pt_ptr, slot_n, j < TOPK, E, S, HAS_PT)
    s_ok = slot >= 0
    # slot * stride_ws overflows int32 for large buffers: int64.
    w_base = (w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_ws)[:, None, None]
    s_base = (s_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_ss)[:, None]  # [K_PAD, 1]
    src_w = w_base
    src_s = s_base
    fill = slot < 0  # (placeholder: every read from the slots)
    if READ:
        e = tl.load(ids_ptr + slot_n, mask=j < TOPK, other=-1)
        fill = s_ok & (tl.sum((_listed(e, fills_ptr, count_ptr, F_PAD)[None, :] == e[:, None]).to(tl.int32), axis=1) > 0)
        src_w = tl.where(fill[:, None, None], (src_ptr + tl.maximum(e, 0).to(tl.int64) * stride_src)[:, None, None],
                         w_base)
        src_s = tl.where(fill[:, None], (src_s_ptr + tl.maximum(e, 0).to(tl.int64) * stride_src_s)[:, None], s_base)
    w_off = offs_n[None, :, None].to(tl.int64) * stride_wh + offs_k[None, None, :] * stride_wi
    a_ptrs = act_ptr + slot_n.to(tl.int64)[:, None] * stride_an + offs_k[None, :] * stride_ai
    w_mask = s_ok[:, None, None] & n_ok[None, :, None]
    s_mask = s_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([K_PAD, BN], dtype=tl.float32)
    k_start = 0
    if PDL >= 1:
        # Launched as a programmatic dependent of gate_up: ids, weights, the page table and the
        # fill list were written before gate_up started; only act is gate_up's, read after the
        # wait. PDL == 2 also streams the first weight tile (independent of gate_up) before waiting.
        if PDL == 2 and not INT4:
            k_ok = offs_k < I
            wv = tl.load(src_w + w_off, mask=w_mask & k_ok[None, None, :], other=0.0)
            if READ:
                tl.store(w_base + w_off, wv, mask=w_mask & k_ok[None, None, :] & fill[:, None, None])
            gdc_wait()
            av = tl.load(a_ptrs, mask=s_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            part = tl.sum(load_weights_as(wv, tl.float32, FP8_BITS) * av[:, None, :], axis=2)
            if SCALE == 2:
                part *= _scales_through(src_s, s_base, offs_n[None, :], 0, GN, GK, stride_sn, stride_sk, s_mask,
                                        fill[:, None], READ)
            acc += part
            a_ptrs += BK * stride_ai
            w_off += BK * stride_wi
            k_start = BK
        else:
            gdc_wait()
    if INT4:  # (no read-through: refused on the host for int4)
        offs_b = tl.arange(0, BK // 2)
        z_base = (z_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_zs)[:, None]  # [K_PAD, 1]
        b_off = offs_n[None, :, None].to(tl.int64) * stride_wh + offs_b[None, None, :] * stride_wi
        a_even = act_ptr + slot_n.to(tl.int64)[:, None] * stride_an + (2 * offs_b)[None, :] * stride_ai
        for k0 in range(0, I, BK):  # I is a multiple of the group, the group of BK
            ae = tl.load(a_even, mask=s_ok[:, None], other=0.0).to(tl.float32)[:, None, :]
            ao = tl.load(a_even + stride_ai, mask=s_ok[:, None], other=0.0).to(tl.float32)[:, None, :]
            lo, hi = int4_codes(tl.load(w_base + b_off, mask=w_mask, other=0),
                                _group_zero(z_base, offs_n[None, :], k0, GK, stride_zn, stride_zk, s_mask, ZP)[:, :, None],
                                tl.float32)
            acc += tl.sum(lo * ae + hi * ao, axis=2) * _scales(s_base, offs_n[None, :], k0, 1, GK, stride_sn,
                                                               stride_sk, s_mask)
            a_even += BK * stride_ai
            b_off += (BK // 2) * stride_wi
    else:
        for k0 in range(k_start, I, BK):
            if EVEN_K:
                mask = w_mask
                av = tl.load(a_ptrs, mask=s_ok[:, None], other=0.0).to(tl.float32)
            else:
                k_ok = offs_k + k0 < I
                mask = w_mask & k_ok[None, None, :]
                av = tl.load(a_ptrs, mask=s_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            wv = tl.load(src_w + w_off, mask=mask, other=0.0)
            if READ:
                tl.store(w_base + w_off, wv, mask=mask & fill[:, None, None])
            part = tl.sum(load_weights_as(wv, tl.float32, FP8_BITS) * av[:, None, :], axis=2)
            if SCALE == 2:  # block scales: this K block's partial sums
                part *= _scales_through(src_s, s_base, offs_n[None, :], k0, GN, GK, stride_sn, stride_sk, s_mask,
                                        fill[:, None], READ)
            acc += part
            a_ptrs += BK * stride_ai
            w_off += BK * stride_wi
        if SCALE == 1:  # per output channel
            acc *= _scales_through(src_s, s_base, offs_n[None, :], 0, GN, GK, stride_sn, stride_sk, s_mask,
                                   fill[:, None], READ)
    rw = tl.load(topk_w_ptr + slot_n, mask=s_ok, other=0.0)
    y = tl.sum(acc * rw[:, None], axis=0)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + offs_n * stride_yh,
             y.to(y_ptr.dtype.element_ty), mask=n_ok)


@functools.lru_cache(maxsize=None)
def _has_pdl(device: torch.device) -> bool:
    return gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_level(cfg: dict, device: torch.device) -> int:
    """The config's programmatic-dependent-launch level for the down kernel (0 off, 1 wait at the
    top, 2 also stream the first weight tile before the wait), where the GPU and Triton have it
    (checked once per device: this runs on every decode call)."""
    level = int(cfg.get("pdl", 0))
    return level if level and _has_pdl(device) else 0


def _read_args(read_through, which: int, w_arg, s_arg, fmt: WeightFormat) -> tuple[list, list, dict]:
    """Kernel arguments of a read-through fill (``residency.ReadThrough``; None: none): ([source
    weights, source scales, fills, count], [their 2 strides], {READ, F_PAD}); the source passed as
    the slots are (fp8 as bytes where the kernels decode bytes)."""
    if read_through is None:
        return [w_arg, s_arg, s_arg, s_arg], [0, 0], {"READ": False, "F_PAD": 1}
    src = read_through[which]
    scale = read_through[2 + which]
    if w_arg.dtype == torch.uint8 and src.dtype != torch.uint8:
        src = src.view(torch.uint8)
    src_s = src if scale is None else scale_view(scale, src.shape[2], fmt.block_shape)[0]
    fills = read_through.fills
    return ([src, src_s, fills, read_through.fill_count], [src.stride(0), src_s.stride(0)],
            {"READ": True, "F_PAD": triton.next_power_of_2(max(fills.shape[0] - 1, 1))})


def launch_gemv_gate_up(x, w13_slots, page_table, ids_flat, num_experts: int, topk: int, cfg: dict, pdl: int = 0,
                        quant: Quant = Quant(), fmt: WeightFormat = WeightFormat(),
                        read_through=None) -> torch.Tensor:
    """act [T*k, I] = silu(gate) * up per token-slot. ``ids_flat`` [T*k] int32 contiguous;
    ``quant``, ``fmt``: the weights' scales and format; ``read_through``: a ``residency.ReadThrough`` fill."""
    T, H = x.shape
    S, I = w13_slots.shape[0], w13_slots.shape[1] // 2
    has_pt = page_table is not None
    act = torch.empty((T * topk, I), dtype=x.dtype, device=x.device)
    w_arg, (s, gn, gk, *s_strides), zargs, wmeta, bk = fmt.kernel_args(w13_slots, *quant.of(0), cfg["BK"])
    read, read_strides, rmeta = _read_args(read_through, 0, w_arg, s, fmt)
    _gemv_gate_up_kernel[(T * topk, triton.cdiv(I, cfg["BN"]))](
        x, w_arg, act, ids_flat, page_table if has_pt else ids_flat, s, *read, zargs[0],  # dummies when unused
        T, H, I, num_experts, S, topk, gn, gk,
        x.stride(0), x.stride(1), *w13_slots.stride(), act.stride(0), act.stride(1), *s_strides, *read_strides,
        *zargs[1:],
        BN=cfg["BN"], BK=bk, EVEN_K=H % bk == 0, HAS_PT=has_pt, PDL=pdl > 0, **wmeta, **rmeta,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return act


def launch_gemv_down(act, w2_slots, page_table, weights_flat, ids_flat, num_experts: int, topk: int, cfg: dict,
                     pdl: int = 0, quant: Quant = Quant(), fmt: WeightFormat = WeightFormat(),
                     read_through=None) -> torch.Tensor:
    """y [T, H] = sum_j w[t,j] * W2[s_j] act[t*k+j] (``quant``, ``fmt``: the weights' scales and
    format; ``read_through``: a ``residency.ReadThrough`` fill)."""
    T = act.shape[0] // topk
    S, H = w2_slots.shape[:2]
    I = act.shape[1]
    has_pt = page_table is not None
    y = torch.empty((T, H), dtype=act.dtype, device=act.device)
    w_arg, (s, gn, gk, *s_strides), zargs, wmeta, bk = fmt.kernel_args(w2_slots, *quant.of(1), cfg["BK"])
    read, read_strides, rmeta = _read_args(read_through, 1, w_arg, s, fmt)
    _gemv_down_kernel[(T, triton.cdiv(H, cfg["BN"]))](
        act, w_arg, y, weights_flat, ids_flat, page_table if has_pt else ids_flat, s, *read, zargs[0],
        T, H, I, num_experts, S, topk, gn, gk,
        act.stride(0), act.stride(1), *w2_slots.stride(), y.stride(0), y.stride(1), *s_strides, *read_strides,
        *zargs[1:],
        BN=cfg["BN"], BK=bk, K_PAD=triton.next_power_of_2(topk), EVEN_K=I % bk == 0,
        HAS_PT=has_pt, PDL=pdl, **wmeta, **rmeta, num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3), **({"launch_pdl": True} if pdl else {}),
    )
    return y


def gemv_experts(x, w13_slots, w2_slots, page_table, weights_flat, ids, num_experts: int,
                 cfg: dict, quant: Quant = Quant(), fmt: WeightFormat = WeightFormat(),
                 read_through=None) -> torch.Tensor:
    """y [T, H] through the decode path. ``ids`` [T, k] int32, ``weights_flat`` [T*k] fp32;
    ``quant``, ``fmt``: the weights' scales and format; ``read_through``: a
    ``residency.ReadThrough`` fill made by the two kernels as they read."""
    k = ids.shape[1]
    ids_flat = ids.reshape(-1).contiguous()
    pdl = pdl_level(cfg["down"], x.device)
    act = launch_gemv_gate_up(x, w13_slots, page_table, ids_flat, num_experts, k, cfg["gate_up"], pdl,
                              quant, fmt, read_through)
    return launch_gemv_down(act, w2_slots, page_table, weights_flat, ids_flat, num_experts, k,
                            cfg["down"], pdl, quant, fmt, read_through)
