"""Held-out quality of a routing-study model served a given way, measured (reference code, no kernels):
bits per byte on held-out windows, next to the model's own.

All experts resident, the whole model at once (``resident_bits_per_byte``):

    fp32            the checkpoint (the reference)
    bf16, fp8       experts rounded to bf16; e4m3 with an fp32 scale per output row (``kernels.fp8``)
    int4            experts quantized symmetric int4 with an fp16 scale per group of ``INT4_GROUP``
                    inputs (``quantize_int4``), dequantized in place

A buffer whose misses do not wait (``decode_bits_per_byte``): the model decodes the windows token by
token; groups of ``batch`` sequences decode in lockstep and share one buffer (``simulator.Replay``,
the decisions and copy timing ``prophet simulate`` replays, here beside the model, so what a
fallback changes in the hidden states changes what the model routes next). Each MoE layer call
computes the experts that had landed, and for the others (missed, or still being copied):

    exact         the expert itself (the host CPU computing it: no quality change; also checks the harness)
    stand-in      the expert's int4 copy (every expert resident in int4 beside the buffer)
    substitute    the token's best-scoring landed expert of that layer (not already one of its k), with
                  the missed expert's routing weight (arXiv 2603.19289 reports that executing speculated
                  experts mostly keeps task accuracy)
    skip          dropped; ``skip-renorm``: the token's remaining weights rescaled to its top-k's sum

Windows of one group follow each other on the group's lanes (as the simulator's lanes), so a buffer
is cold only at the start.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch

from ..memory.predictors import moe_layers
from ..planner.memory import INT4_GROUP

STRATEGIES = ("exact", "stand-in", "substitute", "skip", "skip-renorm")


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """``w`` [..., N, K] quantized to symmetric int4 (-8..7) with a scale per `group` consecutive inputs
    (the last group may be shorter; scales rounded to fp16), returned dequantized, in w's dtype."""
    K = w.shape[-1]
    pad = -K % group
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(*w.shape[:-1], -1, group)
    scale = (x.abs().amax(-1, keepdim=True) / 7).to(torch.float16).float().clamp_min(1e-12)
    q = torch.clamp(torch.round(x / scale), -8, 7)
    return (q * scale).reshape(*w.shape[:-1], K + pad)[..., :K].to(w.dtype)


def _experts(model):
    return [layer.mlp.experts for layer in moe_layers(model)]


@torch.no_grad()
def quantize_experts(model, dtype: str) -> None:
    """Every expert of `model` replaced in place by its `dtype` version (fp32, bf16, fp8, int4)."""
    from ..kernels.fp8 import dequantize_fp8, quantize_fp8

    if dtype == "fp32":
        return
    for m in _experts(model):
        for p in (m.gate_up_proj, m.down_proj):
            if dtype == "bf16":
                p.copy_(p.to(torch.bfloat16).float())
            elif dtype == "fp8":
                p.copy_(dequantize_fp8(*quantize_fp8(p)))
            elif dtype == "int4":
                p.copy_(quantize_int4(p))
            else:
                raise ValueError(f"expert dtype {dtype!r}: fp32, bf16, fp8 or int4")


def resident_bits_per_byte(model, windows: np.ndarray, token_bytes: np.ndarray, dtype: str) -> float:
    """Held-out bits per byte with every expert resident in `dtype` (the model is changed in place)."""
    from .traces.train import evaluate

    quantize_experts(model, dtype)
    return evaluate(model, windows, token_bytes)


