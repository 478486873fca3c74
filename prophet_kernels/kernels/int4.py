"""INT4 (w4a16) expert weights: group-wise quantization, packing, and the layout the kernels read.

A weight matrix W [N, K] (w13: N = 2I, K = H; w2: N = H, K = I) is held as unsigned 4-bit codes
q in [0, 15], two per byte along K, with an fp32 scale and a zero point per G consecutive inputs of
a row (G, the group size: 32, 64 or 128; K a multiple of G)::

    packed  uint8 [..., N, K/2]          q[n, 2j] = packed[n, j] & 0xF   q[n, 2j+1] = packed[n, j] >> 4
    scale   fp32  [..., N, K/G]          W[n, k] ~ (q[n, k] - z[n, k // G]) * scale[n, k // G]
    zeros   uint8 [..., N, K/G] or None  None: symmetric, z = 8 for every group

This is compressed-tensors' pack-quantized layout (``weight_packed`` int32 [N, K/8], nibble i of a
little-endian word holding input 8m + i, signed codes stored + 8) read as bytes: a checkpoint's
packed weights are used as they are. Its packed zero points, GPTQ's ([K/8, N] words, zero points
stored minus one in its v1 format) and AWQ's (packed along N, interleaved) layouts are repacked once
at load into the one above.

The kernels (``gemv``, ``grouped_gemm``) read a [BN, BK/2] tile of bytes, split it into the even and
the odd inputs' codes, subtract the group's zero point (an integer in [-15, 15]: exact in fp16,
bf16 and fp32), multiply by the activations' even and odd elements, and apply the group's scale to
the tile's fp32 partial sums (a K tile never spans two groups: BK divides G).
"""

from __future__ import annotations

import torch

INT4_GROUPS = (32, 64, 128)
SYMMETRIC_ZERO = 8  # the zero point of symmetric codes (signed -8..7 stored + 8)
_TINY = 1e-12  # an all-zero group gets this scale instead of 0


