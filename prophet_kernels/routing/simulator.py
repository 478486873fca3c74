"""Trace-driven simulator: replays routing traces through ExpertResidency (the decisions ProphetMoE
makes, same code) on a SlotTable (the buffer without tensors), with a timing model of the copy
engine, to measure hit rates, traffic and stalls at any capacity, policy, predictor and batch.

Decode model: B sequences decode in lockstep (lane b replays sequences b, b+B, ... back to back);
a step is one token per lane through every MoE layer; a layer needs the union of its B tokens'
experts. Time: each layer computes for `layer_s`; one copy engine moves `pcie_Bps` bytes/s in
issue order (demand fetches queue behind prefetches already issued, as on one copy stream); a
layer waits for its experts' copies (stall). A prefetch is issued only while the engine's backlog
lets it start before the last target layer begins (the byte budget of each call, derived from
bandwidth and layer time; or a fixed number of experts per call, ``prefetch_budget``, as the
runtime's setting; or no limit, ``unlimited_budget``); a prefetched expert whose copy has not
landed when needed counts as a hit that stalls ("late").
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from ..memory.buffer import DEFAULT_POLICY, BeladyPolicy, SlotTable, slots_for
from ..memory.device import DeviceDecisions
from ..memory.predictors import OraclePredictor, Predictor, TraceHidden
from ..memory.residency import ExpertResidency, MissCost
from ..memory.stream import StreamSchedule, min_stream_slots

# Layer time (us) at batch B, measured on an H100 (see environment.md, bench/results/bench_moe.jsonl):
#   OLMoE-1B-7B: vLLM 0.26 greedy decode, CUDA graphs: 512 tok/s at B=1, 5,086 tok/s at B=32 (16 layers)
#   Mixtral-8x7B: Prophet's paged MoE kernel alone (attention excluded, so a lower bound), B=1 and 16
MEASURED_LAYER_US = {
    "OLMoE-1B-7B": {1: 1e6 / 512 / 16, 32: 32e6 / 5086 / 16},
    "Mixtral-8x7B": {1: 246.4, 16: 923.2},
}
# Pinned host-to-device copy bandwidth measured on the H100 (environment.md): 52.7 GB/s for one
# 12.6 MB copy, 55 GB/s for large ones.
MEASURED_PCIE_GBPS = {"OLMoE-1B-7B": 52.7, "Mixtral-8x7B": 55.0}


# the device mode's policies (memory.device), their decisions replayed: simulator name -> device policy
DEVICE_SIM_POLICIES = {"device-next-use": "next-use", "device-lru": "lru"}


def layer_seconds(model: str, batch: int) -> float:
    """Measured layer time at `batch`, log-linear between the measured batches (clamped outside)."""
    if model not in MEASURED_LAYER_US:
        raise ValueError(f"no measured layer time for {model!r}; pass layer_us explicitly "
                         f"(measured: {', '.join(MEASURED_LAYER_US)})")
    pts = sorted(MEASURED_LAYER_US[model].items())
    if batch <= pts[0][0]:
        return pts[0][1] * 1e-6
    if batch >= pts[-1][0]:
        return pts[-1][1] * 1e-6
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if b0 <= batch <= b1:
            f = math.log(batch / b0) / math.log(b1 / b0)
            return (t0 + f * (t1 - t0)) * 1e-6
    raise AssertionError


def timing_model(trace) -> str | None:
    """The catalogue model whose expert size and measured constants replay `trace` by default: the
    model its routing shape mimics, or for real routing of a model outside the catalogue the one
    its meta names (``timing_model``), or None (then expert_bytes, pcie_gbps and layer_us are needed)."""
    return trace.meta.get("mimics") or trace.meta.get("timing_model")


def check_simulate_args(num_layers: int, num_experts: int, capacity, depth, has_predictor: bool, expert_bytes=None,
                        pcie_gbps=None, layer_us=None, max_steps=None, prefetch_budget=None,
                        unlimited_budget: bool = False, expert_dtype: str = "bf16", capacity_dtype=None) -> None:
    """Refuse what makes no sense for a replay of a trace with `num_layers` x `num_experts`, one clear
    line naming the argument (``simulate`` and ``prophet simulate`` call it before any work)."""
    def whole(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not (isinstance(capacity, (int, float, np.floating, np.integer)) and math.isfinite(capacity) and capacity > 0):
        raise ValueError(f"capacity={capacity!r}: give a fraction of all experts in (0, 1] or a whole number of slots")
    if capacity > 1 and capacity != int(capacity):
        raise ValueError(f"capacity={capacity}: a fraction of all experts is at most 1; a slot count is a whole number")
    if capacity > 1 and capacity > num_layers * num_experts:
        raise ValueError(f"capacity={int(capacity)} slots exceeds the trace's {num_layers} x {num_experts} experts")
    if has_predictor and (not whole(depth) or not 1 <= depth < num_layers):
        raise ValueError(f"depth={depth!r}: prefetch depth in layers must be a whole number in [1, {num_layers - 1}] "
                         f"(the trace has {num_layers} layers)")
    for name, v in (("expert_bytes", expert_bytes), ("pcie_gbps", pcie_gbps), ("layer_us", layer_us)):
        if v is not None and not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r}: must be a finite number > 0")
    if max_steps is not None and (not whole(max_steps) or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r}: must be a whole number >= 1")
    if prefetch_budget is not None and (not whole(prefetch_budget) or prefetch_budget < 0 or unlimited_budget):
        raise ValueError(f"prefetch_budget={prefetch_budget!r}: give a whole number of experts >= 0, "
                         "without unlimited_budget")
    for name, v in (("expert_dtype", expert_dtype), ("capacity_dtype", capacity_dtype)):
        if v is not None and v not in ("bf16", "fp8"):
            raise ValueError(f"{name}={v!r}: bf16 or fp8")


def lanes(trace, batch: int) -> np.ndarray:
    """[steps, batch] token indices: lane b replays sequences b, b+B, ... back to back; all lanes
    are cut to the shortest so every step has B tokens. A batch above the trace's sequences cuts
    each sequence into ceil(B / sequences) consecutive pieces first (a lane replays pieces, token
    order kept within each), as long as a piece keeps at least 8 tokens."""
    seqs = trace.sequences()
    pieces = -(-batch // trace.num_seqs) if isinstance(batch, int) and batch >= 1 else 0
    if pieces < 1 or (pieces > 1 and min(len(q) for q in seqs) // pieces < 8):
        most = trace.num_seqs * max(1, min(len(q) for q in seqs) // 8)
        raise ValueError(f"batch {batch} must be in [1, {most}] (the trace's {trace.num_seqs} sequences, cut into "
                         "pieces of at least 8 tokens above that)")
    if pieces > 1:
        seqs = [piece for q in seqs for piece in np.array_split(q, pieces)]
    per_lane = [np.concatenate(seqs[b::batch]) for b in range(batch)]
    steps = min(len(p) for p in per_lane)
    return np.stack([p[:steps] for p in per_lane], axis=1)


def model_flops_from_bytes(expert_bytes: int, expert_dtype: str) -> int:
    """6 x H x I FLOPs per token of an expert of ``expert_bytes`` in ``expert_dtype`` (3 x H x I weights)."""
    return int(2 * expert_bytes / {"bf16": 2, "fp8": 1}.get(expert_dtype, 2))


def late_hits(got, filled, ready, start: float) -> int:
    """Hits of a layer call whose copy had not landed when the call began (at `start`): the one
    definition of "landed in time" for host and device rows alike (a device-mode call then waits for
    them before it decides, a host-mode call after: both are late)."""
    return sum(1 for s in got if s not in filled and ready[s] > start)


def frequency_placement(trace) -> list[tuple[int, int]]:
    """Every (layer, expert) of `trace`'s shape, most routed token-slots first (ties: lower layer, then
    lower expert): the static placement a routing profile gives (fit it on a trace disjoint from
    the one replayed)."""
    L, E = trace.num_layers, trace.num_experts
    counts = np.stack([np.bincount(trace.topk_ids[l].reshape(-1), minlength=E) for l in range(L)])
    order = np.lexsort((np.tile(np.arange(E), L), np.repeat(np.arange(L), E), -counts.reshape(-1)))
    return [(int(i // E), int(i % E)) for i in order]


def start_placement(placement: str, num_layers: int, num_experts: int, profile=None) -> list[tuple[int, int]] | None:
    """The (layer, expert) pairs a ``miss="cpu"`` buffer is filled with at start-up, first placed first
    (``PLACEMENTS``; None for ``even``: the layer's own ``place_evenly``)."""
    if placement == "even":
        return None
    if placement == "frequency":
        return frequency_placement(profile)
    return [(l, e) for l in reversed(range(num_layers)) for e in range(num_experts)]


def call_schedule(trace, grid: np.ndarray) -> list[list[int]]:
    """The unique experts of every layer call of a replay grid (``lanes``), in call order, sorted."""
    return [np.unique(trace.topk_ids[l, grid[t]]).tolist() for t in range(len(grid)) for l in range(trace.num_layers)]


@dataclass
class SimResult:
    slots: int
    policy: str
    predictor: str
    depth: int
    batch: int
    steps: int
    tokens: int
    requests: int  # unique experts needed, summed over layer calls
    hits: int
    late_hits: int  # hits whose prefetch copy had not landed
    misses: int
    prefetched: int
    prefetch_used: int
    evictions: int
    bytes_h2d: int
    stall_s: float
    misses_unpredicted: int = 0  # misses of experts no prediction named for that layer call (all, without a predictor)
    pred_recall: list[float] = field(default_factory=list)  # per depth: |predicted & needed| / |needed|
    pred_precision: list[float] = field(default_factory=list)  # per depth: |predicted & needed| / |predicted|
    layer_hit_rate: list[float] = field(default_factory=list)
    miss: str = "wait"
    fallbacks: int = 0  # no-wait: expert uses computed another way (missed, or not landed), unique per call
    extra_s: float = 0.0  # no-wait: time the fallback computation added to the layers
    elapsed_s: float = 0.0  # the replay's clock at its end: layers, stalls and what the fallback added
    placement: str = "even"  # miss cpu: the start-up experts (even, frequency)
    static: bool = False  # miss cpu: the placement kept for good (no copy, no prefetch)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def ready_hit_rate(self) -> float:
        return (self.hits - self.late_hits) / self.requests if self.requests else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(hit_rate=self.hit_rate, ready_hit_rate=self.ready_hit_rate, prefetch_precision=self.prefetch_precision,
                 misses_per_token=self.misses / self.tokens, bytes_per_token=self.bytes_h2d / self.tokens,
                 stall_us_per_token=self.stall_s / self.tokens * 1e6, fallbacks_per_token=self.fallbacks / self.tokens,
                 extra_us_per_token=self.extra_s / self.tokens * 1e6,
                 us_per_step=self.elapsed_s / self.steps * 1e6 if self.steps else 0.0)
        return d


class _Scored(Predictor):
    """Wraps a predictor to score each prediction against the future it predicts."""

    def __init__(self, inner: Predictor, schedule: list[set], depth: int):
        self.inner, self.schedule = inner, schedule
        self.call = 0
        self.hit = np.zeros(depth)
        self.needed = np.zeros(depth)
        self.predicted = np.zeros(depth)
        self.named: dict[int, set] = {}  # layer call -> experts any prediction named for it

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        want = self.inner.predict(layer, topk_ids, hidden, num_layers, depth)
        for d in range(1, depth + 1):
            c = self.call + d
            future = (layer + d) % num_layers
            if c < len(self.schedule) and future in want:
                self.named.setdefault(c, set()).update(want[future])
                need = self.schedule[c]
                self.hit[d - 1] += len(need.intersection(want[future]))
                self.needed[d - 1] += len(need)
                self.predicted[d - 1] += len(want[future])
        self.call += 1
        return want


MISSES = ("wait", "no-wait", "cpu")  # Replay's; simulate(miss="stream") replays StreamReplay instead
PLACEMENTS = ("even", "frequency", "layers")  # miss cpu: the buffer's start-up experts


@dataclass
class Call:
    """What one layer call found: its experts that had landed, those it computes another way
    (no-wait: missed or not landed yet), and its demand misses."""
    landed: list[int]
    fallback: list[int]
    missed: list[int]


class Replay:
    """The memory system's decisions (``res``: ``ExpertResidency`` or ``DeviceDecisions``) and the
    copy engine's timing, one layer call at a time: ``simulate`` runs it over a trace, and
    ``routing.quality`` beside a model decoding (where a fallback changes what the model routes next).

    One copy engine moves ``bw`` bytes/s in issue order; a layer computes for ``layer_s``. A hit
    landed in time iff its copy had completed when the layer call began (``late_hits``).
    ``miss="wait"``: misses are copied now and the layer waits for them and for late hits (stall).
    ``miss="no-wait"``: the layer never waits; its missed and not-yet-landed experts are computed
    another way (the caller's fallback: a resident low-bit stand-in, a substitute, skipping, the
    host CPU), each adding ``fallback_s`` to the layer (``fallback_parallel``: the fallback runs
    beside the GPU, as the host CPU does, so the layer takes max(layer_s, fallback_latency_s +
    n x fallback_s), the latency being the activations' round trip); the missed experts are then
    copied for the layer's next call, as many as can land by then.
    ``miss="cpu"`` (``ProphetMoE(miss="cpu")``): ``miss_cost`` splits each call's misses by their token
    counts (the same ``ExpertResidency.acquire`` the layer runs); the copies that pay go on the copy
    engine and the GPU waits for them; the CPU computes the rest from the call's start, beside the
    GPU, taking ``miss_cost.call_seconds`` (its fixed cost, each expert's bytes or FLOPs at the CPU's
    rates, the DRAM the copies share): the layer ends when both have. The buffer starts filled evenly
    over the layers (``ExpertResidency.place_evenly``, landed at time 0), as the layer fills it, or
    with ``placement`` ((layer, expert) pairs, first placed first: e.g. the most used in a profile);
    a ``miss_cost`` with ``copy=False`` and no predictor keeps that placement for good (static)."""

    def __init__(self, res, expert_bytes: int, bw: float, layer_s: float, depth: int, prefetch_budget=None,
                 unlimited_budget: bool = False, device: bool = False, miss: str = "wait", fallback_s: float = 0.0,
                 fallback_parallel: bool = False, fallback_latency_s: float = 0.0, miss_cost: MissCost | None = None,
                 staging_only: bool = False, placement=None):
        self.res, self.expert_bytes, self.layer_s, self.depth = res, expert_bytes, layer_s, depth
        self.prefetch_budget, self.unlimited_budget, self.device, self.miss = prefetch_budget, unlimited_budget, device, miss
        self.fallback_s, self.fallback_parallel, self.fallback_latency_s = fallback_s, fallback_parallel, fallback_latency_s
        self.copy_s = expert_bytes / bw
        self.ready = [0.0] * res.state.num_slots if device else [0.0] * res.table.num_slots  # when each slot's copy lands
        self.now = self.engine = 0.0
        self.fallbacks, self.extra_s = 0, 0.0
        if miss == "cpu" and miss_cost is None:
            raise ValueError("miss='cpu' needs a MissCost (the CPU's and the link's rates)")
        self.miss_cost = miss_cost
        if placement is not None and (miss != "cpu" or staging_only):
            raise ValueError("a start-up placement goes with miss='cpu' and a buffer (not the staging ring)")
        if miss == "cpu" and not staging_only:  # the layer's start-up placement (not counted)
            res.place_evenly() if placement is None else res.place(placement)
            res.reset_stats()

    def _copy(self, fills) -> None:
        for s, _, _ in fills:
            self.engine = max(self.engine, self.now) + self.copy_s
            self.ready[s] = self.engine

    def _budget(self, layers_ahead: float) -> int:
        """Bytes of the copies that can start before `layers_ahead` layer times from now."""
        window = self.now + layers_ahead * self.layer_s - max(self.engine, self.now)
        return max(0, math.ceil(window / self.copy_s)) * self.expert_bytes

    def landed(self, layer: int) -> list[int]:
        """Experts of `layer` resident and landed now (host policies)."""
        table = self.res.table
        return [e for e in range(table.num_experts) if (s := table.lookup(layer, e)) >= 0 and self.ready[s] <= self.now]

    def call(self, layer: int, experts, topk_ids=None, hidden=None) -> Call:
        res, st = self.res, self.res.stats.layers[layer]
        experts = list(experts)
        start = self.now  # the layer call begins: a hit landed in time iff its copy completed by now
        if self.device and self.engine > self.now:  # a device-mode layer call waits for all the previous
            st.stall_s += self.engine - self.now  # call's prefetches before it decides: a stall too
            self.now = self.engine
        if self.miss == "cpu":
            return self._call_cpu(layer, experts, topk_ids, hidden, start)
        got, fills = res.acquire(layer, experts, **({} if self.miss == "wait" else {"fill": False}))
        filled = {s for s, _, _ in fills}
        missed = [e for e, s in zip(experts, got) if s < 0 or s in filled]
        st.late_hits += late_hits([s for s in got if s >= 0], filled, self.ready, start)
        duration = self.layer_s
        if self.miss == "wait":
            self._copy(fills)
            wait = max(self.ready[s] for s in got)
            if wait > self.now:
                st.stall_s += wait - self.now
                self.now = wait
            landed, fallback = experts, []
        else:
            landed = [e for e, s in zip(experts, got) if s >= 0 and self.ready[s] <= start]
            fallback = [e for e, s in zip(experts, got) if not (s >= 0 and self.ready[s] <= start)]
            if fallback:
                cost = len(fallback) * self.fallback_s
                duration = (max(self.layer_s, self.fallback_latency_s + cost) if self.fallback_parallel
                            else self.layer_s + cost)
                self.fallbacks += len(fallback)
                self.extra_s += duration - self.layer_s
            # the missed experts, copied for this layer's next call (one step ahead), as many as land by then
            L = res.table.num_layers
            self._copy(res.fill_ahead(layer, missed, self._budget(L)))
        if res.prefetch_depth:
            if not self.unlimited_budget and self.prefetch_budget is None:  # what can start before the farthest
                res.prefetch_budget_bytes = self._budget(self.depth)  # target layer begins
            self._copy(res.prefetch(layer, topk_ids, hidden))
        res.release([s for s in got if s >= 0])
        self.now += duration
        return Call(landed=landed, fallback=fallback, missed=missed)


    def _call_cpu(self, layer: int, experts: list[int], topk_ids, hidden, start: float) -> Call:
        res, st, cost = self.res, self.res.stats.layers[layer], self.miss_cost
        ids, counts = np.unique(np.asarray(topk_ids).reshape(-1), return_counts=True)
        tokens = dict(zip(ids.tolist(), counts.tolist()))
        got, fills = res.acquire(layer, experts, fill=cost, tokens=[tokens[e] for e in experts])
        filled = {s for s, _, _ in fills}
        missed = [e for e, s in zip(experts, got) if s < 0 or s in filled]
        st.late_hits += late_hits([s for s in got if s >= 0], filled, self.ready, start)
        self._copy(fills)
        wait = max((self.ready[s] for s in got if s >= 0), default=self.now)
        if wait > self.now:  # the GPU's part waits for its copies and late hits
            st.stall_s += wait - self.now
            self.now = wait
        cpu = [e for e, s in zip(experts, got) if s < 0]
        duration = self.layer_s
        if cpu:
            cpu_s = cost.call_seconds([tokens[e] for e in cpu], len(fills))
            st.cpu_s += cpu_s
            duration = max(self.layer_s, start + cpu_s - self.now)  # the CPU started with the call
            self.fallbacks += len(cpu)
            self.extra_s += duration - self.layer_s
        if res.prefetch_depth:
            if not self.unlimited_budget and self.prefetch_budget is None:
                res.prefetch_budget_bytes = self._budget(self.depth)
            self._copy(res.prefetch(layer, topk_ids, hidden))
        res.release([s for s in got if s >= 0])
        self.now += duration
        return Call(landed=[e for e, s in zip(experts, got) if s >= 0], fallback=cpu, missed=missed)


class StreamReplay:
    """``miss="stream"``: the fixed schedule's decisions (``memory.stream.StreamSchedule``, the same
    ``start`` / ``before`` / ``after`` that ``ProphetMoE(miss="stream")`` follows) and their timing.
    One copy engine moves ``bw`` bytes/s in issue order; a copy into a ring part starts once the part's
    last reader has finished; a layer computes for ``layer_s`` once its part has landed (the wait is its
    stall); the last layer of a step waits for every copy in flight (a step is self-contained)."""

    def __init__(self, schedule: StreamSchedule, bw: float, layer_s: float):
        self.schedule, self.layer_s = schedule, layer_s
        self.copy_s = schedule.expert_bytes / bw
        parts = max(1, schedule.parts)
        self.ready, self.read_done = [0.0] * parts, [0.0] * parts
        self.now = self.engine = 0.0
        for layer in schedule.start():
            self._copy(layer)

    def _copy(self, layer: int) -> None:
        sch = self.schedule
        part, n = sch.part_of(layer), sch.streamed(layer)[1]
        self.engine = max(self.engine, self.now, self.read_done[part]) + n * self.copy_s
        self.ready[part] = self.engine

    def _wait(self, layer: int, until: float) -> None:
        if until > self.now:
            self.schedule.stats.layers[layer].stall_s += until - self.now
            self.now = until

    def call(self, layer: int, experts) -> None:
        sch = self.schedule
        sch.count_call(layer, experts)
        if sch.before(layer) is not None:
            self._copy(layer)
        streams = sch.streamed(layer)[1] > 0
        if streams:
            self._wait(layer, self.ready[sch.part_of(layer)])
        self.now += self.layer_s
        if streams:
            self.read_done[sch.part_of(layer)] = self.now
            nxt = sch.after(layer)
            if nxt is not None:
                self._copy(nxt)
        if layer == sch.num_layers - 1:
            self._wait(layer, max(self.ready))


def make_replay(num_layers: int, num_experts: int, slots: int, policy, predictor, depth: int, expert_bytes: int,
                bw: float, layer_s: float, prefetch_budget: int | None = None, unlimited_budget: bool = False,
                miss: str = "wait", fallback_s: float = 0.0, fallback_parallel: bool = False,
                fallback_latency_s: float = 0.0, min_slots: int = 1, miss_cost: MissCost | None = None,
                staging_only: bool = False, placement=None) -> Replay:
    """A ``Replay`` over a fresh buffer of `slots` with `policy` (a name, device-* for the device
    mode's decisions, or an ``EvictionPolicy``) and `predictor` prefetching `depth` layers ahead
    (0: none); ``prefetch_budget`` in experts per call (None: derived from the copy engine)."""
    device = policy in DEVICE_SIM_POLICIES
    if miss not in MISSES or (device and miss != "wait"):
        raise ValueError(f"miss={miss!r}: {' or '.join(MISSES)} (device policies: wait)")
    budget_bytes = None if prefetch_budget is None else prefetch_budget * expert_bytes
    if device:  # the device mode's decisions (memory.device), same step function as its kernel
        res = DeviceDecisions(num_layers, num_experts, slots, expert_bytes, predictor, depth, budget_bytes,
                              min_slots=min_slots, policy=DEVICE_SIM_POLICIES[policy])
    else:
        res = ExpertResidency(SlotTable(num_layers, num_experts, slots, policy, min_slots=min_slots), expert_bytes,
                              predictor, depth, budget_bytes)
    return Replay(res, expert_bytes, bw, layer_s, depth, prefetch_budget, unlimited_budget, device, miss, fallback_s,
                  fallback_parallel, fallback_latency_s, miss_cost, staging_only, placement)


def simulate(trace, capacity: float, policy: str = DEFAULT_POLICY, predictor: Predictor | str | None = None, depth: int = 1,
             batch: int = 1, expert_bytes: int | None = None, pcie_gbps: float | None = None,
             layer_us: float | None = None, unlimited_budget: bool = False, max_steps: int | None = None,
             progress: bool = False, prefetch_budget: int | None = None, expert_dtype: str = "bf16",
             capacity_dtype: str | None = None, miss: str = "wait", fallback_s: float = 0.0,
             fallback_parallel: bool = False, fallback_latency_s: float = 0.0, cpu_rates: dict | None = None,
             placement: str = "even", profile=None, static: bool = False, warmup_steps: int = 0,
             expert_flops: int | None = None) -> SimResult:
    """Replay `trace`. predictor: a Predictor instance, 'oracle' (exact future routing), or None.
    expert_bytes / pcie_gbps / layer_us default to the mimicked model's size and the measured
    H100 numbers; unlimited_budget lifts the prefetch byte budget (timing still modelled);
    prefetch_budget fixes it at that many experts per layer call instead of deriving it from the
    copy engine's backlog (what ``ProphetMoE(prefetch_budget_bytes=...)`` and the vLLM plugin's
    ``prefetch_budget`` setting do). ``expert_dtype``: the mimicked model's experts in bf16 or fp8
    (e4m3 with per-row scales: about half the bytes, so half the PCIe time per copy);
    ``capacity_dtype``: count ``capacity`` in experts of that dtype's size (e.g. fp8 experts in the
    bytes of a bf16 buffer: about twice the slots). ``miss``, ``fallback_s``, ``fallback_parallel``:
    ``Replay``'s (a miss that does not wait, and what computing it another way costs). ``miss="cpu"``:
    misses split between the link and the host CPU as ``ProphetMoE(miss="cpu")`` splits them, at
    ``cpu_rates`` (cpu_gbps, cpu_gflops, and optionally dram_gbps, call_us; the link is ``pcie_gbps``);
    ``capacity=0`` then is ``buffer: 0``: a staging ring of E slots, not placed at start-up; the link is
    capped at ``dram_gbps`` (a host copies no faster than it reads its memory). ``placement``: with
    ``miss="cpu"``, the buffer's start-up experts: ``even`` over the layers (the layer's),
    ``frequency``: the most routed in ``profile`` (a trace disjoint from `trace`; ``frequency_placement``),
    or ``layers``: whole layers from the last down (llama.cpp's ``--n-cpu-moe N``: the first N layers'
    experts on the CPU); ``static``: that
    placement kept for good, no copy and no prefetch, every miss on the CPU (KTransformers' fixed
    GPU expert mask), beside the default dynamic residency (copies that pay, prefetches, next-use).
    ``warmup_steps``: replay that many decode steps first and count nothing of them (the buffer's
    cold fill; what a few-step replay at a large batch would otherwise be dominated by). ``expert_flops``:
    with ``miss="cpu"``, one token through one of the trace's experts (default: the mimicked model's 6 x H x I;
    given where the trace stands in for another model's routing)."""
    from tqdm import tqdm

    from ..planner.catalog import get_model
    from ..planner.memory import expert_bytes as model_expert_bytes

    L, E = trace.num_layers, trace.num_experts
    if miss == "stream" and capacity == 0:  # buffer 0: the smallest that streams, the ring alone
        capacity = min_stream_slots(L, E)
    staging_only = miss == "cpu" and capacity == 0  # buffer 0: a staging ring of one layer's experts
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: {' or '.join(PLACEMENTS)}")
    if (placement != "even" or static) and (miss != "cpu" or staging_only):
        raise ValueError("placement and static go with miss='cpu' and a buffer (capacity > 0)")
    if (placement == "frequency") != (profile is not None):
        raise ValueError("placement='frequency' needs a profile trace, and a profile goes with it")
    if profile is not None and (profile.num_layers, profile.num_experts) != (L, E):
        raise ValueError(f"the profile trace has {profile.num_layers} layers x {profile.num_experts} experts, "
                         f"the replayed one {L} x {E}")
    if static and predictor is not None:
        raise ValueError("static keeps the start-up placement: nothing is prefetched, so give no predictor")
    check_simulate_args(L, E, E if staging_only else capacity, depth, predictor is not None, expert_bytes, pcie_gbps,
                        layer_us, max_steps, prefetch_budget, unlimited_budget, expert_dtype, capacity_dtype)
    model = timing_model(trace)
    if (expert_bytes is None or capacity_dtype) and not model:
        raise ValueError("the trace names no catalogue model: pass expert_bytes, pcie_gbps and layer_us "
                         "(--expert-bytes, --pcie-gbps, --layer-us), and no capacity_dtype")
    if expert_bytes is None:
        expert_bytes = model_expert_bytes(get_model(model), expert_dtype)
    bw = (pcie_gbps or MEASURED_PCIE_GBPS.get(model) or 0) * 1e9
    if bw <= 0:
        raise ValueError(f"no measured PCIe bandwidth for {model!r}: pass pcie_gbps (--pcie-gbps)")
    layer_s = layer_us * 1e-6 if layer_us is not None else layer_seconds(model, batch)
    miss_cost = None
    if miss == "cpu":
        rates = dict(cpu_rates or {})
        unknown = sorted(set(rates) - {"cpu_gbps", "cpu_gflops", "dram_gbps", "call_us"})
        if unknown or "cpu_gbps" not in rates or "cpu_gflops" not in rates:
            raise ValueError(f"miss='cpu' needs cpu_rates with cpu_gbps and cpu_gflops (optionally dram_gbps, call_us); "
                             f"got {sorted(rates)}")
        # one token through one expert: 6 x H x I FLOPs (the bytes of a bf16 expert)
        flops = expert_flops or (6 * get_model(model).hidden * get_model(model).moe.intermediate if model else
                                 model_flops_from_bytes(expert_bytes, expert_dtype))
        if rates.get("dram_gbps"):  # a host copies no faster than it reads its memory
            bw = min(bw, rates["dram_gbps"] * 1e9)
        miss_cost = MissCost(expert_bytes, flops, rates["cpu_gbps"], rates["cpu_gflops"], bw / 1e9,
                             rates.get("dram_gbps"), rates.get("call_us", 0.0) * 1e-6, copy=not static)
    grid = lanes(trace, batch)
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < len(grid)):
        raise ValueError(f"warmup_steps={warmup_steps!r}: a whole number in [0, {len(grid)}) (the trace's steps "
                         f"at batch {batch})")
    grid = grid[:None if max_steps is None else warmup_steps + max_steps]
    steps = len(grid)
    schedule = call_schedule(trace, grid)
    if miss == "stream":
        if predictor is not None:
            raise ValueError("miss='stream' copies every non-resident expert of the next layers: give no predictor")
        return _simulate_stream(trace, grid, schedule, capacity, expert_bytes, bw, layer_s, batch, progress,
                                warmup_steps)
    slots = E if staging_only else slots_for(capacity, L, E)  # the slots ProphetMoE and the vLLM plugin build
    if capacity_dtype and capacity_dtype != expert_dtype:  # the same bytes, in experts of another size
        slots = min(L * E, slots * model_expert_bytes(get_model(model), capacity_dtype) // expert_bytes)

    clock = [0]  # the current layer call, for Belady's next use
    if policy == "belady":
        uses: dict[tuple[int, int], list[int]] = {}
        for c, need in enumerate(schedule):
            for e in need:
                uses.setdefault((c % L, e), []).append(c)

        def next_use(layer, expert):
            u = uses.get((layer, expert), ())
            i = bisect.bisect_right(u, clock[0])  # strictly after the current layer call
            return u[i] if i < len(u) else math.inf

        pol = BeladyPolicy(next_use)
    else:
        pol = policy
    if predictor == "oracle":
        predictor = OraclePredictor(schedule)
    name = getattr(predictor, "name", "none") if predictor is not None else "none"
    scored = _Scored(predictor, [set(s) for s in schedule], depth) if predictor is not None else None
    replay = make_replay(L, E, slots, pol, scored, depth if predictor is not None else 0, expert_bytes, bw, layer_s,
                         prefetch_budget, unlimited_budget, miss, fallback_s, fallback_parallel, fallback_latency_s,
                         min_slots=1 if miss == "cpu" else max(len(s) for s in schedule), miss_cost=miss_cost,
                         staging_only=staging_only,
                         placement=start_placement(placement, L, E, profile))
    res = replay.res
    unpredicted, start = 0, 0.0
    for t in tqdm(range(steps), desc=f"simulate {name}/{policy} S={slots} B={batch}", disable=not progress):
        if t == warmup_steps and t:  # the warm-up's counts and time are left out
            res.reset_stats()
            replay.fallbacks, replay.extra_s, unpredicted, start = 0, 0.0, 0, replay.now
            if scored:
                scored.hit[:], scored.needed[:], scored.predicted[:] = 0, 0, 0
        tokens = grid[t]
        for l in range(L):
            c = t * L + l
            clock[0] = c
            call = replay.call(l, schedule[c], trace.topk_ids[l, tokens], TraceHidden(trace, tokens))
            named = scored.named.pop(c, ()) if scored else ()
            unpredicted += sum(1 for e in call.missed if e not in named)
    st = res.stats
    req = st.hits + st.misses
    steps -= warmup_steps
    return SimResult(miss=miss, fallbacks=replay.fallbacks, placement=placement, static=static,
        elapsed_s=replay.now - start, extra_s=replay.extra_s,
        slots=slots, policy=policy, predictor=name, depth=res.prefetch_depth, batch=batch, steps=steps,
        tokens=steps * batch, requests=req, hits=st.hits, late_hits=st.late_hits, misses=st.misses, prefetched=st.prefetched,
        prefetch_used=st.prefetch_used, evictions=st.evictions, bytes_h2d=st.bytes_h2d, stall_s=st.stall_s,
        misses_unpredicted=unpredicted,
        pred_recall=list(np.divide(scored.hit, np.maximum(scored.needed, 1))) if scored else [],
        pred_precision=list(np.divide(scored.hit, np.maximum(scored.predicted, 1))) if scored else [],
        layer_hit_rate=[s.hits / max(1, s.hits + s.misses) for s in st.layers])


def stream_step(num_layers: int, num_experts: int, slots: int, expert_bytes: int, bw: float, layer_s: float,
                steps: int = 4) -> dict:
    """A decode step of the stream schedule in steady state, where every layer call needs every
    expert (large batches: timing does not depend on which): step seconds, the part spent waiting
    for copies, and the copy engine's busy share. The first step is left out (its first layers' copies
    were made at start-up)."""
    sch = StreamSchedule(num_layers, num_experts, slots, expert_bytes)
    rep = StreamReplay(sch, bw, layer_s)
    everything = list(range(num_experts))
    marks = []
    for _ in range(steps + 1):
        marks.append((rep.now, sch.stats.stall_s, sch.stats.streamed))
        for layer in range(num_layers):
            rep.call(layer, everything)
    marks.append((rep.now, sch.stats.stall_s, sch.stats.streamed))
    (t0, s0, n0), (t1, s1, n1) = marks[1], marks[-1]
    step = (t1 - t0) / steps
    return {"step_s": step, "stall_s": (s1 - s0) / steps, "copy_busy": (n1 - n0) * rep.copy_s / steps / step,
            "resident_per_layer": [min(sch.resident), max(sch.resident)], "streamed_per_step": (n1 - n0) // steps,
            "slots_used": sch.used_slots}


def _simulate_stream(trace, grid, schedule, capacity, expert_bytes: int, bw: float, layer_s: float, batch: int,
                     progress: bool, warmup_steps: int = 0) -> SimResult:
    """``simulate(miss="stream")``: the fixed schedule over the trace's steps (hits and misses: a layer
    call's unique experts resident or streamed)."""
    from tqdm import tqdm

    L, E = trace.num_layers, trace.num_experts
    slots = slots_for(capacity, L, E)  # (a fraction of the experts, or a number of slots)
    sch = StreamSchedule(L, E, slots, expert_bytes)
    replay = StreamReplay(sch, bw, layer_s)
    sch.reset_stats()  # (the start-up copies land at time 0 and are not a step's)
    start = 0.0
    for t in tqdm(range(len(grid)), desc=f"simulate stream S={slots} B={batch}", disable=not progress):
        if t == warmup_steps and t:
            sch.reset_stats()
            start = replay.now
        for l in range(L):
            replay.call(l, schedule[t * L + l])
    st = sch.stats
    steps = len(grid) - warmup_steps
    return SimResult(slots=slots, policy="stream", predictor="none", depth=0, batch=batch, steps=steps,
                     tokens=steps * batch, requests=st.hits + st.misses, hits=st.hits, late_hits=0,
                     misses=st.misses, prefetched=0, prefetch_used=0, evictions=0, bytes_h2d=st.bytes_h2d,
                     stall_s=st.stall_s, miss="stream", elapsed_s=replay.now - start,
                     layer_hit_rate=[s.hits / max(1, s.hits + s.misses) for s in st.layers])
