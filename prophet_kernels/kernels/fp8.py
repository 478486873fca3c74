"""FP8 (e4m3) expert weights: quantization, dequantization and the scale layouts the kernels read.

An fp8 weight matrix W [N, K] (w13: N = 2I, K = H; w2: N = H, K = I) is stored as
``q = round_e4m3(W / s)`` with fp32 scales ``s`` in one of two layouts:

    per output channel   block_shape None        scale [..., N]                     W[n, :] ~ q[n, :] * s[n]
    blocks (DeepSeek/    block_shape (bn, bk)    scale [..., cdiv(N, bn), cdiv(K, bk)]
    Qwen FP8 checkpoints, vLLM's block fp8)                                         W[n, k] ~ q[n, k] * s[n // bn, k // bk]

(the second is what DeepSeek-V3's and Qwen3's FP8 checkpoints call ``weight_scale_inv``, with
bn = bk = 128). The kernels read both through one view, ``scale_view``: [S, R, C] with row group
GN and column group GK, i.e. per output channel is the block layout with blocks of 1 x K.
Dequantization (the references) is ``q.float() * s`` expanded to [N, K]; the kernels convert q
exactly to the activation dtype (e4m3 fits in fp16 and bf16), accumulate in fp32 and apply s per
block (or once per row, per output channel).

GPUs without fp8 types (compute capability below 8.9: A100, A10, RTX 30xx; Triton refuses
``float8e4nv`` there) get the same kernels reading the weights' bytes as uint8 and decoding e4m3
with integer ops (``e4m3_bits_to``: exact for every finite value), chosen per launch by
``weight_format.WeightFormat.kernel_args``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_TINY = 1e-12  # an all-zero row or block gets a scale of _TINY / FP8_MAX instead of 0


def check_block_shape(block_shape) -> tuple[int, int] | None:
    """None (per output channel) or (bn, bk), powers of two >= 16 (the kernels' tiles divide them),
    returned as a tuple of Python ints. Given as a tuple, list, tensor or array of two whole numbers
    (integral floats included); a fractional size such as 128.5 is refused, never truncated."""
    if block_shape is None:
        return None
    try:
        values = block_shape.tolist() if hasattr(block_shape, "tolist") else list(block_shape)
        if len(values) != 2 or any(isinstance(b, bool) or float(b) != int(b) for b in values):
            raise ValueError
        bn, bk = (int(b) for b in values)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"block_shape must be None or (bn, bk), two whole numbers; got {block_shape!r}") from None
    for b in (bn, bk):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_shape {tuple(block_shape)}: block sizes must be powers of two >= 16")
    return bn, bk


def scale_shape(n: int, k: int, block_shape) -> tuple[int, ...]:
    """The scale shape of one [n, k] matrix (see the module docstring)."""
    if block_shape is None:
        return (n,)
    bn, bk = block_shape
    return (-(-n // bn), -(-k // bk))


def quantize_fp8(w: torch.Tensor, block_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] floating -> (q [..., N, K] float8_e4m3fn, scale fp32 [..., N] or
    [..., cdiv(N, bn), cdiv(K, bk)]): the scale maps each row's (block's) largest magnitude to 448."""
    if not w.dtype.is_floating_point or w.dtype == FP8:
        raise TypeError(f"quantize_fp8 takes fp32/fp16/bf16 weights, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"quantize_fp8 takes [..., N, K] weights, got shape {list(w.shape)}")
    block_shape = check_block_shape(block_shape)
    wf = w.float()
    N, K = wf.shape[-2:]
    if block_shape is None:
        scale = wf.abs().amax(dim=-1).clamp(min=_TINY) / FP8_MAX
        q = (wf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q, scale
    bn, bk = block_shape
    R, C = scale_shape(N, K, block_shape)
    padded = torch.nn.functional.pad(wf, (0, C * bk - K, 0, R * bn - N))
    blocks = padded.reshape(*wf.shape[:-2], R, bn, C, bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=_TINY) / FP8_MAX  # [..., R, C]
    q = (wf / expand_scale(scale, N, K, block_shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def expand_scale(scale: torch.Tensor, n: int, k: int, block_shape) -> torch.Tensor:
    """The scale of every weight element: [..., n, 1] (per channel) or [..., n, k] (blocks)."""
    if block_shape is None:
        return scale[..., None]
    bn, bk = block_shape
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_shape=None) -> torch.Tensor:
    """q [..., N, K] fp8 and its scale -> fp32 weights [..., N, K] (what the references compute with)."""
    N, K = q.shape[-2:]
    return q.float() * expand_scale(scale.float(), N, K, check_block_shape(block_shape))


def check_scales(w: torch.Tensor, scale, name: str, block_shape) -> None:
    """An fp8 weight [S, N, K] needs an fp32 scale of its layout's shape on its device; an
    unquantized one takes none. TypeError / ValueError naming the problem."""
    if w.dtype != FP8:
        if scale is not None:
            raise ValueError(f"{name}_scale given for {w.dtype} weights: scales go with float8_e4m3fn weights")
        return
    if scale is None:
        raise ValueError(f"{name} is float8_e4m3fn: pass {name}_scale (its fp32 dequantization scales)")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"{name}_scale must be a float32 tensor, got "
                        f"{scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__}")
    want = (w.shape[0], *scale_shape(w.shape[1], w.shape[2], block_shape))
    if tuple(scale.shape) != want:
        layout = "per output channel" if block_shape is None else f"blocks of {block_shape[0]}x{block_shape[1]}"
        raise ValueError(f"{name}_scale must be {list(want)} for {name} {list(w.shape)} with scales {layout}, "
                         f"got {list(scale.shape)}")
    if scale.device != w.device:
        raise ValueError(f"{name}_scale is on {scale.device}, {name} on {w.device}")


def scale_view(scale: torch.Tensor, k: int, block_shape) -> tuple[torch.Tensor, int, int]:
    """(scale as [S, R, C], GN, GK) for the kernels: row n, column k read scale[s, n // GN, k // GK]."""
    if block_shape is None:
        return scale[..., None], 1, max(k, 1)
    return scale, block_shape[0], block_shape[1]


# ----------------------------------------------------------------------------- kernels' side


@functools.lru_cache(maxsize=None)
def has_fp8_type(device: torch.device) -> bool:
    """Whether Triton can load float8_e4m3fn on `device` (CUDA capability >= 8.9; the interpreter
    can). Checked once per device: this runs on every decode call."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def e4m3_bits_to(v, DTYPE: tl.constexpr):
    """uint8 e4m3fn bytes -> DTYPE, exact for every value: the NaN bytes 0x7f/0xff decode to NaN
    (as torch's float8_e4m3fn and the GPUs' fp8 loads do), so a NaN weight reaches the output as it
    would on an fp8 GPU instead of a finite wrong +-480. The sign goes to fp16's sign bit, exponent
    and mantissa to fp16's 7 bits below its top exponent bit: that fp16 is the value x 2^-8 (bias 15
    instead of 7; e4m3 subnormals land on fp16 subnormals), scaled back in fp32."""
    b = v.to(tl.uint16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    x = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((b & 0x7F) == 0x7F, float("nan"), x).to(DTYPE)


@triton.jit
def load_weights_as(v, DTYPE: tl.constexpr, FP8_BITS: tl.constexpr):
    """Loaded weights in DTYPE: decoded from e4m3 bytes (FP8_BITS), else converted (exact for fp8
    weights into fp16/bf16/fp32, a no-op for weights already in DTYPE)."""
    if FP8_BITS:
        return e4m3_bits_to(v, DTYPE)
    else:
        return v.to(DTYPE)
