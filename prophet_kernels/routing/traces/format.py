"""Routing trace: what every MoE layer's router picked for every token, in a compact npz.

    topk_ids     [L, N, k] int16   experts chosen by layer l for token n (router order)
    topk_weights [L, N, k] float16 their routing weights (optional)
    lookahead    [D, L, N, m] int16  "gate lookahead": the m >= k experts that layer l+d's router
                 ranks highest (best first) from the hidden state entering layer l's MoE (the residual
                 stream after l's attention, through l+d's own norm), d = 1..D; -1 where l+d >= L
                 (optional; stored as int8 when the expert ids fit)
    learned_lookahead [D, L, N, m]  the same ranking from ``LearnedGatePredictor`` (optional; its fit,
                 train split and size are in meta["learned_lookahead"])
    seq_starts   [num_seqs + 1] int64  tokens of sequence i are n in [seq_starts[i], seq_starts[i+1])
    meta         dict (JSON): model/shape, corpus and its hash, split, tokens, training, commit, date

Tokens of a sequence are stored in order, so decode order is position order within a sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclass
class Trace:
    topk_ids: np.ndarray
    seq_starts: np.ndarray
    topk_weights: np.ndarray | None = None
    lookahead: np.ndarray | None = None
    learned_lookahead: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.topk_ids = np.asarray(self.topk_ids)
        if self.topk_ids.ndim != 3:
            raise ValueError(f"topk_ids must be [L, N, k], got shape {self.topk_ids.shape}")
        L, N, k = self.topk_ids.shape
        self.seq_starts = np.asarray(self.seq_starts, dtype=np.int64)
        if self.seq_starts[0] != 0 or self.seq_starts[-1] != N or np.any(np.diff(self.seq_starts) <= 0):
            raise ValueError(f"seq_starts must rise strictly from 0 to N={N}")
        E = self.num_experts
        if self.topk_ids.min() < 0 or self.topk_ids.max() >= E:
            raise ValueError(f"topk_ids outside [0, num_experts={E})")
        if self.topk_weights is not None and self.topk_weights.shape != self.topk_ids.shape:
            raise ValueError(f"topk_weights shape {self.topk_weights.shape} != topk_ids shape {self.topk_ids.shape}")
        for name in ("lookahead", "learned_lookahead"):
            la = getattr(self, name)
            if la is not None and (la.ndim != 4 or la.shape[1:3] != (L, N) or la.shape[3] < k):
                raise ValueError(f"{name} must be [D, L, N, m] with (L, N)={(L, N)} and m >= k={k}, got {la.shape}")

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def num_experts(self) -> int:
        if "num_experts" not in self.meta:
            raise ValueError("trace meta lacks num_experts")
        return int(self.meta["num_experts"])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_starts) - 1

    def sequences(self) -> list[np.ndarray]:
        """Token indices of each sequence, in order."""
        return [np.arange(a, b) for a, b in zip(self.seq_starts[:-1], self.seq_starts[1:])]

    def select(self, seqs: slice) -> "Trace":
        """The trace of sequences ``seqs`` (a slice of sequence indices), every per-token array cut
        alike; meta records the slice ("sequences": [start, stop])."""
        start, stop, step = seqs.indices(self.num_seqs)
        if step != 1 or stop <= start:
            raise ValueError(f"sequence slice {start}:{stop}:{step} selects no consecutive sequences "
                             f"(the trace has {self.num_seqs})")
        a, b = int(self.seq_starts[start]), int(self.seq_starts[stop])
        cut = lambda x, axis: None if x is None else np.take(x, np.arange(a, b), axis=axis)
        base = self.meta.get("sequences", [0, self.num_seqs])[0]
        return Trace(topk_ids=self.topk_ids[:, a:b], seq_starts=self.seq_starts[start:stop + 1] - a,
                     topk_weights=cut(self.topk_weights, 1), lookahead=cut(self.lookahead, 2),
                     learned_lookahead=cut(self.learned_lookahead, 2),
                     meta=self.meta | {"tokens": b - a, "sequences": [base + start, base + stop]})

    def fingerprints(self) -> set[bytes]:
        """A digest of each sequence's routing: two traces share a sequence iff they share a digest
        (used to refuse fitting a predictor on the trace it is then evaluated on)."""
        import hashlib

        return {hashlib.sha1(np.ascontiguousarray(self.topk_ids[:, a:b]).astype(np.int16).tobytes()).digest()
                for a, b in zip(self.seq_starts[:-1], self.seq_starts[1:])}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"topk_ids": self.topk_ids.astype(np.int16), "seq_starts": self.seq_starts,
                  "meta": np.frombuffer(json.dumps(self.meta | {"format_version": FORMAT_VERSION}).encode(), np.uint8)}
        if self.topk_weights is not None:
            arrays["topk_weights"] = self.topk_weights.astype(np.float16)
        for name in ("lookahead", "learned_lookahead"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).astype(np.int8 if self.num_experts <= 127 else np.int16)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "Trace":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trace at {path}")
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: trace format {meta.get('format_version')} != {FORMAT_VERSION}")
            return cls(topk_ids=z["topk_ids"].astype(np.int64), seq_starts=z["seq_starts"],
                       topk_weights=z["topk_weights"] if "topk_weights" in z else None,
                       lookahead=z["lookahead"].astype(np.int64) if "lookahead" in z else None,
                       learned_lookahead=z["learned_lookahead"].astype(np.int64) if "learned_lookahead" in z else None,
                       meta=meta)
