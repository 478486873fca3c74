"""vLLM's OLMoE, Mixtral and Qwen3-MoE with three additions for Prophet. After loading: they refuse to be served
without Prophet when it is on (their MoE layers did not run vLLM's unquantized method: quantized
experts), and hand their routers and MoE-input norms to the model's Prophet experts, so that the
gate-lookahead predictor (layer l+d's router on layer l's MoE input) can run inside vLLM. Under
pipeline parallelism, a later stage's forward first predicts its first layers' experts from the
hidden state it receives (``vllm_plugin.stage_entry``).
Registered (lazily, by name) by ``vllm_plugin.register``; without Prophet they compute as vLLM's
classes (their forward passes straight through)."""

from __future__ import annotations

from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from prophet_kernels.integration.vllm_plugin import model_groups, offer_gate_parts, require_prophet_experts, stage_entry


def _after_loading(model, moe: str) -> None:
    """Refuses a model whose MoE layers Prophet did not take although it is on (quantized experts),
    then hands each of this pipeline stage's decoder layers' router (``layer.<moe>.gate``) and
    MoE-input norm to Prophet. Under pipeline parallelism the other stages' layers are vLLM's
    ``PPMissingLayer`` placeholders: a stage's Prophet holds and predicts its own layers only."""
    if not require_prophet_experts(model, model.prophet_vllm_config):
        return  # Prophet off: nothing of this model is read
    model.prophet_groups = model_groups(model)  # (a later pipeline stage predicts its first layers: stage_entry)
    offer_gate_parts([(getattr(layer, moe).gate.weight, layer.post_attention_layernorm.weight)
                      for layer in stage_layers(model.model)])


def stage_layers(decoder) -> list:
    """The decoder layers this pipeline stage runs (all of them without pipeline parallelism)."""
    start = getattr(decoder, "start_layer", 0)
    end = getattr(decoder, "end_layer", len(decoder.layers))
    return [decoder.layers[i] for i in range(start, end)]


def _with_prophet(base, moe: str):
    """``base`` (a vLLM model class) whose ``load_weights`` ends with ``_after_loading``; its decoder
    layers hold their MoE block in attribute ``moe``."""

    class Model(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.prophet_vllm_config = vllm_config
            self.prophet_groups = ()

        def forward(self, *args, **kwargs):
            received = kwargs.get("intermediate_tensors", args[2] if len(args) > 2 else None)
            if received is not None and self.prophet_groups:  # a later pipeline stage, Prophet on
                stage_entry(self, received)
            return super().forward(*args, **kwargs)

        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            _after_loading(self, moe)
            return loaded

    Model.__name__ = Model.__qualname__ = f"Prophet{base.__name__}"
    return Model


# registered by name in vllm_plugin.GATE_MODELS
ProphetOlmoeForCausalLM = _with_prophet(OlmoeForCausalLM, "mlp")
ProphetMixtralForCausalLM = _with_prophet(MixtralForCausalLM, "block_sparse_moe")
ProphetQwen3MoeForCausalLM = _with_prophet(Qwen3MoeForCausalLM, "mlp")
