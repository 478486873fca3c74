"""Optional native library (``csrc/`` + ``CMakeLists.txt``), loaded through ctypes.

Build: ``cmake -S . -B build && cmake --build build``. Lookup order: ``$PROPHET_NATIVE_LIB``, then
``build/libprophet_native.so`` in the repository. Everything in Prophet has a Python/Triton path;
callers check :func:`is_available` and fall back per call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _lib():
    candidates = [os.environ.get("PROPHET_NATIVE_LIB"), _REPO / "build" / "libprophet_native.so"]
    for c in candidates:
        if c and Path(c).exists():
            try:
                lib = ctypes.CDLL(str(c))
            except OSError:  # e.g. no CUDA runtime on this machine
                continue
            lib.prophet_copy_slots.restype = ctypes.c_int
            lib.prophet_copy_slots.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p]
            return lib
    return None


def is_available() -> bool:
    """True when the native library was built and loads on this machine."""
    return _lib() is not None


def _require():
    lib = _lib()
    if lib is None:
        raise RuntimeError("prophet native library not built: cmake -S . -B build && cmake --build build")
    return lib


def abi_version() -> int:
    return _require().prophet_native_abi_version()


def copy_slots(src_ptrs, dst_ptrs, nbytes, stream=None) -> None:
    """Copy regions ``src_ptrs[i] -> dst_ptrs[i]`` of ``nbytes[i]`` bytes in one launch.

    All three are int64 CUDA tensors of equal length holding device-accessible addresses
    (pinned host memory qualifies through unified addressing).
    """
    import torch

    lib = _require()
    for name, t in (("src_ptrs", src_ptrs), ("dst_ptrs", dst_ptrs), ("nbytes", nbytes)):
        if t.dtype != torch.int64 or not t.is_cuda or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 CUDA tensor")
    if not (src_ptrs.numel() == dst_ptrs.numel() == nbytes.numel()):
        raise ValueError("src_ptrs, dst_ptrs and nbytes must have the same length")
    s = stream if stream is not None else torch.cuda.current_stream()
    err = lib.prophet_copy_slots(src_ptrs.data_ptr(), dst_ptrs.data_ptr(), nbytes.data_ptr(),
                                 int(src_ptrs.numel()), ctypes.c_void_p(s.cuda_stream))
    if err:
        raise RuntimeError(f"prophet_copy_slots failed with cudaError {err}")