class _Serve:
    """The MoE layers' experts computed as a buffer with no-wait misses serves them (module docstring)."""

    def __init__(self, model, replays, batch: int, strategy: str, predictor_hidden: bool):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: {', '.join(STRATEGIES)}")
        self.replays, self.batch, self.strategy = replays, batch, strategy
        self.logits: dict[int, torch.Tensor] = {}
        self.handles = []
        self.int4 = {}
        layers = moe_layers(model)
        for l, layer in enumerate(layers):
            experts = layer.mlp.experts
            if strategy == "stand-in":
                self.int4[l] = (quantize_int4(experts.gate_up_proj.detach()), quantize_int4(experts.down_proj.detach()))
            self.handles.append(layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, l=l: self.logits.__setitem__(l, out[0].detach())))
            self.handles.append(layer.post_attention_layernorm.register_forward_hook(
                lambda mod, args, out, l=l: self.logits.__setitem__(("x", l), out.detach().reshape(-1, out.shape[-1]))))
            experts._prophet_forward = experts.forward
            experts.forward = types.MethodType(lambda mod, h, ids, w, l=l: self.forward(mod, l, h, ids, w), experts)
        self.predictor_hidden = predictor_hidden

    def close(self, model) -> None:
        for h in self.handles:
            h.remove()
        for experts in _experts(model):
            experts.forward = experts._prophet_forward
            del experts._prophet_forward

    def forward(self, mod, l: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        ids, w = ids.clone(), w.clone().float()
        fallback = torch.zeros(T, k, dtype=torch.bool)
        logits, x = self.logits[l], self.logits[("x", l)]
        for g, replay in enumerate(self.replays):
            rows = slice(g * self.batch, (g + 1) * self.batch)
            need = sorted(set(ids[rows].reshape(-1).tolist()))
            call = replay.call(l, need, ids[rows].numpy(), x[rows] if self.predictor_hidden else None)
            if not call.fallback:
                continue
            out = torch.tensor(call.fallback)
            fallback[rows] = torch.isin(ids[rows], out)
            if self.strategy == "substitute":
                landed = torch.tensor(replay.landed(l), dtype=torch.long)
                for r in range(rows.start, rows.stop):
                    for j in torch.nonzero(fallback[r]).flatten().tolist():
                        cand = landed[~torch.isin(landed, ids[r])] if len(landed) else landed
                        if len(cand):
                            ids[r, j] = cand[torch.argmax(logits[r, cand])]
                            fallback[r, j] = False
                        else:  # nothing landed to substitute: the slot is skipped
                            w[r, j] = 0.0
        if self.strategy in ("skip", "skip-renorm"):
            total = w.sum(-1, keepdim=True)
            w = torch.where(fallback, 0.0, w)
            if self.strategy == "skip-renorm":
                kept = w.sum(-1, keepdim=True)
                w = torch.where(kept > 0, w * total / kept.clamp_min(1e-30), w)
        W13, W2 = mod.gate_up_proj[ids], mod.down_proj[ids]  # [T, k, 2I, H], [T, k, H, I]
        if self.strategy == "stand-in" and fallback.any():
            q13, q2 = self.int4[l]
            W13 = torch.where(fallback[..., None, None], q13[ids], W13)
            W2 = torch.where(fallback[..., None, None], q2[ids], W2)
        gate, up = torch.einsum("th,tkoh->tko", h.float(), W13.float()).chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", mod.act_fn(gate) * up, W2.float())
        return (y * w[..., None]).sum(1).to(h.dtype)


@torch.no_grad()
def decode_bits_per_byte(model, windows: np.ndarray, token_bytes: np.ndarray, make_replay, batch: int = 1,
                         groups: int = 8, strategy: str = "exact", predictor_hidden: bool = False,
                         progress: bool = False) -> dict:
    """Held-out bits per byte of `model` decoding `windows` [W, S] token by token, its experts served by
    buffers with no-wait misses (module docstring). ``make_replay()``: a fresh ``simulator.Replay`` per
    group of `batch` lanes; `groups` groups decode side by side (rows of one forward) and the windows
    are dealt round by round. Returns bits per byte and the replays' summed counters."""
    from tqdm import tqdm
    from transformers import DynamicCache

    W, S = windows.shape
    per_round = batch * groups
    if W < per_round or W % per_round:
        raise ValueError(f"{W} windows do not deal into rounds of {groups} groups x {batch} lanes")
    replays = [make_replay() for _ in range(groups)]
    serve = _Serve(model, replays, batch, strategy, predictor_hidden)
    model.eval()
    total = 0.0
    try:
        rounds = range(0, W, per_round)
        for r0 in tqdm(rounds, desc=f"decode {strategy} B={batch}", disable=not progress):
            x = torch.from_numpy(windows[r0:r0 + per_round])
            cache = DynamicCache()
            for t in range(S - 1):
                out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
                total += torch.nn.functional.cross_entropy(out.logits[:, -1].float(), x[:, t + 1], reduction="sum").item()
    finally:
        serve.close(model)
    stats = {}
    for rp in replays:
        st = rp.res.stats
        for name in ("hits", "misses", "late_hits", "prefetched", "bytes_h2d"):
            stats[name] = stats.get(name, 0) + getattr(st, name)
        stats["fallbacks"] = stats.get("fallbacks", 0) + rp.fallbacks
        stats["extra_s"] = stats.get("extra_s", 0.0) + rp.extra_s
        stats["stall_s"] = stats.get("stall_s", 0.0) + st.stall_s
    requests = stats["hits"] + stats["misses"]
    stats.update(requests=requests, hit_rate=stats["hits"] / requests,
                 ready_hit_rate=(stats["hits"] - stats["late_hits"]) / requests,
                 tokens=int(W * (S - 1)), steps_per_group=int(W // per_round * (S - 1)))
    bpb = total / int(token_bytes[windows[:, 1:]].sum()) / math.log(2)
    return {"bits_per_byte": bpb, "strategy": strategy, "batch": batch, "groups": groups} | stats
