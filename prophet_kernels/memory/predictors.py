"""Predictors: which experts the next layers will need.

Interface: ``predict(layer, topk_ids, hidden, num_layers, depth) -> {future_layer: [experts, best
first]}``, called by ``ExpertResidency.prefetch`` (from ``ProphetMoE.forward`` or the trace
simulator) after layer `layer` routed its tokens; the answer is prefetched for layers
layer+1 .. layer+depth, nearest first, within the byte budget.

    same        the experts this layer used (no data needed)
    frequency   each layer's most used experts on the train trace (as many as this layer needed)
    transition  routing-history statistics: P(expert e at layer l+d | expert s at layer l-h) for
                h = 0..2, summed over the token's experts at the last 3 layers
    learned     a small MLP over the last 3 layers' routing (multi-hot) and the layer, trained on
                the train trace with a binary cross-entropy per future layer
    gate        gate lookahead: layer l+d's router applied to the hidden state of layer l (the
                model's own weights; no training)
    learned-gate  gate lookahead plus a learned correction (a linear map started at the gate's and
                a residual MLP per layer pair), fitted on a train split's hidden states; it also
                reads the previous token's routing and MoE input at the target layer (context)
    oracle      the exact future routing (tests and bounds)

Per-token predictors pick k experts per token; a batch's answer is their union, most votes first.
Predictors that read routing history keep the current step's layers (a call with a layer not
after the previous one starts a new step). When replaying a trace, `hidden` is a ``TraceHidden``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _ids(topk_ids) -> np.ndarray:
    return topk_ids.detach().cpu().numpy() if isinstance(topk_ids, torch.Tensor) else np.asarray(topk_ids)


def _vote(picks: np.ndarray, num_experts: int, scores: np.ndarray | None = None) -> list[int]:
    """Union of per-token picks [T, m], most votes first (ties: higher summed score, then lower id)."""
    counts = np.bincount(picks.reshape(-1), minlength=num_experts)
    if scores is None:
        order = np.argsort(-counts, kind="stable")
    else:
        order = np.lexsort((-scores.sum(0), -counts))
    return order[:np.count_nonzero(counts)].tolist()


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


@dataclass
class TraceHidden:
    """Stands in for the hidden state when a trace is replayed: the trace and the batch's tokens."""
    trace: object
    tokens: np.ndarray


def ranked_experts(picks: torch.Tensor, num_experts: int, scored: bool = True) -> torch.Tensor:
    """``_vote`` on the device, without a host sync and with a fixed shape: the union of per-token
    picks [T, m] (best first per token), most votes first (ties: the higher summed rank score m -
    position if ``scored``, then the lower id), as int32 [min(E, T*m)], -1 after the last picked."""
    T, m = picks.shape
    E = num_experts
    flat = picks.reshape(-1).long()
    counts = torch.zeros(E, dtype=torch.int64, device=picks.device).scatter_add_(0, flat, torch.ones_like(flat))
    key = counts
    if scored:
        rank_score = torch.arange(m, 0, -1, device=picks.device).repeat(T)
        key = counts * (T * m + 1) + torch.zeros_like(counts).scatter_add_(0, flat, rank_score)
    order = torch.argsort(-key, stable=True)[: min(E, T * m)]
    return torch.where(counts.gather(0, order) > 0, order, -1).to(torch.int32)


