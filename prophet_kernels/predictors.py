"""Predictors: which experts the next layers will need.

Interface: ``predict(layer, topk_ids, hidden) -> {future_layer: [experts, best first]}``, called
by ``ProphetMoE.forward`` after layer `layer` computed; the layer then prefetches the answer for
layers layer+1 .. layer+prefetch_depth (wrapping to the next decode step's first layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Predictor:
    def predict(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor | None,
                num_layers: int, depth: int) -> dict[int, list[int]]:
        raise NotImplementedError


class SameExpertsPredictor(Predictor):
    """The next layers will need the experts this layer used (most used first)."""

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        ids, counts = torch.unique(topk_ids.reshape(-1), return_counts=True)
        order = ids[torch.argsort(counts, descending=True, stable=True)].tolist()
        return {(layer + d) % num_layers: order for d in range(1, depth + 1)}


class OraclePredictor(Predictor):
    """Reads a given future routing: `schedule` lists, in call order, the experts each forward
    will need (e.g. [[experts of step 0 layer 0], [step 0 layer 1], ...]). For tests and bounds."""

    def __init__(self, schedule: Sequence[Sequence[int]]):
        self.schedule = [list(s) for s in schedule]
        self.calls = 0

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        i, self.calls = self.calls, self.calls + 1
        return {(layer + d) % num_layers: self.schedule[i + d]
                for d in range(1, depth + 1) if i + d < len(self.schedule)}


PREDICTORS = {"same": SameExpertsPredictor}


def make_predictor(predictor) -> Predictor | None:
    if predictor is None or isinstance(predictor, Predictor):
        return predictor
    try:
        return PREDICTORS[predictor]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown predictor {predictor!r}; known: {', '.join(PREDICTORS)} "
                         "(or pass a Predictor instance)") from None
