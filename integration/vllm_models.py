"""vLLM's OLMoE and Mixtral with one addition for Prophet: after loading, they hand their routers and
MoE-input norms to the model's Prophet experts, so that the gate-lookahead predictor (layer l+d's
router on layer l's MoE input) can run inside vLLM. Registered (lazily, by name) by
``integration.vllm_plugin.register``; without Prophet they are vLLM's classes unchanged."""

from __future__ import annotations

from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM

from integration.vllm_plugin import offer_gate_parts


def _offer_routers(model, moe: str) -> None:
    """Each decoder layer's router (``layer.<moe>.gate``) and MoE-input norm, to Prophet."""
    offer_gate_parts([(getattr(layer, moe).gate.weight, layer.post_attention_layernorm.weight)
                      for layer in model.model.layers])


class ProphetOlmoeForCausalLM(OlmoeForCausalLM):
    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        _offer_routers(self, "mlp")
        return loaded


class ProphetMixtralForCausalLM(MixtralForCausalLM):
    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        _offer_routers(self, "block_sparse_moe")
        return loaded
