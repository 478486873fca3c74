"""Record routing traces from a transformers OLMoE or Mixtral model (any size, any weights).

Hooks, per decoder layer l: the input of `post_attention_layernorm` (the residual stream entering
the MoE, r_l) and the output of `mlp.gate` (router logits, top-k weights, top-k ids). Gate
lookahead for d = 1..D applies layer l+d's norm and router to r_l after the forward pass.
"""

from __future__ import annotations

import datetime

import numpy as np
import torch

from ..provenance import git_commit
from .format import Trace


def moe_layers(model) -> list:
    """The decoder layers of a transformers OLMoE/Mixtral-style model, each with .mlp.gate."""
    base = getattr(model, "model", model)
    layers = list(getattr(base, "layers", []))
    if not layers or not all(hasattr(l, "mlp") and hasattr(l.mlp, "gate") and hasattr(l, "post_attention_layernorm")
                             for l in layers):
        raise ValueError(f"{type(model).__name__} is not a supported MoE model: need model.layers[i].mlp.gate "
                         "and .post_attention_layernorm (transformers OLMoE, Mixtral)")
    return layers


def _num_experts(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts"))


@torch.no_grad()
def record(model, windows: np.ndarray, lookahead_depth: int = 3, batch: int = 16, meta: dict | None = None,
           progress: bool = False) -> Trace:
    """Run `windows` [num_seqs, seq_len] of token ids through `model`; one sequence per window."""
    from tqdm import tqdm

    layers = moe_layers(model)
    L = len(layers)
    captured: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, i=i: captured.setdefault(i, {}).__setitem__("resid", args[0].reshape(-1, args[0].shape[-1]))))
        handles.append(layer.mlp.gate.register_forward_hook(
            lambda mod, args, out, i=i: captured[i].update(weights=out[1], ids=out[2])))
    model.eval()
    ids, wts, look = [], [], []
    try:
        for b in tqdm(range(0, len(windows), batch), desc="record", disable=not progress):
            captured.clear()
            model(input_ids=torch.as_tensor(windows[b:b + batch], dtype=torch.long))
            ids.append(torch.stack([captured[l]["ids"] for l in range(L)]).to(torch.int16))
            wts.append(torch.stack([captured[l]["weights"] for l in range(L)]).to(torch.float16))
            if lookahead_depth:
                resid = [captured[l]["resid"] for l in range(L)]  # the hooks fire again below
                la = torch.full((lookahead_depth,) + ids[-1].shape, -1, dtype=torch.int16)
                for d in range(1, lookahead_depth + 1):
                    for l in range(L - d):
                        nxt = layers[l + d]
                        la[d - 1, l] = nxt.mlp.gate(nxt.post_attention_layernorm(resid[l]))[2].to(torch.int16)
                look.append(la)
    finally:
        for h in handles:
            h.remove()
    seq_len = windows.shape[1]
    meta = dict(meta or {})
    meta.update(num_experts=_num_experts(model), num_layers=L, top_k=ids[0].shape[-1], tokens=int(windows.size),
                seq_len=seq_len, lookahead_depth=lookahead_depth, model_type=model.config.model_type,
                recorded=datetime.date.today().isoformat(), commit=git_commit())
    return Trace(topk_ids=torch.cat(ids, 1).numpy(), seq_starts=np.arange(0, windows.size + 1, seq_len),
                 topk_weights=torch.cat(wts, 1).numpy(),
                 lookahead=torch.cat(look, 2).numpy() if lookahead_depth else None, meta=meta)


def gate_lookahead_parts(model) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Router weights [E, H], MoE-norm weights [H] per layer, and the norm's eps: what
    ``GateLookaheadPredictor`` needs to predict from a layer's (normalised) MoE input."""
    layers = moe_layers(model)
    norm = layers[0].post_attention_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return ([l.mlp.gate.weight.detach() for l in layers],
            [l.post_attention_layernorm.weight.detach() for l in layers], float(eps))
