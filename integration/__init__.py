"""Integrations of Prophet with serving stacks.

- ``vllm_plugin``: the vLLM plugin (entry point ``vllm.general_plugins``, idempotent ``register()``),
  driving ``prophet_kernels.ProphetMoE`` -- the one layer-level orchestration, nothing written twice.
- ``vllm_models``: vLLM's OLMoE/Mixtral handing their routers to the gate-lookahead predictor.
- ``settings``: ``ProphetSettings``, what both integrations accept and the ``ProphetMoE`` it builds.
- ``transformers_experts``: Prophet as a transformers experts implementation (``enable_prophet``),
  driving the same ``ProphetMoE``.
- ``demo``: ``prophet demo`` and the tiny random-init checkpoints the plugin tests serve.
"""
