"""Capacity planner: how much KV cache Prophet frees, per model, GPU, batch size and buffer.

    catalog.py   models (architecture from each published config, with its source) and GPUs
    memory.py    parameters by part, KV bytes per token, unique experts per layer, the plan
    sweep.py     models x GPUs x batches x buffer settings -> rows, table, CSV
    figures.py   matplotlib figures of a sweep
    seed.py      the seed analysis's claims vs the corrected numbers (docs/seed_vs_corrected.md)

Command line: ``prophet plan`` (see ``prophet plan --help``).
"""

from .catalog import GPUS, MODELS, GPUSpec, ModelSpec, get_gpu, get_model
from .memory import (
    BufferSetting,
    Plan,
    ServingConfig,
    count_params,
    expected_unique_experts,
    expert_bytes,
    kv_bytes_per_token,
    plan,
    total_params,
)
from .sweep import run_sweep, write_csv

__all__ = [
    "GPUS", "MODELS", "GPUSpec", "ModelSpec", "get_gpu", "get_model", "BufferSetting", "Plan",
    "ServingConfig", "count_params", "expected_unique_experts", "expert_bytes", "kv_bytes_per_token",
    "plan", "total_params", "run_sweep", "write_csv",
]
