"""Test set-up: the Triton interpreter on machines without a GPU (must precede kernel imports)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def torch_path():
    """Whole models on the CPU (vLLM's CPU build, transformers): ProphetMoE takes its PyTorch path,
    as it does where there is no Triton (the kernel tests run the Triton kernels under the
    interpreter, which would take ~25 s per model here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
