"""Record routing traces from a transformers OLMoE or Mixtral model (any size, any weights).

Hooks, per decoder layer l: the input of `post_attention_layernorm` (the residual stream entering
the MoE, r_l) and the output of `mlp.gate` (router logits, top-k weights, top-k ids). Gate
lookahead for d = 1..D applies layer l+d's norm and router to r_l after the forward pass and keeps
the `lookahead_width` highest-ranked experts (default 2k: a predictor may prefetch more than k).
"""

from __future__ import annotations

import datetime

import numpy as np
import torch

from ...memory.predictors import context_features, gate_lookahead_parts, moe_layers, multi_hot, previous_token  # noqa: F401
from ...provenance import git_commit
from .format import Trace


def _num_experts(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts"))


def _routed_batches(model, windows: np.ndarray, batch: int, desc: str, progress: bool):
    """Per batch of windows: [(residual stream entering layer l's MoE [n, H], weights [n, k], ids [n, k])]."""
    from tqdm import tqdm

    layers = moe_layers(model)
    captured: dict[int, dict] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, i=i: captured.setdefault(i, {}).__setitem__("resid", args[0].reshape(-1, args[0].shape[-1]))))
        handles.append(layer.mlp.gate.register_forward_hook(
            lambda mod, args, out, i=i: captured[i].update(weights=out[1], ids=out[2])))
    model.eval()
    try:
        for b in tqdm(range(0, len(windows), batch), desc=desc, disable=not progress):
            captured.clear()  # also drops what the caller's norm/router calls added (the hooks fire then too)
            model(input_ids=torch.as_tensor(windows[b:b + batch], dtype=torch.long))
            yield [(captured[l]["resid"], captured[l]["weights"], captured[l]["ids"]) for l in range(len(layers))]
    finally:
        for h in handles:
            h.remove()


def _moe_inputs(layers, got) -> list[torch.Tensor]:
    """Each layer's normalised MoE input from the residual streams `_routed_batches` captured."""
    return [layers[l].post_attention_layernorm(r) for l, (r, _, _) in enumerate(got)]


@torch.no_grad()
def hidden_states(model, windows: np.ndarray, batch: int = 16, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's normalised MoE input [L, N, H] and routed experts [L, N, k] for `windows`:
    what ``LearnedGatePredictor.fit`` trains on."""
    layers = moe_layers(model)
    xs, ids = [], []
    for got in _routed_batches(model, windows, batch, "hidden states", progress):
        xs.append(torch.stack(_moe_inputs(layers, got)))
        ids.append(torch.stack([i for _, _, i in got]).to(torch.int16))
    return torch.cat(xs, 1), torch.cat(ids, 1)


@torch.no_grad()
def record(model, windows: np.ndarray, lookahead_depth: int = 3, batch: int = 16, meta: dict | None = None,
           progress: bool = False, lookahead_width: int | None = None, learned=None) -> Trace:
    """Run `windows` [num_seqs, seq_len] of token ids through `model`; one sequence per window.
    `learned`: a fitted ``LearnedGatePredictor`` whose ranking is recorded next to the gate's."""
    layers = moe_layers(model)
    L, E = len(layers), _num_experts(model)
    k = int(getattr(model.config, "num_experts_per_tok"))
    m = 2 * k if lookahead_width is None else lookahead_width
    if not k <= m <= E:
        raise ValueError(f"lookahead_width must be in [top_k={k}, num_experts={E}], got {m}")
    if learned is not None and not lookahead_depth:
        raise ValueError("a learned lookahead needs lookahead_depth >= 1")
    ids, wts, look, learned_look = [], [], [], []
    for got in _routed_batches(model, windows, batch, "record", progress):
        ids.append(torch.stack([i for _, _, i in got]).to(torch.int16))
        wts.append(torch.stack([w for _, w, _ in got]).to(torch.float16))
        if not lookahead_depth:
            continue
        shape = (lookahead_depth,) + ids[-1].shape[:2] + (m,)
        la = torch.full(shape, -1, dtype=torch.int16)
        lla = torch.full(shape, -1, dtype=torch.int16) if learned is not None else None
        if learned is not None:  # each layer's MoE input, and what each token leaves the next one there
            xs = _moe_inputs(layers, got)
            own = [context_features(x, multi_hot(i, E)) for x, (_, _, i) in zip(xs, got)]
            ctx = [previous_token(f, windows.shape[1]) for f in own]
        for l, (resid, _, _) in enumerate(got):
            for d in range(1, lookahead_depth + 1):
                if l + d < L:
                    nxt = layers[l + d]
                    logits = nxt.mlp.gate(nxt.post_attention_layernorm(resid))[0]
                    la[d - 1, l] = torch.topk(logits.float(), m, dim=-1).indices.to(torch.int16)
                    context = ctx[l + d] if learned is not None else None
                elif learned is not None and learned.wraps:  # the next token's layer l + d - L: this token's context
                    context = own[l + d - L]
                else:
                    break
                if learned is not None:
                    lla[d - 1, l] = torch.topk(learned.logits(l, d, xs[l], context), m, dim=-1).indices.to(torch.int16)
        look.append(la)
        learned_look.append(lla)
    seq_len = windows.shape[1]
    meta = dict(meta or {})
    meta.update(num_experts=E, num_layers=L, top_k=ids[0].shape[-1], tokens=int(windows.size),
                seq_len=seq_len, lookahead_depth=lookahead_depth, lookahead_width=m if lookahead_depth else 0,
                model_type=model.config.model_type, recorded=datetime.date.today().isoformat(), commit=git_commit())
    if learned is not None:
        meta["learned_lookahead"] = learned.meta | {"nbytes": learned.nbytes}
    return Trace(topk_ids=torch.cat(ids, 1).numpy(), seq_starts=np.arange(0, windows.size + 1, seq_len),
                 topk_weights=torch.cat(wts, 1).numpy(),
                 lookahead=torch.cat(look, 2).numpy() if lookahead_depth else None,
                 learned_lookahead=torch.cat(learned_look, 2).numpy() if learned is not None else None, meta=meta)