class Predictor:
    """What a layer call may prefetch. ``predict`` (host mode, the simulator): expert lists per future
    layer, best first. Predictors that also run in device mode have ``device_predict``: the same
    rankings as int32 tensors [W] (-1 padded), computed on the device without a host sync."""
    name = "predictor"

    def predict(self, layer: int, topk_ids, hidden, num_layers: int, depth: int) -> dict[int, list[int]]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Size of what the predictor stores (its tables or weights), in bytes."""
        return 0


class SameExpertsPredictor(Predictor):
    """The next layers will need the experts this layer used (most used first)."""
    name = "same"

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        ids = _ids(topk_ids)
        order = _vote(ids, int(ids.max()) + 1)
        return {(layer + d) % num_layers: order for d in range(1, depth + 1)}

    def device_predict(self, layer, topk_ids, hidden, num_layers, depth, num_experts: int):
        order = ranked_experts(topk_ids.clamp(0, num_experts - 1), num_experts, scored=False)
        return {(layer + d) % num_layers: order for d in range(1, depth + 1)}


class OraclePredictor(Predictor):
    """Reads a given future routing: `schedule` lists, in call order, the experts each forward
    will need (e.g. [[experts of step 0 layer 0], [step 0 layer 1], ...]). For tests and bounds."""
    name = "oracle"

    def __init__(self, schedule: Sequence[Sequence[int]]):
        self.schedule = [list(s) for s in schedule]
        self.calls = 0

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        i, self.calls = self.calls, self.calls + 1
        return {(layer + d) % num_layers: self.schedule[i + d]
                for d in range(1, depth + 1) if i + d < len(self.schedule)}


class FrequencyPredictor(Predictor):
    """Each layer's most frequently routed experts (from a train trace)."""
    name = "frequency"

    def __init__(self, freq: np.ndarray):
        self.freq = np.asarray(freq, dtype=np.float32)  # [L, E]
        self._order = [list(map(int, np.argsort(-f, kind="stable"))) for f in self.freq]

    @classmethod
    def fit(cls, trace) -> "FrequencyPredictor":
        L, E = trace.num_layers, trace.num_experts
        return cls(np.stack([np.bincount(trace.topk_ids[l].reshape(-1), minlength=E) for l in range(L)]))

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        m = len(np.unique(_ids(topk_ids)))
        return {(layer + d) % num_layers: self._order[(layer + d) % num_layers][:m] for d in range(1, depth + 1)}

    @property
    def nbytes(self):
        return self.freq.nbytes


class _HistoryPredictor(Predictor):
    """Keeps the routing of the current step's layers (reset when the layer does not advance)."""
    history = 3

    def __init__(self):
        self._hist: dict[int, np.ndarray] = {}
        self._last = -1

    def _remember(self, layer: int, topk_ids) -> None:
        if layer <= self._last:
            self._hist.clear()
        self._last = layer
        self._hist[layer] = _ids(topk_ids)


class TransitionPredictor(_HistoryPredictor):
    """Sum over h = 0..2 and the token's experts s at layer l-h of P(e at l+d | s at l-h)."""
    name = "transition"

    def __init__(self, tables: np.ndarray, num_experts: int, top_k: int):
        super().__init__()
        self.tables = np.asarray(tables, dtype=np.float32)  # [L, G, E, E]: src layer, gap-1, src, dst
        self.E, self.k = num_experts, top_k

    @classmethod
    def fit(cls, trace, max_gap: int = 5) -> "TransitionPredictor":
        L, E, ids = trace.num_layers, trace.num_experts, trace.topk_ids
        tables = np.zeros((L, max_gap, E, E), dtype=np.float64)
        for src in range(L):
            for g in range(1, max_gap + 1):
                if src + g >= L:
                    break
                a, b = ids[src], ids[src + g]  # [N, k]
                pairs = (a[:, :, None] * E + b[:, None, :]).reshape(-1)
                c = np.bincount(pairs, minlength=E * E).reshape(E, E) + 0.1  # smoothed counts
                tables[src, g - 1] = c / c.sum(1, keepdims=True)
        return cls(tables, E, trace.top_k)

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        self._remember(layer, topk_ids)
        out = {}
        for d in range(1, depth + 1):
            dst = layer + d
            if dst >= num_layers:
                break
            score = 0.0
            for h in range(self.history):
                src, gap = layer - h, d + h
                if src < 0 or src not in self._hist or gap > self.tables.shape[1]:
                    continue
                score = score + self.tables[src, gap - 1][self._hist[src]].sum(1)  # [T, E]
            out[dst] = _vote(_topk(score, self.k), self.E, score)
        return out

    @property
    def nbytes(self):
        return self.tables.nbytes


