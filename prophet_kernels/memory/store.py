"""Host expert store: every routed expert of every MoE layer in (pinned) host memory.

Layout per layer l (the kernels' layout, one expert = one slot's worth of weights):
    w13[l]  [E, 2I, H]  gate rows [0, I), then up rows [I, 2I)
    w2[l]   [E, H, I]
The builders place both as views of one [E, 3*I*H] block (``expert_tensors``): each expert's
weights are contiguous, so one copy moves an expert into a slot (the device buffer has the same
layout; the kernels take the slot stride). Quantized experts (``kernels.weight_format``) are one
byte row per expert: fp8 (``expert_dtype="fp8"``, e4m3 with fp32 scales per output channel or per
block, ``kernels.fp8``)
    [ w13 fp8 (2*I*H bytes) | w2 fp8 (H*I) | pad to 4 | w13 scales (fp32) | w2 scales | pad to 16 ]
and int4 (``expert_dtype="int4"``, two codes a byte with fp32 scales per group, ``kernels.int4``)
    [ w13 codes (I*H bytes) | w2 codes (H*I/2) | pad to 4 | w13 scales | w2 scales | w13 zero points
      (uint8, with zero points only) | w2 zero points | pad to 16 ]
so weights, scales and zero points still move in one copy (``allocate_experts``). Tensors handed to the
constructor in another layout still work, at two copies per expert (not fp8 ones). Pinned when CUDA is present, so host-to-device copies run
on the copy engine asynchronously.
Built from tensors, from (gate_up, down) parameter pairs of a loaded model, or streamed from
safetensors files one layer at a time (never a second full copy in memory; FP8 checkpoints with
their own scales).
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..kernels.fp8 import FP8, check_block_shape, scale_shape
from ..kernels.int4 import check_group_size
from ..kernels.weight_format import Quant, WeightFormat
from . import numa


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised page-locked host memory of exactly the requested size. PyTorch's pinned
    allocator (``pin_memory=True``) rounds every allocation up to the next power of two: one
    layer's experts of OLMoE-1B-7B (768 MiB) would pin 1 GiB, of Mixtral-8x7B (2.63 GiB) 4 GiB,
    128 GiB for the model's 84 GiB. So a plain host allocation is registered with CUDA instead
    (``cudaHostRegister``) and unregistered when its storage is freed. On a machine with several
    NUMA nodes it is placed on the current GPU's node first (``numa``)."""
    t = torch.empty(shape, dtype=dtype)
    if t.numel() == 0:
        return t
    node = numa.store_node()
    if node is not None:  # several NUMA nodes: on the GPU's, before registering touches the pages
        numa.prefer_node(t, node)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"page-locking {t.nbytes / 2**20:.1f} MiB of host memory for experts failed "
                           f"(cudaHostRegister: {err}); is enough host memory free?")
    # when the last tensor on this memory is gone (views included), before the memory is reused
    weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, t.data_ptr()).atexit = False
    return t


