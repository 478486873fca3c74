"""Integrations of Prophet with serving stacks.

Planned (see the open issues): the vLLM plugin (entry point ``vllm.general_plugins``, an
idempotent ``register()``) and the transformers experts implementation. Both will drive one
layer-level orchestration in ``prophet_kernels`` -- nothing is written twice. Empty today.
"""