class LearnedPredictor(_HistoryPredictor):
    """MLP: [multi-hot of layers l, l-1, l-2 (3E), one-hot l (L)] -> logits for l+1..l+D (D*E)."""
    name = "learned"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, depth: int = 3, width: int = 512):
        super().__init__()
        self.L, self.E, self.k, self.D = num_layers, num_experts, top_k, depth
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3 * num_experts + num_layers, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, depth * num_experts))

    def _features(self, layer: int, hist: list[np.ndarray | None]) -> torch.Tensor:
        T = next(h for h in hist if h is not None).shape[0]
        x = np.zeros((T, 3 * self.E + self.L), dtype=np.float32)
        rows = np.arange(T)[:, None]
        for h, ids in enumerate(hist):
            if ids is not None:
                x[rows, h * self.E + ids] = 1.0
        x[:, 3 * self.E + layer] = 1.0
        return torch.from_numpy(x)

    @classmethod
    def fit(cls, trace, depth: int = 3, epochs: int = 4, batch: int = 1024, seed: int = 0,
            progress: bool = False) -> "LearnedPredictor":
        from tqdm import tqdm

        torch.manual_seed(seed)
        L, E, k, ids = trace.num_layers, trace.num_experts, trace.top_k, trace.topk_ids
        self = cls(L, E, k, depth)
        xs, ys, ms = [], [], []
        for l in range(L - 1):
            xs.append(self._features(l, [ids[l - h] if l - h >= 0 else None for h in range(3)]))
            y = np.zeros((ids.shape[1], depth * E), dtype=np.float32)
            m = np.zeros((ids.shape[1], depth * E), dtype=np.float32)
            for d in range(1, depth + 1):
                if l + d < L:
                    y[np.arange(ids.shape[1])[:, None], (d - 1) * E + ids[l + d]] = 1.0
                    m[:, (d - 1) * E:d * E] = 1.0
            ys.append(torch.from_numpy(y))
            ms.append(torch.from_numpy(m))
        X, Y, M = torch.cat(xs), torch.cat(ys), torch.cat(ms)
        opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        for _ in tqdm(range(epochs), desc="fit learned predictor", disable=not progress):
            for idx in torch.randperm(len(X), generator=g).split(batch):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.net(X[idx]), Y[idx], weight=M[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        self._remember(layer, topk_ids)
        x = self._features(layer, [self._hist.get(layer - h) for h in range(3)])
        logits = self.net(x).numpy()
        out = {}
        for d in range(1, min(depth, self.D) + 1):
            if layer + d >= num_layers:
                break
            s = logits[:, (d - 1) * self.E:d * self.E]
            out[layer + d] = _vote(_topk(s, self.k), self.E, s)
        return out

    @property
    def nbytes(self):
        return sum(p.numel() * p.element_size() for p in self.net.parameters())


class GateLookaheadPredictor(Predictor):
    """Layer l+d's router applied to layer l's MoE input. With the model's router weights [E, H]
    and MoE-norm weights [H] per layer: x_l = rmsnorm(r) * w_l, so rmsnorm_{l+d}(r) = x_l * w_{l+d} / w_l
    exactly, and the lookahead ranks gate_{l+d}(x_l * w_{l+d} / w_l). Each token names its `width`
    best-ranked experts (default: the layer's top-k; wider buys recall with copy bandwidth, and the
    answer stays best first, so a byte budget cuts the least likely). Replaying a trace, it reads
    the recorded ranking instead (``TraceHidden``; the trace field named by ``trace_field``)."""
    name = "gate"
    trace_field = "lookahead"
    record_hint = "record it with --lookahead D"
    wraps = False  # predicts the next token's first layers from the last ones (see LearnedGatePredictor)

    def __init__(self, gates: Sequence[torch.Tensor] | None = None, norm_weights: Sequence[torch.Tensor] | None = None,
                 top_k: int | None = None, width: int | None = None):
        if width is not None and width < 1:
            raise ValueError(f"lookahead width must be >= 1, got {width}")
        self.gates, self.norms, self.k, self.width = gates, norm_weights, top_k, width
        self._maps: dict = {}  # (layer, distances, device) -> the folded maps, built on first use
        if width is not None:
            self.name = f"{type(self).name}-top{width}"  # the plain name is the top-k lookahead

    def logits(self, layer: int, d: int, x: torch.Tensor) -> torch.Tensor:
        return self.stacked_logits(layer, (d,), x)[0]

    def stacked_logits(self, layer: int, ds: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        """[len(ds), T, E] logits for layers layer+d, d in ds, in one matmul: the norm ratio is
        folded into each router once (gate_{l+d} * w_{l+d} / w_l, fp32, kept per layer and
        distances on x's device), so a decode call costs a cast, a matmul and no weight casts."""
        if self.gates is None:
            raise ValueError("GateLookaheadPredictor needs the model's router and norm weights "
                             "(gate_lookahead_parts) to predict from a hidden state")
        key = (layer, tuple(ds), x.device)
        maps = self._maps.get(key)
        if maps is None:
            maps = self._maps[key] = torch.cat([
                self.gates[layer + d].float() * (self.norms[layer + d].float() / self.norms[layer].float())
                for d in ds]).to(x.device)  # [len(ds) * E, H]
        return (x.float() @ maps.t()).view(x.shape[0], len(ds), -1).transpose(0, 1)

    def predict_entry(self, residual: torch.Tensor, num_layers: int, depth: int) -> dict[int, list[int]]:
        """The experts of layers 0 .. depth-1 from the residual stream that enters them, before layer 0's
        attention: a pipeline stage's first layers, predicted from the hidden state the stage receives
        (layer j's router on rmsnorm(residual) x layer j's MoE-input norm weight). {layer: experts, best
        first}, as ``predict``."""
        if self.gates is None:
            raise ValueError("GateLookaheadPredictor needs the model's router and norm weights to predict from a "
                             "hidden state")
        x = residual.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        out = {}
        for j in range(min(depth, num_layers)):
            logits = (x * self.norms[j].float().to(x.device)) @ self.gates[j].float().to(x.device).t()  # [T, E]
            E = logits.shape[-1]
            picks = torch.topk(logits, min(self.width or self.k or E, E), dim=-1).indices.cpu().numpy()
            out[j] = _ranked_vote(picks, E)
        return out

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        ds = [d for d in range(1, depth + 1) if layer + d < num_layers or self.wraps]
        ranked, E = [], 0
        if isinstance(hidden, TraceHidden):
            la = getattr(hidden.trace, self.trace_field)
            if la is None:
                raise ValueError(f"the replayed trace has no {self.trace_field} ranking for the {self.name} "
                                 f"predictor ({self.record_hint})")
            m = self.width or hidden.trace.top_k
            if m > la.shape[3]:
                raise ValueError(f"lookahead width {m} exceeds the trace's recorded ranking ({la.shape[3]}); "
                                 "record the trace with a larger --lookahead-width")
            ds = [d for d in ds if d <= la.shape[0]]
            ranked = [la[d - 1, layer, hidden.tokens, :m] for d in ds]
            E = hidden.trace.num_experts
        elif ds:
            logits = self.stacked_logits(layer, ds, hidden)  # [D, T, E]
            E = logits.shape[-1]
            m = min(self.width or self.k or _ids(topk_ids).shape[1], E)
            ranked = torch.topk(logits, m, dim=-1).indices.cpu().numpy()  # one host transfer for all distances
        out = {}
        for d, picks in zip(ds, ranked):
            out[(layer + d) % num_layers] = _ranked_vote(np.asarray(picks), E)
        return out


    def device_predict(self, layer, topk_ids, hidden, num_layers, depth, num_experts: int):
        """``predict`` from a hidden state, on the device: each token's `width` best experts per
        distance, voted as ``predict`` votes them (ranked_experts)."""
        ds = [d for d in range(1, depth + 1) if layer + d < num_layers or self.wraps]
        if not ds:
            return {}
        logits = self.stacked_logits(layer, ds, hidden)  # [D, T, E]
        m = min(self.width or self.k or topk_ids.shape[1], num_experts)
        picks = torch.topk(logits, m, dim=-1).indices
        return {(layer + d) % num_layers: ranked_experts(picks[i], num_experts) for i, d in enumerate(ds)}


def multi_hot(topk_ids, num_experts: int, device=None) -> torch.Tensor:
    """[.., k] expert ids -> [.., E] float, 1 where routed."""
    ids = torch.as_tensor(topk_ids, device=device).long()
    return torch.zeros(*ids.shape[:-1], num_experts, device=ids.device).scatter_(-1, ids, 1.0)


def context_features(x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """What a token leaves for the next token's learned lookahead at one layer: its routing
    (``multi_hot`` [.., E]) and its normalised MoE input [.., H], concatenated."""
    return torch.cat([routed, x.float()], -1)


def previous_token(features: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[.., N, F] for N tokens in windows of seq_len, in order -> each token's predecessor's row
    (zeros for a window's first token: nothing came before it)."""
    prev = features.roll(1, dims=-2)
    prev[..., ::seq_len, :] = 0
    return prev


class LearnedGatePredictor(GateLookaheadPredictor):
    """Gate lookahead, learned: for each layer l and distance d, logits for layer l+d from layer l's
    MoE input x_l = x_l W^T + b + B gelu(A x_l + P c + a) + C c, with W starting at the gate
    lookahead's own map (gate_{l+d} * w_{l+d} / w_l) and the rest at zero (A, P: nn.Linear's init),
    trained (BCE on the routed experts) on hidden states and routing of a train split
    (``traces.recorder.hidden_states``). c (``context_features``) is what the previous token left at
    layer l+d: its experts there and its MoE input there, known at decode time (the previous step
    ran layer l+d) and carrying what attention will mix in, which x_l cannot see. At runtime the
    predictor keeps each layer's last call (rows = sequences; a call with another row count, e.g. a
    prefill, gets zero context, like a sequence's first token). Without P and C (an older fit) it
    reads x_l alone.

    Across the step boundary (fits with context, meta ``wrap``): for l + d >= L it predicts layer
    j = l + d - L of the sequence's next token, from x_l and what this token left at layer j (its
    own experts and MoE input there; this step ran layer j already). W starts at zero there (no gate
    map spans two tokens). Without it, layer 0 of every token gets no prediction at all."""
    name = "learned-gate"
    trace_field = "learned_lookahead"
    record_hint = "record it with `prophet trace record --learned-gate PATH`"
    TENSORS = ("W", "b", "A", "a", "B", "P", "C")

    def __init__(self, W: torch.Tensor | None = None, b=None, A=None, a=None, B=None, P=None, C=None,
                 top_k: int | None = None, width: int | None = None, meta: dict | None = None,
                 wrap: bool | None = None):
        """Without tensors it only replays a trace's recorded ranking (``meta``: its fit, with nbytes).
        ``wrap``: the tensors' rows for l + d >= L predict the next token's first layers (what
        ``fit`` with context makes); default: what ``meta`` says, else no."""
        super().__init__(top_k=top_k, width=width)
        # [D, L, E, H], [D, L, E], [D, L, R, H], [D, L, R], [D, L, E, R], [D, L, R, E+H], [D, L, E, E+H];
        # rows with l + d >= L: the next token's layer l + d - L (wrap fits), else unused
        self.W, self.b, self.A, self.a, self.B, self.P, self.C = W, b, A, a, B, P, C
        self.meta = dict(meta or {})
        if wrap is not None:
            if wrap and P is None:
                raise ValueError("wrap=True needs the context tensors P and C (a fit with context)")
            self.meta["wrap"] = bool(wrap)
        self._last: dict[int, torch.Tensor] = {}  # layer -> context_features of its last call's tokens

    @property
    def depth(self) -> int:
        return self.W.shape[0] if self.W is not None else self.meta.get("depth", 3)

    @property
    def has_context(self) -> bool:
        return self.P is not None

    @property
    def wraps(self) -> bool:
        return bool(self.meta.get("wrap", False))

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in self.TENSORS) if t is not None]

    def _ready(self, layer: int, d: int, x: torch.Tensor) -> None:
        """Refuses what this fit cannot predict; moves the tensors to x's device on first use."""
        if self.W is None:
            raise ValueError("this LearnedGatePredictor has no weights (trace replay only): fit it "
                             "(LearnedGatePredictor.fit, `prophet trace fit-lookahead`) or load a saved one")
        if d > self.depth:
            raise ValueError(f"learned gate lookahead was fitted for depth {self.depth}, asked for {d}")
        L = self.W.shape[1]
        if layer + d >= L and not self.wraps:
            raise ValueError(f"this learned gate lookahead was fitted without the step boundary: layer {layer} + {d} >= {L}")
        if self.W.device != x.device:  # fitted and loaded on the CPU; used where the hidden states are
            for n in self.TENSORS:
                if getattr(self, n) is not None:
                    setattr(self, n, getattr(self, n).to(x.device))

    def _context(self, layer: int, d: int, x: torch.Tensor) -> torch.Tensor:
        """What this predictor kept from layer+d's last call (rows = x's rows), else zeros."""
        last = self._last.get((layer + d) % self.W.shape[1])
        return last if last is not None and last.shape[0] == x.shape[0] else x.new_zeros(x.shape[0], self.P.shape[-1])

    def stacked_logits(self, layer, ds, x):
        """Distances 1..m at once (what ``predict`` asks): the parameters of those distances are
        slices of the stacked tensors, so a call is a few batched matmuls instead of ~13 launches per
        distance. Other distance sets go one by one through ``logits``."""
        ds = list(ds)
        if len(ds) == 1 or ds != list(range(1, len(ds) + 1)):
            return torch.stack([self.logits(layer, d, x) for d in ds])
        for d in ds:
            self._ready(layer, d, x)
        m, xf = len(ds), x.float()
        pre = torch.matmul(xf, self.A[:m, layer].transpose(1, 2)) + self.a[:m, layer, None, :]  # [m, T, R]
        out = torch.matmul(xf, self.W[:m, layer].transpose(1, 2)) + self.b[:m, layer, None, :]  # [m, T, E]
        if self.has_context:
            c = torch.stack([self._context(layer, d, xf) for d in ds])  # [m, T, E + H]
            pre = pre + torch.matmul(c, self.P[:m, layer].transpose(1, 2))
            out = out + torch.matmul(c, self.C[:m, layer].transpose(1, 2))
        return out + torch.matmul(torch.nn.functional.gelu(pre), self.B[:m, layer].transpose(1, 2))

    def logits(self, layer, d, x, context: torch.Tensor | None = None):
        """`context`: the previous tokens' ``context_features`` at layer+d (for a wrap, layer+d-L: this
        token's), one row per row of x (default: what this predictor kept from that layer's last call,
        or zeros)."""
        self._ready(layer, d, x)
        x = x.float()
        i = (d - 1, layer)
        pre = x @ self.A[i].t() + self.a[i]
        out = x @ self.W[i].t() + self.b[i]
        if self.has_context:
            if context is None:
                context = self._context(layer, d, x)
            pre = pre + context @ self.P[i].t()
            out = out + context @ self.C[i].t()
        return out + torch.nn.functional.gelu(pre) @ self.B[i].t()

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        out = super().predict(layer, topk_ids, hidden, num_layers, min(depth, self.depth))
        self._remember(layer, topk_ids, hidden)
        return out

    def device_predict(self, layer, topk_ids, hidden, num_layers, depth, num_experts: int):
        topk_ids = topk_ids.clamp(0, num_experts - 1)  # (device mode reads no ids back: none is refused)
        out = super().device_predict(layer, topk_ids, hidden, num_layers, min(depth, self.depth), num_experts)
        self._remember(layer, topk_ids, hidden)
        return out

    def _remember(self, layer, topk_ids, hidden) -> None:
        """This call's context for the next token's lookahead (fits with context)."""
        if self.has_context and isinstance(hidden, torch.Tensor) and topk_ids is not None:
            self._last[layer] = context_features(hidden, multi_hot(topk_ids, self.W.shape[2], hidden.device))

    @classmethod
    def fit(cls, hidden: torch.Tensor, topk_ids: torch.Tensor, gates, norm_weights, depth: int = 3,
            mlp_width: int | None = None, epochs: int = 6, batch: int = 1024, lr: float = 3e-3, seed: int = 0,
            seq_len: int | None = None, progress: bool = False) -> "LearnedGatePredictor":
        """hidden [L, N, H]: each layer's MoE input (normalised) for N train tokens; topk_ids [L, N, k].
        seq_len: the tokens are windows of seq_len in order, and the fit uses the previous token's
        context and fits the step boundary (l + d >= L: the next token's layer l + d - L, trained on
        the tokens whose window continues); None: no context (x_l alone), no step boundary."""
        from tqdm import tqdm

        L, N, H = hidden.shape
        E, k = gates[0].shape[0], topk_ids.shape[-1]
        R = mlp_width or min(4 * H, 256)
        g = torch.Generator().manual_seed(seed)
        W = torch.zeros(depth, L, E, H)
        for d in range(1, depth + 1):
            for l in range(L - d):
                W[d - 1, l] = gates[l + d].float() * (norm_weights[l + d].float() / norm_weights[l].float())[None, :]
        b, a, B = torch.zeros(depth, L, E), torch.zeros(depth, L, R), torch.zeros(depth, L, E, R)
        A = torch.empty(depth, L, R, H).uniform_(-1, 1, generator=g) / H ** 0.5  # nn.Linear's init
        hidden, target = hidden.float(), multi_hot(topk_ids, E)
        tensors = [W, b, A, a, B]
        if seq_len is not None:
            if N % seq_len:
                raise ValueError(f"{N} train tokens are not whole windows of seq_len={seq_len}")
            own = context_features(hidden, target)  # [L, N, E+H]: what each token leaves at each layer
            ctx = previous_token(own, seq_len)
            P = torch.empty(depth, L, R, E + H).uniform_(-1, 1, generator=g) / (E + H) ** 0.5
            tensors += [P, torch.zeros(depth, L, E, E + H)]
        # one set of leaves and one optimizer per distance: a shared AdamW would keep moving the other
        # distances' weights on their stale moments at every step (measured: Mixtral shape d=1 recall
        # 94.8% that way vs 96.5% fitted alone)
        per_d = [[t[i].clone().requires_grad_() for t in tensors] for i in range(depth)]
        opts = [torch.optim.AdamW(p, lr=lr, weight_decay=1e-4) for p in per_d]
        steps = [(d, idx) for _ in range(epochs) for d in range(1, depth + 1)
                 for idx in torch.randperm(N, generator=g).split(batch)]
        for d, idx in tqdm(steps, desc="fit learned gate lookahead", disable=not progress):
            n = L - d
            rows = n if seq_len is None else L  # layers d .. L-1 of this token (+ 0 .. d-1 of the next)
            x = hidden[:rows, idx]  # [rows, b, H]
            Wd, bd, Ad, ad, Bd = per_d[d - 1][:5]
            pre = torch.einsum("lbh,lrh->lbr", x, Ad[:rows]) + ad[:rows, None]
            logits = torch.einsum("lbh,leh->lbe", x, Wd[:rows]) + bd[:rows, None]
            tgt, weight = target[d:, idx], torch.ones(rows, len(idx))
            if seq_len is not None:
                Pd, Cd = per_d[d - 1][5:]
                last = idx % seq_len == seq_len - 1  # no next token in the window: no wrap target
                nxt = torch.where(last, idx, idx + 1)
                # the previous token's context at layers d..L-1; this token's own at the next token's 0..d-1
                c = torch.cat([ctx[d:, idx], own[:d, idx]])
                tgt = torch.cat([tgt, target[:d, nxt]])
                weight[n:, last] = 0
                pre = pre + torch.einsum("lbf,lrf->lbr", c, Pd)
                logits = logits + torch.einsum("lbf,lef->lbe", c, Cd)
            logits = logits + torch.einsum("lbr,ler->lbe", torch.nn.functional.gelu(pre), Bd[:rows])
            # summed over layers: the same step for each layer as fitting it alone
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(2)
            loss = ((loss * weight).sum(1) / weight.sum(1).clamp(min=1)).sum()
            opts[d - 1].zero_grad()
            loss.backward()
            opts[d - 1].step()
        params = [torch.stack([p[j].detach() for p in per_d]) for j in range(len(tensors))]
        return cls(*params, top_k=k, meta={"train_tokens": N, "depth": depth, "mlp_width": R, "epochs": epochs,
                                           "lr": lr, "seed": seed, "context": seq_len is not None,
                                           "wrap": seq_len is not None})

    @property
    def nbytes(self):
        """Parameters of the layer pairs it predicts (l + d < L, and the step boundary's), stored in bf16."""
        if self.W is None:
            return int(self.meta.get("nbytes", 0))
        D, L = self.W.shape[:2]
        used = 1.0 if self.wraps else sum(L - d for d in range(1, D + 1)) / (D * L)
        return int(sum(t.numel() for t in self._tensors()) * used) * 2

    def save(self, path) -> None:
        torch.save({"tensors": {n: getattr(self, n).to(torch.bfloat16) for n in self.TENSORS if getattr(self, n) is not None},
                    "top_k": self.k, "meta": self.meta}, path)

    def check_model(self, num_layers: int, num_experts: int, hidden: int) -> None:
        """Refuses a predictor fitted for another model shape (clear error, not a shape crash later)."""
        D, L, E, H = self.W.shape
        if (L, E, H) != (num_layers, num_experts, hidden):
            raise ValueError(f"learned gate lookahead was fitted for {L} layers x {E} experts, hidden {H}; the model "
                             f"has {num_layers} x {num_experts}, hidden {hidden}")

    @classmethod
    def load(cls, path, width: int | None = None) -> "LearnedGatePredictor":
        z = torch.load(path, map_location="cpu")
        t = {n: v.float() for n, v in z["tensors"].items()}
        return cls(*(t.get(n) for n in cls.TENSORS), top_k=z["top_k"], width=width, meta=z["meta"])


def _ranked_vote(picks: np.ndarray, num_experts: int) -> list[int]:
    """A layer's experts, best first, from each token's ranking ``picks`` [T, m]: one token (decode at
    batch 1), its ranking as it is; several, the vote of :func:`_vote` with each pick scored by its rank."""
    if picks.shape[0] == 1:
        return picks[0].tolist()
    rank_score = np.broadcast_to(np.arange(picks.shape[1], 0, -1, dtype=np.float32), picks.shape)
    return _vote(picks, num_experts, _scatter(picks, rank_score, num_experts))


def _scatter(picks: np.ndarray, values: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, E] scores from per-token picks [T, m] and their values (0 where not picked)."""
    s = np.zeros((picks.shape[0], num_experts), dtype=np.float32)
    s[np.arange(picks.shape[0])[:, None], picks] = values
    return s


PREDICTORS = {"same": SameExpertsPredictor}
TRAINED = {"frequency": FrequencyPredictor, "transition": TransitionPredictor, "learned": LearnedPredictor}


# ------------------------------------------------------------------ a transformers model's gate parts


def moe_layers(model) -> list:
    """The decoder layers of a transformers OLMoE/Mixtral-style model, each with .mlp.gate."""
    base = getattr(model, "model", model)
    layers = list(getattr(base, "layers", []))
    if not layers or not all(hasattr(l, "mlp") and hasattr(l.mlp, "gate") and hasattr(l, "post_attention_layernorm")
                             for l in layers):
        raise ValueError(f"{type(model).__name__} is not a supported MoE model: need model.layers[i].mlp.gate "
                         "and .post_attention_layernorm (transformers OLMoE, Mixtral, Qwen3-MoE)")
    return layers


def gate_lookahead_parts(model) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Router weights [E, H], MoE-norm weights [H] per layer, and the norm's eps: what
    ``GateLookaheadPredictor`` needs to predict from a layer's (normalised) MoE input."""
    layers = moe_layers(model)
    norm = layers[0].post_attention_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return ([l.mlp.gate.weight.detach() for l in layers],
            [l.post_attention_layernorm.weight.detach() for l in layers], float(eps))


def fit_predictor(name: str, train_trace, replay_trace=None) -> Predictor:
    """A predictor by name, fitted on `train_trace` where it needs data. 'gate' and 'learned-gate'
    read the replayed trace's recorded lookahead rankings (the learned one was fitted on the train
    split's hidden states when the trace was recorded; its fit is in the replayed trace's meta)."""
    if name in TRAINED:
        return TRAINED[name].fit(train_trace)
    if name == "gate":
        return GateLookaheadPredictor()
    if name == "learned-gate":
        fit = (replay_trace.meta.get("learned_lookahead") if replay_trace is not None else None) or {}
        return LearnedGatePredictor(meta=fit)
    return make_predictor(name)


def local_ids(expert_map: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Expert parallelism, on the device (no host read): global expert ids (any shape) -> this
    rank's store indices through vLLM's ``expert_map`` [E_global], int32; -1 for another rank's
    expert and for an id outside [0, E_global) (-1 padding included)."""
    G = expert_map.numel()
    g = ids.long()
    return torch.where((g >= 0) & (g < G), expert_map[g.clamp(0, G - 1)], -1).to(torch.int32)


class RankExperts(Predictor):
    """Expert parallelism: ``inner`` predicts from the global routing (global ids in, the routers of
    all experts), and the answer is this rank's experts only, as its store indices (others' dropped,
    order kept). ``expert_map`` [E_global]: vLLM's map, this rank's index of each expert or -1, on the
    device the routing is on. Every rank runs the same predictor on the same routing, so what one
    rank prefetches is the part of one global answer that it holds."""

    def __init__(self, inner: Predictor, expert_map: torch.Tensor):
        self.inner, self.name = inner, inner.name
        self.expert_map = expert_map.to(torch.int32)
        self._local_of = expert_map.tolist()

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        mine = self._local_of
        return {f: [mine[g] for g in ranked if mine[g] >= 0]
                for f, ranked in self.inner.predict(layer, topk_ids, hidden, num_layers, depth).items()}

    def device_predict(self, layer, topk_ids, hidden, num_layers, depth, num_experts: int):
        ranked = self.inner.device_predict(layer, topk_ids, hidden, num_layers, depth, self.expert_map.numel())
        return {f: local_ids(self.expert_map, r) for f, r in ranked.items()}


def runs_on_device(predictor: Predictor) -> bool:
    """Whether a predictor has ``device_predict`` (device mode runs only those)."""
    return hasattr(predictor.inner if isinstance(predictor, RankExperts) else predictor, "device_predict")


def make_predictor(predictor) -> Predictor | None:
    if predictor is None or isinstance(predictor, Predictor):
        return predictor
    if predictor in TRAINED or predictor in ("gate", "learned-gate", "oracle"):
        raise ValueError(f"predictor {predictor!r} needs data: fit it on a train trace (predictors.fit_predictor) "
                         "or build it from the model (GateLookaheadPredictor) and pass the instance")
    try:
        return PREDICTORS[predictor]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown predictor {predictor!r}; known: {', '.join([*PREDICTORS, *TRAINED, 'gate', 'learned-gate', 'oracle'])} "
                         "(or pass a Predictor instance)") from None