def expert_tensors(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device="cpu",
                   pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised w13 [E, 2I, H] and w2 [E, H, I] as views of one [E, 3*I*H] block: expert e's
    gate/up rows and then its down rows are contiguous, ``expert_block`` sees them as one row.
    ``pin``: page-locked host memory of the exact size (:func:`pinned_empty`)."""
    E, H, I = num_experts, hidden, intermediate
    if pin and torch.device(device).type == "cpu":
        block = pinned_empty((E, 3 * I * H), dtype)
    else:
        block = torch.empty((E, 3 * I * H), dtype=dtype, device=device)
    return block[:, :2 * I * H].view(E, 2 * I, H), block[:, 2 * I * H:].view(E, H, I)


class Experts(NamedTuple):
    """E experts' tensors: w13 [E, 2I, H], w2 [E, H, I] (int4: [E, 2I, H/2], [E, H, I/2] codes), their
    scales (quantized only, else None), the [E, bytes-or-elements] block they are all views of (one
    row per expert, one copy each), the weights' format and, int4 with zero points, the zero points."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None
    block: torch.Tensor | None
    fmt: WeightFormat = WeightFormat()
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None

    @property
    def block_shape(self) -> tuple[int, int] | None:
        return self.fmt.block_shape

    @property
    def quant(self) -> Quant:
        return Quant(self.w13_scale, self.w2_scale, self.w13_zeros, self.w2_zeros)


def _row_layout(fmt: WeightFormat, hidden: int, intermediate: int) -> tuple[dict, int]:
    """({part: (byte offset, dtype, shape)}, row bytes) of one quantized expert's row (module docstring)."""
    H, I = hidden, intermediate
    wdtype = FP8 if fmt.kind == "fp8" else torch.uint8
    parts = [("w13", wdtype, (2 * I, fmt.stored_k(H))), ("w2", wdtype, (H, fmt.stored_k(I))),
             ("w13_scale", torch.float32, fmt.scale_shape(2 * I, H)), ("w2_scale", torch.float32, fmt.scale_shape(H, I))]
    if fmt.zero_points:
        parts += [("w13_zeros", torch.uint8, fmt.scale_shape(2 * I, H)), ("w2_zeros", torch.uint8, fmt.scale_shape(H, I))]
    out, at = {}, 0
    for name, dtype, shape in parts:
        at = -(-at // dtype.itemsize) * dtype.itemsize  # aligned to the element (the scales: to 4)
        out[name] = (at, dtype, shape)
        at += dtype.itemsize * math.prod(shape)
    return out, -(-at // 16) * 16


def quantized_expert_bytes(fmt: WeightFormat, hidden: int, intermediate: int) -> int:
    """Bytes of one quantized expert with its scales (and zero points), padded: what one copy moves,
    what one slot holds."""
    return _row_layout(fmt, hidden, intermediate)[1]


def fp8_expert_bytes(hidden: int, intermediate: int, block_shape=None) -> int:
    """Bytes of one fp8 expert with its scales, padded (what one copy moves, what one slot holds)."""
    return quantized_expert_bytes(WeightFormat("fp8", block_shape=check_block_shape(block_shape)), hidden, intermediate)


def allocate_experts(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device="cpu",
                     pin: bool = False, block_shape=None, fmt: WeightFormat | None = None) -> Experts:
    """Uninitialised experts in the one-block layout: ``expert_tensors`` for fp32/fp16/bf16; for
    quantized experts (``fmt``, or ``torch.float8_e4m3fn`` with ``block_shape``) one uint8 row per
    expert holding the weights, their fp32 scales and any zero points (see the module docstring)."""
    if fmt is None:
        fmt = WeightFormat("fp8", block_shape=check_block_shape(block_shape)) if dtype == FP8 else WeightFormat()
    if fmt.kind == "float":
        w13, w2 = expert_tensors(num_experts, hidden, intermediate, dtype, device, pin)
        return Experts(w13, w2, None, None, expert_block(w13, w2))
    E = num_experts
    layout, row = _row_layout(fmt, hidden, intermediate)
    if pin and torch.device(device).type == "cpu":
        block = pinned_empty((E, row), torch.uint8)
    else:
        block = torch.empty((E, row), dtype=torch.uint8, device=device)
    views = {name: block[:, at: at + dtype.itemsize * math.prod(shape)].view(dtype).view(E, *shape)
             for name, (at, dtype, shape) in layout.items()}
    return Experts(views["w13"], views["w2"], views["w13_scale"], views["w2_scale"], block, fmt,
                   views.get("w13_zeros"), views.get("w2_zeros"))


def expert_block(w13: torch.Tensor, w2: torch.Tensor, w13_scale=None, w2_scale=None,
                 block_shape=None, w13_zeros=None, w2_zeros=None, group_size=None) -> torch.Tensor | None:
    """[E, 3*I*H] view of both tensors when they are laid out as ``expert_tensors`` makes them
    (quantized, with scales: the [E, row bytes] uint8 block of ``allocate_experts``), else None."""
    if w13.dim() != 3 or w2.dim() != 3:
        return None
    if w13.dtype in (FP8, torch.uint8):
        quant = Quant(w13_scale, w2_scale, w13_zeros, w2_zeros)
        try:
            fmt = WeightFormat.of(w13.dtype, w13, w2, quant, block_shape, group_size)
        except (TypeError, ValueError):
            return None
        return _quantized_block(w13, w2, quant, fmt)
    E, I2, H = w13.shape
    n = 3 * I2 // 2 * H
    fused = (w2.shape == (E, H, I2 // 2) and w13.dtype == w2.dtype and w13.device == w2.device
             and _strides(w13, (n, H, 1)) and _strides(w2, (n, I2 // 2, 1))
             and w13.untyped_storage().data_ptr() == w2.untyped_storage().data_ptr()
             and w2.data_ptr() == w13.data_ptr() + I2 * H * w13.element_size())
    return w13.as_strided((E, n), (n, 1)) if fused else None


def _strides(t: torch.Tensor, want: tuple[int, ...]) -> bool:
    """t's strides are ``want`` where it matters (a dimension of size 1 has any stride: a store of
    one expert, as one rank of expert parallelism may hold, is still one block)."""
    return all(size == 1 or got == w for size, got, w in zip(t.shape, t.stride(), want))


def _quantized_block(w13, w2, quant: Quant, fmt: WeightFormat) -> torch.Tensor | None:
    """The [E, row bytes] uint8 block of quantized experts whose every part sits where
    ``_row_layout`` puts it in one storage, else None."""
    E, I2, Hs = w13.shape
    H, I = fmt.k_of(Hs), I2 // 2
    layout, row = _row_layout(fmt, H, I)
    tensors = {"w13": w13, "w2": w2, **{k: v for k, v in quant._asdict().items() if v is not None}}
    if set(tensors) != set(layout) or len({t.untyped_storage().data_ptr() for t in tensors.values()}) != 1:
        return None
    base = w13.data_ptr()
    for name, (at, dtype, shape) in layout.items():
        t = tensors[name]
        inner = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        if (t.dtype != dtype or tuple(t.shape) != (E, *shape) or t.data_ptr() != base + at
                or not _strides(t, (row // dtype.itemsize, *inner)) or (E > 1 and t.stride(0) * dtype.itemsize != row)):
            return None
    return w13.view(torch.uint8).as_strided((E, row), (row, 1))


EXPERT_DTYPES = (None, "fp8", "int4")
DEFAULT_INT4_GROUP = 128  # inputs per scale of int4 experts quantized at load (compressed-tensors' and GPTQ's usual)


def check_expert_dtype(expert_dtype) -> None:
    if isinstance(expert_dtype, WeightFormat):
        if expert_dtype.kind not in ("fp8", "int4"):
            raise ValueError(f"expert_dtype as a WeightFormat must be an fp8 or int4 one, got kind {expert_dtype.kind!r}")
        return
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be None (keep the weights' dtype), 'fp8', 'int4' or a WeightFormat, "
                         f"got {expert_dtype!r}")


def target_format(expert_dtype, block_shape=None, group_size=None) -> WeightFormat | None:
    """The format experts are quantized to as they are stored: fp8 (scales per output channel, or
    per ``block_shape``), int4 (symmetric, fp32 scales per ``group_size`` inputs, default 128), or
    None (kept as they are). ``expert_dtype`` may be the target ``WeightFormat`` itself (e.g. int4
    with zero points: ``WeightFormat("int4", group_size=32, zero_points=True)``), block or group inside it."""
    check_expert_dtype(expert_dtype)
    if isinstance(expert_dtype, WeightFormat):
        if block_shape is not None or group_size is not None:
            raise ValueError("expert_dtype is a WeightFormat: its block_shape and group_size are its own; pass "
                             "neither beside it")
        f = expert_dtype
        if f.kind == "fp8":
            return WeightFormat("fp8", block_shape=check_block_shape(f.block_shape))
        return WeightFormat("int4", group_size=check_group_size(f.group_size), zero_points=bool(f.zero_points))
    if block_shape is not None and expert_dtype not in (None, "fp8"):
        raise ValueError("block_shape is fp8's scale layout; int4 experts take group_size")
    if group_size is not None and expert_dtype != "int4":
        raise ValueError("group_size goes with expert_dtype='int4'")
    if expert_dtype == "fp8":
        return WeightFormat("fp8", block_shape=check_block_shape(block_shape))
    if expert_dtype == "int4":
        return WeightFormat("int4", group_size=check_group_size(group_size or DEFAULT_INT4_GROUP))
    return None


def host_copy(w13: torch.Tensor, w2: torch.Tensor, pin: bool, expert_dtype: str | None = None,
              block_shape=None, group_size=None) -> Experts:
    """One layer's experts copied into host tensors of the one-block layout (pinned if asked);
    ``expert_dtype="fp8"`` / ``"int4"``: quantized as they are copied (``target_format``), one
    expert at a time. Tensors of mismatched shapes are copied as they are (the store's constructor
    names the problem)."""
    w13, w2 = w13.detach(), w2.detach()
    fmt = target_format(expert_dtype, block_shape, group_size)
    if w13.dtype in (FP8, torch.uint8):
        raise ValueError(f"{'fp8' if w13.dtype == FP8 else 'int4 (uint8 codes)'} experts come with their scales: "
                         "build the store with HostExpertStore(w13, w2, w13_scale, w2_scale, ...)")
    if w13.dim() == 3 and w2.dim() == 3 and tuple(w2.shape) == (w13.shape[0], w13.shape[2], w13.shape[1] // 2) \
            and w13.dtype == w2.dtype:
        E, H, I = w13.shape[0], w13.shape[2], w13.shape[1] // 2
        if fmt is not None:
            out = allocate_experts(E, H, I, w13.dtype, pin=pin, fmt=fmt)
            for which, w in ((0, w13), (1, w2)):
                dst, dst_scale, dst_zeros = out[which], out.quant.of(which)[0], out.quant.of(which)[1]
                for e in range(E):  # an expert at a time: the fp32 temporaries stay one expert's size
                    q, sc, z = fmt.quantize(w[e].to("cpu"))
                    dst[e].copy_(q)
                    dst_scale[e].copy_(sc)
                    if dst_zeros is not None:
                        dst_zeros[e].copy_(z)
            return out
        out = allocate_experts(E, H, I, w13.dtype, pin=pin)
        out.w13.copy_(w13)
        out.w2.copy_(w2)
        return out
    return Experts(w13.to("cpu").contiguous(), w2.to("cpu").contiguous(), None, None, None)


def expert_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules holding one MoE layer's routed experts as fused 3-D ``gate_up_proj`` [E, 2I, H]
    and ``down_proj`` [E, H, I] tensors (transformers 5.x experts), in module (= layer) order."""
    found = [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
             and isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3]
    if not found:
        raise ValueError(f"{type(model).__name__} has no submodule with 3-D gate_up_proj and down_proj experts")
    return found


# ----------------------------------------------------------------------------- safetensors checkpoints

_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                            r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.(weight|weight_scale_inv|weight_scale)$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_DEFAULT_CHECKPOINT_BLOCKS = (128, 128)  # DeepSeek-V3's and Qwen3 FP8's weight_block_size


def _checkpoint_layer(l: int, entries: dict, pin: bool, expert_dtype: str | None, block_shape,
                      group_size=None) -> Experts:
    """One MoE layer of a checkpoint (``entries``: (expert, part, kind) -> (file, name)) in the
    one-block layout, filled expert by expert (fp8: with the checkpoint's scales)."""
    E = 1 + max(e for e, _, _ in entries)
    missing = [(e, q) for e in range(E) for q in ("gate", "up", "down") if (e, q, "weight") not in entries]
    if missing:
        raise ValueError(f"layer {l}: checkpoint lacks expert tensors {missing[:4]}")

    def get(e: int, q: str, kind: str = "weight") -> torch.Tensor:
        f, name = entries[(e, q, kind)]
        return f.get_tensor(name)

    first = get(0, "gate")
    if first.dim() != 2:
        raise ValueError(f"layer {l}: expert weight {entries[(0, 'gate', 'weight')][1]} is not 2-D: {list(first.shape)}")
    I, H = first.shape
    fp8 = first.dtype == FP8
    kinds = sorted({kind for _, _, kind in entries if kind != "weight"})
    if fp8 and len(kinds) != 1:
        raise ValueError(f"layer {l}: fp8 expert weights need one kind of scales (weight_scale_inv or "
                         f"weight_scale), found {kinds or 'none'}")
    if fp8:
        kind = kinds[0]
        s0 = get(0, "gate", kind)
        blocks = kind == "weight_scale_inv" or (s0.dim() == 2 and s0.shape[0] != I)  # else per channel / tensor
        block_shape = check_block_shape(block_shape or _DEFAULT_CHECKPOINT_BLOCKS) if blocks else None
        _checkpoint_scale(s0, I, H, block_shape, f"layer {l}: {entries[(0, 'gate', kind)][1]}")  # the blocks match
        if blocks and I % block_shape[0]:
            raise ValueError(f"layer {l}: the intermediate size {I} is not a multiple of the scale blocks' "
                             f"{block_shape[0]} rows, so gate and up share a block in the fused w13; not supported")
        out = allocate_experts(E, H, I, FP8, pin=pin, block_shape=block_shape)
    else:
        out = allocate_experts(E, H, I, first.dtype, pin=pin and expert_dtype is None)
    n = I // block_shape[0] if fp8 and block_shape else I  # scale rows of gate (and of up) in w13's
    for e in range(E):
        # (part, its weight rows and scale rows in w13, or None: w2)
        for q, rows, scale_rows in (("gate", slice(0, I), slice(0, n)), ("up", slice(I, 2 * I), slice(n, 2 * n)),
                                    ("down", None, None)):
            t = get(e, q)
            want = (H, I) if q == "down" else (I, H)
            if tuple(t.shape) != want or t.dtype != first.dtype:
                raise ValueError(f"layer {l}: {entries[(e, q, 'weight')][1]} is {t.dtype} {list(t.shape)}, "
                                 f"expected {first.dtype} {list(want)} like the layer's first expert")
            (out.w2[e] if rows is None else out.w13[e, rows]).copy_(t)
            if fp8:
                if (e, q, kind) not in entries:
                    raise ValueError(f"layer {l}: {entries[(e, q, 'weight')][1]} has no {kind}")
                s = _checkpoint_scale(get(e, q, kind), *want, block_shape, f"layer {l}: {entries[(e, q, kind)][1]}")
                (out.w2_scale[e] if rows is None else out.w13_scale[e, scale_rows]).copy_(s)
    if expert_dtype is not None and not fp8:  # quantized as loaded: one layer at a time in 16/32 bits
        return host_copy(out.w13, out.w2, pin, expert_dtype, block_shape, group_size)
    return out


def _checkpoint_scale(s: torch.Tensor, n: int, k: int, block_shape, what: str) -> torch.Tensor:
    """A checkpoint's scale for one [n, k] matrix as the store's fp32 scales (per output channel
    [n]: a per-tensor or [n, 1] scale; blocks: [cdiv(n, bn), cdiv(k, bk)])."""
    s = s.float()
    if block_shape is None:
        if s.numel() == 1:
            return s.reshape(1).expand(n)
        if s.numel() == n and (s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1)):
            return s.reshape(n)
        raise ValueError(f"{what}: scale shape {list(s.shape)} is neither per tensor nor per output channel [{n}, 1]")
    want = scale_shape(n, k, block_shape)
    if tuple(s.shape) != want:
        raise ValueError(f"{what}: scale shape {list(s.shape)} does not match blocks of {list(block_shape)} of a "
                         f"[{n}, {k}] matrix ({list(want)}); pass the checkpoint's block_shape")
    return s


class HostExpertStore:
    """All experts in host memory, one (w13, w2) tensor pair per MoE layer; quantized experts with one
    (w13_scale, w2_scale) pair per layer too, and int4 ones with zero points one (w13_zeros,
    w2_zeros) pair (``fmt``, a ``kernels.weight_format.WeightFormat``: fp8's ``block_shape``,
    None per output channel; int4's ``group_size``)."""

    def __init__(self, w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor],
                 w13_scale: Sequence[torch.Tensor] | None = None, w2_scale: Sequence[torch.Tensor] | None = None,
                 block_shape=None, w13_zeros: Sequence[torch.Tensor] | None = None,
                 w2_zeros: Sequence[torch.Tensor] | None = None, group_size=None):
        if len(w13) != len(w2) or not w13:
            raise ValueError(f"need one w13 and one w2 per layer, got {len(w13)} and {len(w2)}")
        L = len(w13)
        per_layer = {"w13_scale": w13_scale, "w2_scale": w2_scale, "w13_zeros": w13_zeros, "w2_zeros": w2_zeros}
        for name, t in per_layer.items():
            if t is not None and len(t) != L:
                raise ValueError(f"need one {name} per layer, got {len(t)} for {L} layers")
        quant = [Quant(*(None if t is None else t[l] for t in per_layer.values())) for l in range(L)]
        fmt = WeightFormat.of(w13[0].dtype, w13[0], w2[0], quant[0], block_shape, group_size)
        if fmt.kind != "float" and (w13_scale is None or w2_scale is None):
            raise ValueError(f"{fmt.kind} experts need one w13_scale and one w2_scale per layer")
        E, I2, Hs = w13[0].shape
        H, I = fmt.k_of(Hs), I2 // 2
        for l, (a, b) in enumerate(zip(w13, w2)):
            if a.dim() != 3 or tuple(a.shape) != (E, I2, Hs) or tuple(b.shape) != (E, H, fmt.stored_k(I)) or I2 % 2:
                raise ValueError(f"layer {l}: w13 {tuple(a.shape)} / w2 {tuple(b.shape)} do not match "
                                 f"[E, 2I, H{fmt.packing}] = {(E, I2, Hs)} / [E, H, I{fmt.packing}] = "
                                 f"{(E, H, fmt.stored_k(I))}")
            if a.dtype != w13[0].dtype or b.dtype != w13[0].dtype:
                raise TypeError(f"layer {l}: dtypes {a.dtype}/{b.dtype} differ from {w13[0].dtype}")
            if a.device.type != "cpu" or b.device.type != "cpu":
                raise ValueError(f"layer {l}: the store holds host tensors, got {a.device}/{b.device}")
            if fmt.kind != "float":
                if WeightFormat.of(a.dtype, a, b, quant[l], block_shape, group_size) != fmt:
                    raise ValueError(f"layer {l}: its experts' format differs from layer 0's ({fmt})")
                fmt.check(a, quant[l].w13_scale, quant[l].w13_zeros, f"layer {l}: w13")
                fmt.check(b, quant[l].w2_scale, quant[l].w2_zeros, f"layer {l}: w2")
        self.fmt = fmt
        self.w13, self.w2 = list(w13), list(w2)
        self.w13_scale = list(w13_scale) if fmt.kind != "float" else None
        self.w2_scale = list(w2_scale) if fmt.kind != "float" else None
        self.w13_zeros = list(w13_zeros) if fmt.zero_points else None
        self.w2_zeros = list(w2_zeros) if fmt.zero_points else None
        # one block per expert (one copy each), or None: two copies per expert (quantized experts must have one)
        self.blocks = [expert_block(a, b, *quant[l][:2], fmt.block_shape, *quant[l][2:], fmt.group_size)
                       for l, (a, b) in enumerate(zip(self.w13, self.w2))]
        if fmt.kind != "float" and None in self.blocks:
            raise ValueError(f"{fmt.kind} experts must be in the one-block layout (weights, scales and zero points "
                             "in one row per expert, memory.store.allocate_experts): build them with "
                             f"HostExpertStore.from_tensors(..., expert_dtype='{fmt.kind}') or allocate_experts")
        self.num_layers, self.num_experts, self.hidden, self.intermediate = L, E, H, I
        self.dtype = w13[0].dtype

    @property
    def block_shape(self) -> tuple[int, int] | None:
        return self.fmt.block_shape

    def quant(self, layer: int) -> Quant:
        """The scales and zero points of ``layer``'s experts (all None for float experts)."""
        pick = lambda ts: None if ts is None else ts[layer]  # noqa: E731
        return Quant(pick(self.w13_scale), pick(self.w2_scale), pick(self.w13_zeros), pick(self.w2_zeros))

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w13 + w2 parts; quantized: with its scales, zero points and padding),
        the unit of every copy."""
        if self.fmt.kind != "float":
            return quantized_expert_bytes(self.fmt, self.hidden, self.intermediate)
        return 3 * self.hidden * self.intermediate * self.dtype.itemsize

    @classmethod
    def from_experts(cls, layers: Sequence[Experts], block_shape=None) -> "HostExpertStore":
        """From one ``Experts`` per layer (``host_copy``'s or ``allocate_experts``' result; the
        format is theirs, fp8's scale blocks unless ``block_shape`` is given)."""
        fmt = layers[0].fmt
        if fmt.kind == "float" and layers[0].w13.dtype in (FP8, torch.uint8):
            fmt = WeightFormat("fp8", block_shape=block_shape)  # (bare tensors: the caller's layout)
        cols = [list(t) for t in zip(*(tuple(e[:4]) + (e.w13_zeros, e.w2_zeros) for e in layers))]
        w13, w2, s13, s2, z13, z2 = (c if any(t is not None for t in c) else None for c in cols)
        return cls(w13, w2, s13, s2, fmt.block_shape if block_shape is None else block_shape, z13, z2,
                   fmt.group_size)

    @property
    def pinned(self) -> bool:
        return all(t.is_pinned() for t in self.w13 + self.w2)

    # ------------------------------------------------------------------------------ builders

    @classmethod
    def from_tensors(cls, w13: torch.Tensor, w2: torch.Tensor, pin: bool | None = None, expert_dtype: str | None = None,
                     block_shape=None, group_size=None) -> "HostExpertStore":
        """From w13 [L, E, 2I, H] and w2 [L, E, H, I] (or per-layer lists). Pinned by default when
        CUDA is available; copied layer by layer, so at most one extra layer exists at a time.
        ``expert_dtype="fp8"``: quantized to e4m3 as they are copied (``block_shape``: the scales'
        blocks, None per output channel); ``"int4"``: to int4 codes with a scale per ``group_size``
        inputs (default 128; experimental: its quality is measured on the routing study's models only)."""
        pin = torch.cuda.is_available() if pin is None else pin
        if isinstance(w13, torch.Tensor) and w13.dim() != 4:
            raise ValueError(f"w13 must be [L, E, 2I, H], got shape {tuple(w13.shape)}")
        if isinstance(w2, torch.Tensor) and w2.dim() != 4:
            raise ValueError(f"w2 must be [L, E, H, I], got shape {tuple(w2.shape)}")
        return cls.from_experts([host_copy(a, b, pin, expert_dtype, block_shape, group_size) for a, b in zip(w13, w2)],
                                block_shape)

    @classmethod
    def from_parameters(cls, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], pin: bool | None = None,
                        release=None, expert_dtype: str | None = None, block_shape=None,
                        group_size=None) -> "HostExpertStore":
        """From (gate_up [E, 2I, H], down [E, H, I]) parameter pairs, one per MoE layer, e.g. the
        ``experts.gate_up_proj`` / ``experts.down_proj`` of transformers' OLMoE and Mixtral blocks.
        ``release(layer_index)`` is called after each layer is copied so the caller can drop the
        original (keeps peak memory at one layer above the store). ``expert_dtype="fp8"``: quantized
        as they are copied (see ``from_tensors``)."""
        pin = torch.cuda.is_available() if pin is None else pin
        layers = []
        for l, (gate_up, down) in enumerate(pairs):
            layers.append(host_copy(gate_up, down, pin, expert_dtype, block_shape, group_size))
            if release is not None:
                release(l)
        return cls.from_experts(layers, block_shape)

    @classmethod
    def from_module(cls, model: torch.nn.Module, pin: bool | None = None, expert_dtype: str | None = None,
                    block_shape=None, group_size=None) -> "HostExpertStore":
        """From every submodule with fused ``gate_up_proj`` and ``down_proj`` parameters
        (transformers 5.x experts), in module order."""
        return cls.from_parameters([(m.gate_up_proj, m.down_proj) for m in expert_modules(model)], pin,
                                   expert_dtype=expert_dtype, block_shape=block_shape, group_size=group_size)

    @classmethod
    def from_safetensors(cls, paths: str | Path | Sequence[str | Path], pin: bool | None = None,
                         progress: bool = True, expert_dtype: str | None = None,
                         block_shape=None, group_size=None) -> "HostExpertStore":
        """Stream the routed experts of an OLMoE/Mixtral/Qwen-MoE/DeepSeek-style checkpoint (one
        tensor per expert and projection, HF naming) layer by layer into the store. Recognised names:
        ``...layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (OLMoE, Qwen-MoE, DeepSeek) and
        ``...layers.{l}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` (Mixtral).

        FP8 checkpoints are served with their own scales, never requantized: e4m3 weights with
        ``weight_scale_inv`` blocks (DeepSeek-V3, Qwen3 FP8; ``block_shape`` their blocks, default
        128 x 128) or compressed-tensors' ``weight_scale`` (per output channel, or per tensor:
        expanded to one per output channel, exactly; 2-D block scales as ``weight_scale_inv``).
        Activation scales (``input_scale``) are not used: the kernels compute with 16-bit
        activations. ``expert_dtype="fp8"``: a 16/32-bit checkpoint's experts are quantized layer
        by layer as they are loaded (``block_shape``: the scales' blocks, None per output channel)."""
        from safetensors import safe_open
        from tqdm import tqdm

        target_format(expert_dtype, None, group_size)  # (refuses an unknown dtype, a group without int4)
        pin = torch.cuda.is_available() if pin is None else pin
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        with contextlib.ExitStack() as files:  # each file opened (memory-mapped) once
            index: dict[int, dict[tuple[int, str, str], tuple[object, str]]] = {}
            for p in paths:
                f = files.enter_context(safe_open(str(p), framework="pt"))
                for name in f.keys():
                    m = _EXPERT_TENSOR.search(name)
                    if m:
                        index.setdefault(int(m[1]), {})[(int(m[2]), _PART[m[3]], m[4])] = (f, name)
            if not index:
                raise ValueError(f"no routed-expert tensors found in {', '.join(map(str, paths))}")
            layers = [_checkpoint_layer(l, index[l], pin, expert_dtype, block_shape, group_size) for l in
                      tqdm(sorted(index), desc="experts -> host store", unit="layer", disable=not progress)]
        layouts = {e.block_shape for e in layers if e.w13.dtype == FP8}
        if len({e.w13.dtype for e in layers}) > 1 or len(layouts) > 1:
            raise ValueError("the checkpoint's MoE layers differ in expert dtype or fp8 scale layout "
                             f"({sorted({str(e.w13.dtype) for e in layers})}, scale blocks {layouts}); "
                             "the store holds one format")
        return cls.from_experts(layers)
