"""The expert weights' format: one description from the caller (or the store) to the kernels' constexprs.

Three formats, told apart by the weights' dtype and checked once per call (``WeightFormat.of``)::

    kind    weights [S, N, K']                 scales (fp32)                     zero points      kernels read
    float   x's dtype, K' = K                  none                              none             W as is
    fp8     float8_e4m3fn, K' = K              per output channel [S, N]         none             q * s  (``fp8``)
                                               or per block [S, N/bn, K/bk]
    int4    uint8, two codes a byte, K' = K/2  per group of G inputs [S, N, K/G] uint8 [S, N, K/G]  (q - z) * s  (``int4``)
                                                                                 or none (z = 8)

(w13: N = 2I, K = H; w2: N = H, K = I.) Every kernel takes its constexprs from ``kernel_args``:
SCALE (0 none, 1 one per row, 2 per block of GN x GK: fp8 blocks and int4 groups alike, GN = 1 and
GK = G for int4), FP8_BITS (fp8 read as bytes and decoded where the GPU has no fp8 type), INT4 and
ZP (int4 codes, with stored zero points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import fp8, int4
from .fp8 import FP8

class Quant(NamedTuple):
    """The tensors that go with quantized weights (None where the format has none)."""
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None

    def of(self, which: int) -> tuple:
        """(scale, zeros) of w13 (0) or w2 (1)."""
        return (self.w13_scale, self.w13_zeros) if which == 0 else (self.w2_scale, self.w2_zeros)


@dataclass(frozen=True)
class WeightFormat:
    kind: str = "float"
    block_shape: tuple[int, int] | None = None  # fp8: None (per output channel) or (bn, bk)
    group_size: int | None = None  # int4: inputs per scale (32, 64, 128)
    zero_points: bool = False  # int4: stored zero points (else 8)

    # ------------------------------------------------------------------ from the caller's tensors

    @staticmethod
    def of(x_dtype: torch.dtype, w13: torch.Tensor, w2: torch.Tensor, quant: Quant = Quant(), block_shape=None,
           group_size=None) -> "WeightFormat":
        """The format of weights ``w13``, ``w2`` and their ``quant`` tensors for activations of
        ``x_dtype``, checked (dtypes; shapes in ``check``). TypeError / ValueError naming the problem."""
        block_shape = fp8.check_block_shape(block_shape)
        def wrong_dtypes():
            return TypeError(f"weights must have x's dtype {x_dtype} (or both be float8_e4m3fn, with scales, or "
                             f"both uint8 int4 codes, with group_size); got w13 {w13.dtype}, w2 {w2.dtype}")

        if w13.dtype != w2.dtype:
            raise wrong_dtypes()
        if w13.dtype == torch.uint8:
            if group_size is None:
                raise ValueError("w13 is uint8 (int4 codes, two per byte): pass group_size (32, 64 or 128) "
                                 "with w13_scale and w2_scale")
            if block_shape is not None:
                raise ValueError("block_shape is fp8's scale layout; int4 weights take group_size")
            has_z = (quant.w13_zeros is not None, quant.w2_zeros is not None)
            if has_z[0] != has_z[1]:
                raise ValueError("int4 zero points go with both w13 and w2 (w13_zeros and w2_zeros) or neither")
            return WeightFormat("int4", group_size=int4.check_group_size(group_size), zero_points=has_z[0])
        if quant.w13_zeros is not None or quant.w2_zeros is not None:
            raise ValueError(f"zero points given for {w13.dtype} weights: they go with int4 (uint8) weights")
        if group_size is not None:
            raise ValueError(f"group_size given for {w13.dtype} weights: it goes with int4 (uint8) weights")
        if w13.dtype == FP8:
            return WeightFormat("fp8", block_shape=block_shape)
        if w13.dtype != x_dtype:
            raise wrong_dtypes()
        for name, s in (("w13", quant.w13_scale), ("w2", quant.w2_scale)):
            if s is not None:
                raise ValueError(f"{name}_scale given for {w13.dtype} weights: scales go with float8_e4m3fn "
                                 "or int4 weights")
        return WeightFormat()

    # ------------------------------------------------------------------ shapes

    @property
    def packing(self) -> str:
        """How the last dimension is stored, for messages ('/2': two int4 codes a byte)."""
        return "/2" if self.kind == "int4" else ""

    def k_of(self, stored_k: int) -> int:
        """The inputs K of a matrix whose last dimension holds ``stored_k`` elements."""
        return 2 * stored_k if self.kind == "int4" else stored_k

    def stored_k(self, k: int) -> int:
        return k // 2 if self.kind == "int4" else k

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The scale shape of one [n, k] matrix (() where the format has no scales)."""
        if self.kind == "fp8":
            return fp8.scale_shape(n, k, self.block_shape)
        if self.kind == "int4":
            return (n, k // self.group_size)
        return ()

    def check(self, w: torch.Tensor, scale, zeros, name: str) -> None:
        """One weight tensor [S, N, K'] against its scale and zero points (shape, dtype, device)."""
        if self.kind == "float":
            return
        if self.kind == "fp8":
            fp8.check_scales(w, scale, name, self.block_shape)
            return
        S, N, kb = w.shape
        K = self.k_of(kb)
        int4.check_k(K, self.group_size, name)
        if scale is None:
            raise ValueError(f"{name} is int4: pass {name}_scale (its fp32 scales per group of {self.group_size})")
        want = (S, N, K // self.group_size)
        for what, t, dtype in (("scale", scale, torch.float32), ("zeros", zeros, torch.uint8)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != dtype:
                raise TypeError(f"{name}_{what} must be a {str(dtype).replace('torch.', '')} tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name}_{what} must be {list(want)} for int4 {name} {list(w.shape)} (K = {K}) "
                                 f"with groups of {self.group_size}, got {list(t.shape)}")
            if t.device != w.device:
                raise ValueError(f"{name}_{what} is on {t.device}, {name} on {w.device}")

    def check_values(self, quant: Quant, slots: torch.Tensor | None = None) -> None:
        """int4: every scale finite and every zero point in [0, 15], for the slots in use (``slots``:
        their indices; None: all). A host sync: the checked entry points only (``check=True``), so a
        hostile scale is an error before any launch, never a silent wrong answer."""
        if self.kind != "int4":
            return
        for name, t in (("w13_scale", quant.w13_scale), ("w2_scale", quant.w2_scale), ("w13_zeros", quant.w13_zeros),
                        ("w2_zeros", quant.w2_zeros)):
            if t is None:
                continue
            v = t if slots is None else t[slots]
            if name.endswith("scale") and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} holds NaN or inf for an expert in use")
            if name.endswith("zeros") and bool((v > 15).any()):
                raise ValueError(f"{name} holds a zero point above 15 (int4 codes are 0..15)")

    # ------------------------------------------------------------------ values

    def dequantize(self, w: torch.Tensor, scale, zeros) -> torch.Tensor:
        """The weights' values [..., N, K] (fp32 for quantized formats; float weights as they are)."""
        if self.kind == "fp8":
            return fp8.dequantize_fp8(w, scale, self.block_shape)
        if self.kind == "int4":
            return int4.dequantize_int4(w, scale, zeros)
        return w

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """float weights [..., N, K] in this format: (weights, scale, zeros)."""
        if self.kind == "fp8":
            return (*fp8.quantize_fp8(w, self.block_shape), None)
        if self.kind == "int4":
            return int4.quantize_int4(w, self.group_size, self.zero_points)
        return w, None, None

    # ------------------------------------------------------------------ kernels' side

    def kernel_args(self, w: torch.Tensor, scale, zeros, bk: int) -> tuple[torch.Tensor, list, list, dict, int]:
        """Kernel arguments for weights ``w`` [S, N, K']: (the weight tensor to pass, [scale view
        [S, R, C], GN, GK, its 3 strides], [zero points (or a stand-in), their 3 strides], the
        constexprs {SCALE, FP8_BITS, INT4, ZP}, BK). BK is lowered so a K tile never spans two
        scale blocks or int4 groups (int4: at least 32 inputs, 16 bytes, so tl.dot has K >= 16)."""
        meta = {"SCALE": 0, "FP8_BITS": False, "INT4": False, "ZP": False}
        if self.kind == "float":
            return w, [w, 1, 1, 0, 0, 0], [w, 0, 0, 0], meta, bk
        if self.kind == "fp8":
            bits = not fp8.has_fp8_type(w.device)
            view, gn, gk = fp8.scale_view(scale, w.shape[2], self.block_shape)
            mode = 1 if self.block_shape is None else 2
            meta.update(SCALE=mode, FP8_BITS=bits)
            return (w.view(torch.uint8) if bits else w, [view, gn, gk, *view.stride()], [view, 0, 0, 0], meta,
                    bk if mode == 1 else min(bk, gk))
        meta.update(SCALE=2, INT4=True, ZP=self.zero_points)
        z = [zeros, *zeros.stride()] if self.zero_points else [scale, 0, 0, 0]
        return w, [scale, 1, self.group_size, *scale.stride()], z, meta, max(32, min(bk, self.group_size))

    def config_key(self) -> str:
        """The launch-config table's suffix for these weights ('' for float weights)."""
        if self.kind == "fp8":
            return ",weights=float8_e4m3fn" + (f",block={self.block_shape[0]}x{self.block_shape[1]}"
                                               if self.block_shape else "")
        if self.kind == "int4":
            return f",weights=int4,group={self.group_size}" + (",zp" if self.zero_points else "")
        return ""