def check_group_size(group_size) -> int:
    """The group size as a Python int: 32, 64 or 128 (what the kernels' K tiles divide)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUPS:
        raise ValueError(f"int4 group_size must be one of {list(INT4_GROUPS)}, got {group_size!r}")
    return group_size


def check_k(k: int, group_size: int, what: str) -> None:
    if k % group_size:
        raise ValueError(f"{what}: its input size {k} is not a multiple of the int4 group size {group_size}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [..., N, K] (integers in [0, 15], K even) -> packed uint8 [..., N, K/2], even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of inputs, got K = {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 [..., N, K/2] -> codes uint8 [..., N, K] in [0, 15]."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize_int4(w: torch.Tensor, group_size: int = 128, zero_points: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [..., N, K] floating -> (packed uint8 [..., N, K/2], scale fp32 [..., N, K/G], zeros uint8
    [..., N, K/G] or None). Symmetric: scale = the group's largest magnitude / 7, codes round(w/s) + 8
    in [1, 15]. With zero points: the group's range [min(w, 0), max(w, 0)] over the 16 codes (AWQ's
    and GPTQ's asymmetric convention). The codes are ``encode_int4``'s for these scales."""
    if not w.dtype.is_floating_point or w.dtype == torch.float8_e4m3fn:
        raise TypeError(f"quantize_int4 takes fp32/fp16/bf16 weights, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"quantize_int4 takes [..., N, K] weights, got shape {list(w.shape)}")
    g = check_group_size(group_size)
    K = w.shape[-1]
    check_k(K, g, "quantize_int4")
    x = w.float().reshape(*w.shape[:-1], K // g, g)
    if zero_points:
        scale = ((x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / 15).clamp(min=_TINY)
    else:
        scale = (x.abs().amax(-1) / 7).clamp(min=_TINY)
    packed, zeros = encode_int4(w, scale, zero_points)
    return packed, scale.contiguous(), zeros


def encode_int4(w: torch.Tensor, scale: torch.Tensor, zero_points: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [..., N, K] and its group scales [..., N, K/G] -> (packed codes uint8 [..., N, K/2], zero
    points uint8 [..., N, K/G] or None): codes round(w / s) + z in [0, 15], with z = round(-min(w, 0)
    / s) per group (zero points) or 8 (symmetric)."""
    x = w.float().reshape(*w.shape[:-1], scale.shape[-1], -1)
    s = scale.float()[..., None]
    z = torch.round(-x.amin(-1, keepdim=True).clamp(max=0) / s).clamp(0, 15) if zero_points else \
        torch.full_like(s, SYMMETRIC_ZERO)
    q = torch.clamp(torch.round(x / s) + z, 0, 15).reshape(w.shape)
    return pack_int4(q), z[..., 0].to(torch.uint8) if zero_points else None


def expand_groups(t: torch.Tensor, k: int) -> torch.Tensor:
    """A per-group tensor [..., N, K/G] repeated to every input: [..., N, K]."""
    return t.repeat_interleave(k // t.shape[-1], dim=-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Packed codes, their scales and zero points (None: 8) -> fp32 weights [..., N, K] (what the references use)."""
    q = unpack_int4(packed).float()
    K = q.shape[-1]
    z = SYMMETRIC_ZERO if zeros is None else expand_groups(zeros.float(), K)
    return (q - z) * expand_groups(scale.float(), K)


# --- checkpoint formats packed in int32 words --------------------------------------------------
# GPTQ and AWQ store eight 4-bit values per int32 word, nibble i being bits 4i..4i+3. GPTQ packs
# inputs (qweight [K/8, N]: word m of column n holds inputs 8m..8m+7 in order) and its zero points
# along the outputs (qzeros [K/G, N/8], in order), the zero points minus one in its v1 format
# (``checkpoint_format`` "gptq"; "gptq_v2" stores them as they are); the scales are [K/G, N]. AWQ
# packs outputs, interleaved (qweight [K, N/8] and qzeros [K/G, N/8]: nibble i of word m holds output
# 8m + AWQ_ORDER[i]); its zero points are stored as they are. Both are repacked once at load into
# the layout above (``gptq_int4``, ``awq_int4``).

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i of a word holds output 8m + AWQ_ORDER[i]


def _little_endian_bytes(words: torch.Tensor) -> torch.Tensor:
    import sys

    if words.dtype != torch.int32:
        raise TypeError(f"packed int4 words must be int32, got {words.dtype}")
    if sys.byteorder != "little":  # (a word's bytes are read low byte first)
        raise RuntimeError("reading int4 words as bytes needs a little-endian host")
    return words.contiguous().view(torch.uint8)


def unpack_words(words: torch.Tensor, order=None) -> torch.Tensor:
    """int32 words [..., W] of eight 4-bit values -> uint8 [..., 8W]: nibble i of word m goes to
    position 8m + order[i] (order None: 8m + i)."""
    nibbles = unpack_int4(_little_endian_bytes(words))  # [..., 8W], nibble order
    if order is None:
        return nibbles
    nibbles = nibbles.reshape(*words.shape, 8)
    out = torch.empty_like(nibbles)
    out[..., list(order)] = nibbles
    return out.reshape(*words.shape[:-1], -1)


def pack_words(values: torch.Tensor, order=None) -> torch.Tensor:
    """``unpack_words``' inverse: uint8 values in [0, 15] [..., 8W] -> int32 words [..., W]."""
    if values.shape[-1] % 8:
        raise ValueError(f"pack_words needs a multiple of 8 values, got {values.shape[-1]}")
    v = values.to(torch.uint8)
    if order is not None:
        v = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)].reshape(v.shape)
    return pack_int4(v).contiguous().view(torch.int32)


def gptq_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, symmetric: bool,
              v1: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GPTQ int4 matrix (qweight int32 [..., K/8, N], scales [..., K/G, N], qzeros int32
    [..., K/G, N/8]) -> (packed uint8 [..., N, K/2], scale fp32 [..., N, K/G], zeros uint8
    [..., N, K/G], or None when ``symmetric``). Its codes are a transpose away from this module's
    (inputs along a word, low nibble first). v1 zero points are stored minus one, modulo 16 (a zero
    point of 0 is stored as 15). Symmetric checkpoints must hold the symmetric zero point (8) in
    every group: anything else is a checkpoint its config misdescribes, refused."""
    packed = _little_endian_bytes(qweight.transpose(-1, -2))  # [..., N, K/2]
    zeros = ((unpack_words(qzeros).to(torch.int16) + (1 if v1 else 0)) & 0xF).to(torch.uint8)
    zeros = zeros.transpose(-1, -2).contiguous()
    if symmetric:
        if not bool((zeros == SYMMETRIC_ZERO).all()):
            found = sorted(set(zeros.flatten().tolist()))[:4]
            raise ValueError(f"a GPTQ checkpoint marked sym holds zero points other than {SYMMETRIC_ZERO} "
                             f"(read as {'v1: stored minus one' if v1 else 'v2: stored as they are'}): "
                             f"{found}; its checkpoint_format or sym setting is wrong")
        zeros = None
    return packed, scales.transpose(-1, -2).float().contiguous(), zeros


def awq_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An AWQ (GEMM) int4 matrix (qweight int32 [..., K, N/8] and qzeros int32 [..., K/G, N/8], both
    interleaved along N by ``AWQ_ORDER``; scales [..., K/G, N]) -> (packed uint8 [..., N, K/2],
    scale fp32 [..., N, K/G], zeros uint8 [..., N, K/G])."""
    codes = unpack_words(qweight, AWQ_ORDER).transpose(-1, -2)  # [..., N, K]
    zeros = unpack_words(qzeros, AWQ_ORDER).transpose(-1, -2).contiguous()
    return pack_int4(codes).contiguous(), scales.transpose(-1, -2).float().contiguous(), zeros
