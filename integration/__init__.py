"""Integrations of Prophet with serving stacks.

- ``vllm_plugin``: the vLLM plugin (entry point ``vllm.general_plugins``, idempotent ``register()``),
  driving ``prophet_kernels.ProphetMoE`` -- the one layer-level orchestration, nothing written twice.
  Documented in ``docs/vllm_plugin.md``.
- ``vllm_models``: vLLM's OLMoE/Mixtral/Qwen3-MoE handing their routers to the gate-lookahead predictor.
- ``settings``: ``ProphetSettings``, what both integrations accept and the ``ProphetMoE`` it builds.
- ``transformers_experts``: Prophet as a transformers experts implementation (``enable_prophet``),
  driving the same ``ProphetMoE``.
- ``demo``: ``prophet demo`` and the tiny random-init checkpoints the plugin tests serve.
"""
