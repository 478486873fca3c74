"""Routing traces, recorder, predictors, eviction bounds, the trace simulator (which must make
exactly ProphetMoE's decisions), batch dedup, and the committed traces' provenance."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from prophet_kernels.memory.buffer import BeladyPolicy, NextUsePolicy, SlotTable
from prophet_kernels.memory.layer import ProphetMoE
from prophet_kernels.memory.predictors import (
    GateLookaheadPredictor, LearnedGatePredictor, LearnedPredictor, OraclePredictor, SameExpertsPredictor, TraceHidden, TransitionPredictor,
    fit_predictor, make_predictor, previous_token)
from prophet_kernels.routing.simulator import lanes, simulate
from prophet_kernels.routing.traces import DATA, Trace, load_trace
from prophet_kernels.routing.traces.dedup import dedup_table, verdict


def _random_trace(L=4, E=8, k=2, seqs=6, seq_len=20, seed=0, lookahead=True):
    rng = np.random.default_rng(seed)
    N = seqs * seq_len
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(N)]) for _ in range(L)])
    la = np.stack([np.roll(ids, -d, axis=0) for d in (1, 2)]) if lookahead else None  # a perfect lookahead
    if la is not None:
        for d in (1, 2):
            la[d - 1, L - d:] = -1
    return Trace(ids, np.arange(0, N + 1, seq_len), topk_weights=rng.random(ids.shape).astype(np.float16),
                 lookahead=la, learned_lookahead=None if la is None else la[:, :, :, ::-1].copy(),  # other order
                 meta={"num_experts": E, "mimics": "OLMoE-1B-7B", "shape": "test"})


def _chain_trace(L=6, E=8, k=2, N=400, seed=0):
    """Deterministic routing chain: expert (e + 3) % E at layer l+1 follows expert e at layer l."""
    rng = np.random.default_rng(seed)
    first = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    ids = np.stack([(first + 3 * l) % E for l in range(L)])
    return Trace(ids, np.arange(0, N + 1, 20), meta={"num_experts": E, "mimics": "OLMoE-1B-7B"})


# ---------------------------------------------------------------------------------- format

def test_trace_roundtrip(tmp_path):
    tr = _random_trace()
    tr.meta["corpus"] = {"sha1": "abc"}
    back = Trace.load(tr.save(tmp_path / "t.npz"))
    assert np.array_equal(back.topk_ids, tr.topk_ids) and np.array_equal(back.lookahead, tr.lookahead)
    assert np.array_equal(back.topk_weights, tr.topk_weights) and np.array_equal(back.seq_starts, tr.seq_starts)
    assert back.meta["corpus"] == {"sha1": "abc"} and back.num_seqs == 6 and back.top_k == 2


def test_trace_rejects_bad_input(tmp_path):
    tr = _random_trace()
    with pytest.raises(ValueError, match="outside"):
        Trace(tr.topk_ids + 8, tr.seq_starts, meta=tr.meta)
    with pytest.raises(ValueError, match="seq_starts"):
        Trace(tr.topk_ids, [0, 5, 5, tr.num_tokens], meta=tr.meta)
    with pytest.raises(ValueError, match=r"\[L, N, k\]"):
        Trace(tr.topk_ids[0], tr.seq_starts, meta=tr.meta)
    with pytest.raises(ValueError, match="no trace named"):
        load_trace("no-such-trace")


# ---------------------------------------------------------------------------------- recorder

def _tiny_olmoe():
    transformers = pytest.importorskip("transformers")
    from prophet_kernels.routing.traces.recorder import moe_layers

    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                   initializer_range=0.2, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model = transformers.OlmoeForCausalLM(cfg).eval()
    for layer in moe_layers(model):  # norms that differ by layer, so the lookahead must rescale
        torch.nn.init.uniform_(layer.post_attention_layernorm.weight, 0.5, 1.5)
    return model


def test_recorder_matches_router_and_runtime_gate_lookahead():
    from prophet_kernels.routing.traces.recorder import gate_lookahead_parts, moe_layers, record

    model = _tiny_olmoe()
    windows = np.random.default_rng(0).integers(1, 64, (3, 11))
    tr = record(model, windows, lookahead_depth=2, batch=2)
    assert tr.topk_ids.shape == (4, 33, 2) and tr.num_seqs == 3 and tr.meta["num_experts"] == 8
    assert tr.lookahead.shape == (2, 4, 33, 4) and tr.learned_lookahead is None  # ranked 2k deep by default
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(windows), output_router_logits=True)
        moe_in = {}
        hooks = [l.mlp.register_forward_pre_hook(lambda m, a, i=i: moe_in.__setitem__(i, a[0].reshape(-1, 32)))
                 for i, l in enumerate(moe_layers(model))]
        model(input_ids=torch.as_tensor(windows))
        for h in hooks:
            h.remove()
    for l, logits in enumerate(out.router_logits):  # independent: top-2 of the router logits
        assert np.array_equal(np.sort(tr.topk_ids[l], 1), torch.topk(logits, 2).indices.sort(1).values.numpy())
    pred = GateLookaheadPredictor(*gate_lookahead_parts(model)[:2], top_k=2)
    for l in range(4):
        want = pred.predict(l, torch.as_tensor(tr.topk_ids[l]), moe_in[l], 4, 2)
        for d in (1, 2):
            if l + d >= 4:
                assert (tr.lookahead[d - 1, l] == -1).all() and l + d not in want
                continue
            # the runtime predictor (from layer l's normalised MoE input) == the recorded lookahead
            assert set(want[l + d]) == set(np.unique(tr.lookahead[d - 1, l, :, :2]).tolist())
            replay = pred.predict(l, None, TraceHidden(tr, np.arange(33)), 4, d)
            assert replay[l + d] == want[l + d]
    # a wider runtime lookahead names the recorded ranking, best first (one token: exactly in order)
    wide = GateLookaheadPredictor(*gate_lookahead_parts(model)[:2], width=4)
    one = wide.predict(0, None, moe_in[0][:1], 4, 1)[1]
    assert one == tr.lookahead[0, 0, 0].tolist()


def test_gate_lookahead_folded_maps_match_the_formula():
    """The live gate lookahead folds each norm ratio into its router once; its logits for all
    distances at once equal gate_{l+d}(x * w_{l+d} / w_l) computed directly (bf16 weights, as vLLM
    holds them), and it keeps one folded map per layer and distances."""
    g = torch.Generator().manual_seed(3)
    L, E, H = 5, 16, 40
    gates = [(torch.randn(E, H, generator=g) / 6).to(torch.bfloat16) for _ in range(L)]
    norms = [(torch.rand(H, generator=g) + 0.5).to(torch.bfloat16) for _ in range(L)]
    pred = GateLookaheadPredictor(gates, norms, top_k=3)
    x = torch.randn(7, H, generator=g).to(torch.bfloat16)
    for layer, ds in ((0, (1, 2, 3)), (2, (1, 2)), (3, (1,))):
        got = pred.stacked_logits(layer, ds, x)
        for j, d in enumerate(ds):
            want = (x.float() * (norms[layer + d].float() / norms[layer].float())) @ gates[layer + d].float().t()
            torch.testing.assert_close(got[j], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pred.logits(layer, d, x), want, rtol=1e-5, atol=1e-5)
    # one map per (layer, distances) asked for: three stacks and six single distances, (3, (1,)) being both
    assert len(pred._maps) == 8
    out = pred.predict(0, None, x[:1], L, 3)
    assert out == {d: torch.topk(pred.logits(0, d, x[:1])[0], 3).indices.tolist() for d in (1, 2, 3)}


def _random_learned_gate(L=4, E=8, H=24, R=16, D=3, wrap=True, seed=4):
    g = torch.Generator().manual_seed(seed)
    F = E + H
    shapes = [(D, L, E, H), (D, L, E), (D, L, R, H), (D, L, R), (D, L, E, R), (D, L, R, F), (D, L, E, F)]
    return LearnedGatePredictor(*(torch.randn(*sh, generator=g) / 4 for sh in shapes), top_k=2, wrap=wrap)


def test_learned_gate_stacked_logits_match_one_distance_at_a_time():
    """The live learned lookahead computes distances 1..m in batched matmuls; each slice equals
    logits() for that distance, with and without the previous call's context, across the step
    boundary too."""
    from prophet_kernels.memory.predictors import context_features, multi_hot

    pred = _random_learned_gate()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, generator=g)
    for layer in range(4):
        for m in (1, 2, 3):
            got = pred.stacked_logits(layer, range(1, m + 1), x)
            for d in range(1, m + 1):
                torch.testing.assert_close(got[d - 1], pred.logits(layer, d, x), rtol=1e-5, atol=1e-5)
        # leave this layer's context for the next calls (as predict does)
        pred._last[layer] = context_features(x, multi_hot(torch.randint(0, 8, (3, 2), generator=g), 8))
    assert len(pred._last) == 4
    for layer in range(4):  # now every distance reads a kept context
        got = pred.stacked_logits(layer, (1, 2, 3), x)
        for d in (1, 2, 3):
            torch.testing.assert_close(got[d - 1], pred.logits(layer, d, x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got[d - 1], pred.logits(layer, d, x, torch.zeros(3, 32)))


def test_one_token_answer_is_its_ranking():
    """Decode at batch 1 skips the vote: the one token's ranking, best first, is the answer, as the
    vote over a batch ranks it (a token alone in a batch of copies of itself votes the same)."""
    tr = _random_trace(E=16, k=4)
    pred = GateLookaheadPredictor()
    for t in range(5):
        one = pred.predict(0, None, TraceHidden(tr, np.array([t])), 4, 2)
        assert one == {d: tr.lookahead[d - 1, 0, t].tolist() for d in (1, 2)}
        assert one == pred.predict(0, None, TraceHidden(tr, np.array([t, t])), 4, 2)


def test_learned_gate_lookahead_fit_record_replay(tmp_path):
    """At zero training it is the gate lookahead; fitted, it predicts a routing that the gate
    lookahead cannot (an independent recall computed here) better; its recorded ranking equals
    its runtime prediction from the MoE input; it saves and loads."""
    from prophet_kernels.routing.traces.recorder import gate_lookahead_parts, hidden_states, moe_layers, record

    model = _tiny_olmoe()
    gates, norms, _ = gate_lookahead_parts(model)
    windows = np.random.default_rng(1).integers(1, 64, (4, 16))
    x, ids = hidden_states(model, windows, batch=2)
    assert x.shape == (4, 64, 32) and ids.shape == (4, 64, 2)
    untrained = LearnedGatePredictor.fit(x, ids, gates, norms, depth=2, epochs=0, seq_len=16)
    gate = GateLookaheadPredictor(gates, norms, top_k=2)
    for l in range(4):
        got, ref = untrained.predict(l, ids[l], x[l], 4, 2), gate.predict(l, ids[l], x[l], 4, 2)
        assert {f: got[f] for f in ref} == ref  # within the step: the gate lookahead's ranking
        assert set(got) == {(l + 1) % 4, (l + 2) % 4}  # and across the step boundary (wrap fit)

    # a routing the router cannot see from layer l: layer l+1's experts are a fixed function of a
    # direction of x_l that the gate ignores; the learned map must pick it up
    g = torch.Generator().manual_seed(0)
    N, H, E = 4000, 32, 8
    xs = torch.randn(4, N, H, generator=g)
    proj = torch.randn(H, E, generator=g)
    target = torch.topk(xs @ proj, 2, dim=-1).indices  # layer l+1 routes by x_l's projection
    ids2 = torch.zeros(4, N, 2, dtype=torch.long)
    ids2[1:] = target[:-1]
    zero_gates = [torch.randn(E, H, generator=g) for _ in range(4)]
    ones = [torch.ones(H) for _ in range(4)]
    fitted = LearnedGatePredictor.fit(xs[:, :3000], ids2[:, :3000], zero_gates, ones, depth=1, epochs=100, lr=1e-2, seed=0)
    plain = GateLookaheadPredictor(zero_gates, ones, top_k=2)

    def recall(pred, l):
        hit = 0
        for n in range(3000, 3200):  # held-out tokens, one at a time
            want = set(pred.predict(l, ids2[l, n:n + 1], xs[l, n:n + 1], 4, 1)[l + 1])
            hit += len(want & set(ids2[l + 1, n].tolist()))
        return hit / 400

    assert recall(fitted, 1) > 0.8 > recall(plain, 1) + 0.3

    # recorded ranking == runtime ranking of a sequence decoded token by token, layer by layer (the
    # runtime keeps each layer's last call as the next token's context; a window starts with none);
    # save/load keeps the predictions (bf16 storage)
    pred = LearnedGatePredictor.fit(x, ids, gates, norms, depth=2, epochs=3, seq_len=16)
    assert pred.has_context and pred.meta["context"] and pred.wraps
    tr = record(model, windows[:2], lookahead_depth=2, batch=2, learned=pred)
    assert tr.learned_lookahead.shape == (2, 4, 32, 4) and tr.meta["learned_lookahead"]["nbytes"] == pred.nbytes > 0
    wide = LearnedGatePredictor(pred.W, pred.b, pred.A, pred.a, pred.B, pred.P, pred.C, top_k=2, width=4, meta=pred.meta)
    for n in range(20):  # crosses the second window's start (token 16)
        if n % 16 == 0:
            wide._last.clear()
        for l in range(4):
            got = wide.predict(l, ids[l, n:n + 1], x[l, n:n + 1], 4, 2)
            for d in (1, 2):  # l + d >= 4: the next token's layer l + d - 4
                assert got[(l + d) % 4] == tr.learned_lookahead[d - 1, l, n].tolist(), (n, l, d)
    # a call with 5 rows after calls with 1 (a prefill after decode): zero context, not a shape error
    assert torch.equal(wide.logits(0, 1, x[0, :5]), wide.logits(0, 1, x[0, :5], torch.zeros(5, pred.P.shape[-1])))
    assert not torch.equal(wide.logits(0, 1, x[0, :1]), wide.logits(0, 1, x[0, :1], torch.zeros(1, pred.P.shape[-1])))
    back = Trace.load(tr.save(tmp_path / "t.npz"))
    assert np.array_equal(back.learned_lookahead, tr.learned_lookahead)
    replay = fit_predictor("learned-gate", None, back)
    assert replay.nbytes == pred.nbytes
    assert replay.predict(0, None, TraceHidden(back, np.arange(3)), 4, 2) == \
        pred.predict(0, None, x[0, :3], 4, 2)
    pred.save(tmp_path / "lg.pt")
    loaded = LearnedGatePredictor.load(tmp_path / "lg.pt")
    assert torch.allclose(loaded.W, pred.W, rtol=1e-2, atol=1e-3) and loaded.meta == pred.meta
    no_la = _random_trace(lookahead=False)
    with pytest.raises(ValueError, match="no learned_lookahead"):
        fit_predictor("learned-gate", None, no_la).predict(0, None, TraceHidden(no_la, np.arange(2)), 4, 1)
    with pytest.raises(ValueError, match="no weights"):
        fit_predictor("learned-gate", None, None).predict(0, None, x[0], 4, 1)


def test_learned_gate_lookahead_reads_the_previous_token():
    """A routing that depends on what the previous token did at the target layer (attention's
    part, invisible from layer l's input): the fit with context learns it, the fit without cannot,
    and at runtime the context comes from the predictor's own memory of the previous call."""
    g = torch.Generator().manual_seed(0)
    S, N, H, E = 20, 4000, 16, 8
    xs = torch.randn(2, N, H, generator=g)
    proj = torch.randn(H, E, generator=g)
    ids = torch.stack([torch.topk(torch.randn(N, E, generator=g), 2).indices,  # layer 0: noise
                       torch.topk(previous_token(xs[1] @ proj, S), 2).indices])  # layer 1: t-1's x at layer 1
    gates, ones = [torch.randn(E, H, generator=g) for _ in range(2)], [torch.ones(H)] * 2
    kw = dict(depth=1, epochs=60, lr=1e-2, seed=0)
    with_ctx = LearnedGatePredictor.fit(xs[:, :3000], ids[:, :3000], gates, ones, seq_len=S, **kw)
    without = LearnedGatePredictor.fit(xs[:, :3000], ids[:, :3000], gates, ones, **kw)

    def recall(pred):
        hit = 0
        for n in range(3000, 3200):  # held-out tokens decoded one at a time: layer 0, then layer 1
            if n % S == 0:
                pred._last.clear()
            want = set(pred.predict(0, ids[0, n:n + 1], xs[0, n:n + 1], 2, 1)[1])
            hit += len(want & set(ids[1, n].tolist()))
            pred.predict(1, ids[1, n:n + 1], xs[1, n:n + 1], 2, 1)
        return hit / 400

    assert recall(with_ctx) > 0.8 > 0.5 > recall(without)
    with pytest.raises(ValueError, match="whole windows"):
        LearnedGatePredictor.fit(xs[:, :3001], ids[:, :3001], gates, ones, seq_len=S, depth=1, epochs=0)


def test_learned_gate_lookahead_predicts_across_the_step_boundary():
    """The next token's layer 0 routes by a direction of this token's last-layer input: a wrap fit
    learns it (decoding token by token, the last layer's call names the next token's layer-0
    experts); a fit without the step boundary names nothing for layer 0, and says why if asked."""
    g = torch.Generator().manual_seed(1)
    S, N, H, E = 20, 4000, 16, 8
    xs = torch.randn(2, N, H, generator=g)
    proj = torch.randn(H, E, generator=g)
    nxt = torch.topk(xs[1] @ proj, 2).indices  # what token n's layer-1 input says about token n+1's layer 0
    first = torch.topk(torch.randn(N, E, generator=g), 2).indices
    layer0 = torch.where((torch.arange(N) % S == 0)[:, None], first, nxt.roll(1, 0))  # a window starts fresh
    ids = torch.stack([layer0, torch.topk(torch.randn(N, E, generator=g), 2).indices])
    gates, ones = [torch.randn(E, H, generator=g) for _ in range(2)], [torch.ones(H)] * 2
    kw = dict(depth=1, epochs=60, lr=1e-2, seed=0)
    wrap = LearnedGatePredictor.fit(xs[:, :3000], ids[:, :3000], gates, ones, seq_len=S, **kw)
    assert wrap.wraps
    hit = total = 0
    for n in range(3000, 3200):  # held-out tokens decoded one at a time: layer 0, then layer 1
        if n % S == 0:
            wrap._last.clear()
        wrap.predict(0, ids[0, n:n + 1], xs[0, n:n + 1], 2, 1)
        want = wrap.predict(1, ids[1, n:n + 1], xs[1, n:n + 1], 2, 1)[0]
        if (n + 1) % S:
            hit += len(set(want) & set(ids[0, n + 1].tolist()))
            total += 2
    assert hit / total > 0.8
    without = LearnedGatePredictor.fit(xs[:, :3000], ids[:, :3000], gates, ones, **kw)
    assert not without.wraps and without.predict(1, ids[1, :1], xs[1, :1], 2, 1) == {}
    with pytest.raises(ValueError, match="without the step boundary"):
        without.logits(1, 1, xs[1, :1])
    # built from the tensors alone (no meta), the wrap is said explicitly; it needs the context tensors
    t = [getattr(wrap, n) for n in LearnedGatePredictor.TENSORS]
    rebuilt = LearnedGatePredictor(*t, top_k=2, wrap=True)
    c = torch.randn(3, wrap.P.shape[-1], generator=g)
    assert rebuilt.wraps and torch.equal(rebuilt.logits(1, 1, xs[1, :3], c), wrap.logits(1, 1, xs[1, :3], c))
    with pytest.raises(ValueError, match="without the step boundary"):
        LearnedGatePredictor(*t, top_k=2).logits(1, 1, xs[1, :3], c)
    with pytest.raises(ValueError, match="wrap=True needs the context tensors"):
        LearnedGatePredictor(*[getattr(without, n) for n in LearnedGatePredictor.TENSORS], top_k=2, wrap=True)


# ---------------------------------------------------------------------------------- policies

def _min_misses(requests, slots):
    """Brute force: fewest misses serving single-expert requests with `slots` slots (demand paging)."""
    best = {frozenset(): 0}
    for r in requests:
        nxt = {}
        for cache, m in best.items():
            if r in cache:
                options = [(cache, m)]
            elif len(cache) < slots:
                options = [(cache | {r}, m + 1)]
            else:
                options = [((cache - {v}) | {r}, m + 1) for v in cache]
            for c, mm in options:
                nxt[c] = min(nxt.get(c, 10**9), mm)
        best = nxt
    return min(best.values())


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_optimal_and_bounds_lru_lfu(seed):
    rng = np.random.default_rng(seed)
    E, slots = 6, 3
    reqs = rng.integers(0, E, 40).tolist()
    ids = np.asarray(reqs)[None, :, None]
    tr = Trace(ids, [0, len(reqs)], meta={"num_experts": E, "mimics": "OLMoE-1B-7B"})
    res = {p: simulate(tr, slots, p) for p in ("lru", "lfu", "belady")}
    assert res["belady"].misses == _min_misses(reqs, slots)
    assert res["belady"].misses <= min(res["lru"].misses, res["lfu"].misses)
    assert all(r.hits + r.misses == len(reqs) for r in res.values())


def test_cyclic_policy_on_a_layer_loop():
    """Every layer needs one fixed expert; 3 slots for 4 layers: LRU evicts exactly the layer that
    comes next (never a hit after warm-up), cyclic evicts the layer that just ran (Belady-like)."""
    L, steps = 4, 50
    ids = np.zeros((L, steps, 1), dtype=np.int64)
    tr = Trace(ids, [0, steps], meta={"num_experts": 2, "mimics": "OLMoE-1B-7B"})
    lru, cyc, opt = (simulate(tr, 3, p) for p in ("lru", "cyclic", "belady"))
    assert lru.hits == 0
    assert cyc.misses <= opt.misses + 2 and cyc.hit_rate > 0.6
    with pytest.raises(ValueError, match="known: lru, lfu, cyclic, next-use"):
        SlotTable(1, 2, 2, "mru")
    nxt = simulate(tr, 3, "next-use")  # its use frequencies warm up over the first calls
    assert nxt.misses <= opt.misses + 6 and nxt.hit_rate > 0.6


def test_next_use_policy_keeps_popular_experts_over_rare_ones():
    """Layers 0 and 1 always use expert 0; layers 2 and 3 rotate through four experts. With 3 slots
    the best is to keep the two popular experts resident and miss on the rotating layers: next-use
    does what Belady does; the cyclic policy, which evicts from the layer that just ran, loses a
    third of the popular experts' hits."""
    L, steps = 4, 60
    ids = np.zeros((L, steps, 1), dtype=np.int64)
    ids[2:, :, 0] = np.arange(steps) % 4
    tr = Trace(ids, [0, steps], meta={"num_experts": 4, "mimics": "OLMoE-1B-7B"})
    nxt, cyc, opt = (simulate(tr, 3, p) for p in ("next-use", "cyclic", "belady"))
    assert nxt.hits == opt.hits and min(nxt.layer_hit_rate[:2]) > 0.95
    assert cyc.hits < 0.7 * opt.hits


def test_next_use_policy_matches_its_formula():
    """Against a plain-loop reference: after random calls, fills and touches (of this layer's
    experts, then of other layers' as a prefetch does, interleaved with fills), every victim is the
    unpinned slot with the largest delta + L (1 - p) / p (delta alone if touched since its layer ran)."""
    rng = np.random.default_rng(3)
    L, E, S, alpha = 5, 6, 12, 0.2
    table = SlotTable(L, E, S, NextUsePolicy(alpha))
    freq, wanted, cur, evictions = [[0.0] * E for _ in range(L)], {}, 0, 0

    def expected(slot):
        lo, ex = table.owner[slot]
        delta = (lo - cur) % L or L
        p = max(freq[lo][ex], 1e-3)
        return delta if wanted.get(slot) else delta + L * (1 - p) / p

    def use(lo, e):  # a hit touches the slot; a miss fills one, evicting the reference's choice
        nonlocal evictions
        s = table.lookup(lo, e)
        if s >= 0:
            table.touch(s)
        elif table._free:
            s, _ = table.allocate(lo, e)
        else:
            best = max((s for s in range(S) if table.pins[s] == 0), key=expected)
            s, evicted = table.allocate(lo, e)
            assert expected(s) == expected(best), (call, s, best)
            evictions += 1
            wanted.pop(s, None)
        wanted[s] = True

    for call in range(80):
        layer = call % L
        need = sorted(rng.choice(E, 2, replace=False).tolist())
        table.policy.on_layer(layer, need)
        if layer != cur:
            wanted = {s: w for s, w in wanted.items() if table.owner[s][0] != cur}
        cur = layer
        freq[layer] = [f * (1 - alpha) + alpha * (e in need) for e, f in enumerate(freq[layer])]
        pins = [s for s in range(S) if rng.random() < 0.2 and table.owner[s] is not None]
        table.pin(pins)
        for e in need:
            use(layer, e)
        for d in (1, 2):  # a prediction for the next layers: resident ones touched, others filled
            for e in rng.choice(E, 2, replace=False).tolist():
                use((layer + d) % L, e)
        table.unpin(pins)
    assert evictions > 40
    with pytest.raises(ValueError, match="alpha"):
        NextUsePolicy(0)


def test_belady_policy_needs_the_future():
    with pytest.raises(ValueError, match="future"):
        SlotTable(2, 4, 4, "belady")
    table = SlotTable(1, 4, 2, BeladyPolicy(lambda l, e: {0: 5, 1: 9, 2: 1}.get(e, np.inf)))
    table.allocate(0, 0)
    table.allocate(0, 1)
    assert table.allocate(0, 2) == (1, (0, 1))  # expert 1 is needed last


def test_acquire_never_evicts_an_expert_the_same_call_needs():
    """LRU's oldest slot holds expert 0; a call needing [2, 0] must evict expert 1, not 0 (and copy 0 again)."""
    from prophet_kernels.memory.residency import ExpertResidency

    res = ExpertResidency(SlotTable(1, 4, 2, "lru"), 10, None, 0, None)
    first, _ = res.acquire(0, [0, 1])
    res.release(first)
    slots, fills = res.acquire(0, [2, 0])
    assert slots == [first[1], first[0]] and fills == [(first[1], 0, 2)]
    assert (res.stats.hits, res.stats.misses, res.stats.evictions) == (1, 3, 1)


# ---------------------------------------------------------------------------------- simulator

@pytest.mark.parametrize("predictor,depth", [(None, 0), ("same", 2), ("oracle", 1), ("gate", 2), ("learned-gate", 2),
                                             ("transition", 1)])
@pytest.mark.parametrize("policy", ["lru", "lfu", "cyclic", "next-use"])
def test_simulator_makes_prophetmoe_decisions(monkeypatch, predictor, depth, policy):
    """Replaying a trace through the simulator and through ProphetMoE (real tensors, CPU) gives
    the same hits, misses, prefetches and evictions: one decision code, not two."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # ProphetMoE's experts on the PyTorch path
    tr = _random_trace(seqs=4, seq_len=12)
    B, L, E, k, slots = 2, tr.num_layers, tr.num_experts, tr.top_k, 9

    def make(pred_name, schedule):
        if pred_name == "oracle":
            return OraclePredictor(schedule)
        return fit_predictor(pred_name, tr, tr) if pred_name else None

    sim = simulate(tr, slots, policy, "oracle" if predictor == "oracle" else make(predictor, None), depth, batch=B,
                   expert_bytes=1000, unlimited_budget=True)
    grid = lanes(tr, B)
    schedule = [sorted(set(tr.topk_ids[l, grid[t]].reshape(-1).tolist())) for t in range(len(grid)) for l in range(L)]
    H, I = 8, 4
    g = torch.Generator().manual_seed(0)
    moe = ProphetMoE.from_weights(torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g),
                                  slots, "cpu", policy, make(predictor, schedule), depth)
    for t in range(len(grid)):
        for l in range(L):
            ids = torch.as_tensor(tr.topk_ids[l, grid[t]], dtype=torch.int32)
            x = torch.randn(B, H, generator=g)
            _forward_replaying(moe, l, x, ids, TraceHidden(tr, grid[t]))
    s = moe.stats
    assert (sim.hits, sim.misses, sim.prefetched, sim.prefetch_used, sim.evictions) == \
        (s.hits, s.misses, s.prefetched, s.prefetch_used, s.evictions)
    assert sim.requests == sum(len(x) for x in schedule)
    assert sim.bytes_h2d == (sim.misses + sim.prefetched) * 1000


def _forward_replaying(moe, layer, x, ids, hidden):
    """ProphetMoE.forward whose predictor sees the trace as its hidden state, as in the simulator."""
    inner = moe.residency.predictor
    if inner is None:
        return moe.forward(layer, x, torch.rand(len(ids), ids.shape[1]), ids)
    orig = inner.predict
    inner.predict = lambda l, t, h, n, d: orig(l, t, hidden, n, d)
    try:
        return moe.forward(layer, x, torch.rand(len(ids), ids.shape[1]), ids)
    finally:
        inner.predict = orig


def test_simulator_oracle_and_timing():
    tr = _random_trace(L=4, E=8, k=2, seqs=8, seq_len=30)
    cap = 0.5
    base = simulate(tr, cap, "lru")
    oracle = simulate(tr, cap, "lru", "oracle", 2, unlimited_budget=True, layer_us=1000.0, pcie_gbps=1000.0)
    assert oracle.pred_recall == [1.0, 1.0] and oracle.pred_precision == [1.0, 1.0]
    assert oracle.hit_rate > 0.97 > base.hit_rate  # everything is prefetched in time after warm-up
    assert oracle.stall_s < base.stall_s
    # a copy engine too slow to land anything in a layer: prefetches are late, not free
    slow = simulate(tr, cap, "lru", "oracle", 1, unlimited_budget=True, layer_us=1.0, pcie_gbps=0.001,
                    expert_bytes=10**6)
    assert slow.late_hits > 0 and slow.ready_hit_rate < slow.hit_rate
    # the budget derived from bandwidth x layer time limits prefetching
    tight = simulate(tr, cap, "lru", "oracle", 1, layer_us=1.0, pcie_gbps=1.0, expert_bytes=10**6)
    assert tight.prefetched < oracle.prefetched
    # a fixed budget (the runtime's prefetch_budget) replaces the derived one: at most N per layer call
    calls = oracle.steps * tr.num_layers
    one = simulate(tr, cap, "lru", "oracle", 2, layer_us=1.0, pcie_gbps=1.0, expert_bytes=10**6, prefetch_budget=1)
    assert tight.prefetched < one.prefetched <= calls and one.prefetched < oracle.prefetched
    assert simulate(tr, cap, "lru", "oracle", 2, prefetch_budget=0).prefetched == 0
    with pytest.raises(ValueError, match="prefetch_budget"):
        simulate(tr, cap, "lru", "oracle", 1, unlimited_budget=True, prefetch_budget=1)
    # miss breakdown: without a predictor every miss is unpredicted; the oracle names every layer
    # call but the first (cold start), so its other misses are budget misses
    cold = len(set(tr.topk_ids[0, 0].tolist()))
    assert base.misses_unpredicted == base.misses
    assert oracle.misses_unpredicted == tight.misses_unpredicted == cold < tight.misses
    with pytest.raises(ValueError, match="batch"):
        simulate(tr, cap, batch=10**6)  # more lanes than pieces of 8 tokens
    with pytest.raises(ValueError, match="eviction policy"):
        simulate(tr, cap, "mru")
    with pytest.raises(ValueError, match="smaller than one layer"):
        simulate(tr, 2, batch=2)  # 2 slots < 4 unique experts
    with pytest.raises(ValueError, match="a slot count is a whole number"):
        simulate(tr, 1.5, batch=2)


def test_lanes_interleave_sequences():
    tr = _random_trace(seqs=5, seq_len=3)
    g = lanes(tr, 2)  # lane 0: seqs 0, 2, 4; lane 1: seqs 1, 3 -> 6 steps
    assert g.shape == (6, 2)
    assert g[:, 0].tolist() == [0, 1, 2, 6, 7, 8] and g[:, 1].tolist() == [3, 4, 5, 9, 10, 11]


def test_lanes_above_the_sequences_cut_them_into_pieces():
    """A batch above the trace's sequences (the streaming batches, 64-256): each sequence is cut into
    consecutive pieces of at least 8 tokens; no token is replayed twice in a step or across lanes,
    and token order holds within a lane's piece."""
    tr = _random_trace(seqs=3, seq_len=40)
    g = lanes(tr, 12)  # 4 pieces of 10 per sequence
    assert g.shape == (10, 12) and len(set(g.reshape(-1).tolist())) == 120
    assert all((np.diff(g[:, b]) == 1).all() for b in range(12))
    assert lanes(tr, 15).shape == (8, 15)  # 5 pieces of 8
    with pytest.raises(ValueError, match=r"batch 16 must be in \[1, 15\]"):
        lanes(tr, 16)  # pieces of 6 tokens
    with pytest.raises(ValueError, match="batch 0"):
        lanes(tr, 0)


# ---------------------------------------------------------------------------------- predictors

def test_history_predictors_learn_a_deterministic_chain():
    train, test = _chain_trace(seed=0), _chain_trace(seed=1)
    for pred in (TransitionPredictor.fit(train), LearnedPredictor.fit(train, epochs=30)):
        r = simulate(test, 0.5, "lru", pred, 2, unlimited_budget=True)
        assert min(r.pred_recall) > 0.95, (pred.name, r.pred_recall)
    freq = fit_predictor("frequency", train)
    assert freq.nbytes == 6 * 8 * 4 and fit_predictor("transition", train).nbytes > 0
    assert LearnedPredictor.fit(_chain_trace(L=16, E=64, k=8, N=40), epochs=1).nbytes <= 8 * 2**20


def test_predictor_errors():
    with pytest.raises(ValueError, match="needs data"):
        make_predictor("learned")
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("psychic")
    with pytest.raises(ValueError, match="router and norm weights"):
        GateLookaheadPredictor().predict(0, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4), 4, 1)
    assert isinstance(make_predictor("same"), SameExpertsPredictor)


# ---------------------------------------------------------------------------------- dedup

def test_dedup_against_uniform_and_degenerate_routing():
    rng = np.random.default_rng(0)
    L, E, k, seqs, n = 2, 64, 8, 32, 40
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(seqs * n)]) for _ in range(L)])
    uni = Trace(ids, np.arange(0, seqs * n + 1, n), meta={"num_experts": E})
    for r in dedup_table(uni, (1, 4, 16, 32)):
        assert abs(r["measured"] - r["uniform"]) / r["uniform"] < 0.03
    same = Trace(np.broadcast_to(np.arange(k), ids.shape).copy(), uni.seq_starts, meta={"num_experts": E})
    rows = dedup_table(same, (1, 8, 32))
    assert [r["measured"] for r in rows] == [k, k, k]
    assert "exceeds E=64 from B=" in verdict(dedup_table(uni, (1, 8, 16, 32)))


# ---------------------------------------------------------------------------------- committed traces

COMMITTED = sorted(p.stem for p in DATA.glob("*.npz"))


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_traces_have_provenance(name):
    tr = load_trace(name)
    m = tr.meta
    if m.get("real"):  # real routing of a released model: its source and licence (tests/test_real_routing.py)
        assert {"source", "shape", "num_experts", "tokens"} <= set(m) and m["tokens"] == tr.num_tokens
        return
    assert {"shape", "mimics", "split", "corpus", "training", "commit", "recorded"} <= set(m)
    assert m["corpus"]["sha1"] and m["tokens"] == tr.num_tokens
    t = m["training"]
    assert t["heldout_bits_per_byte"] < t["unigram_bits_per_byte"] - 1.0  # the model learned the text
    assert (tr.num_experts, tr.top_k) in ((8, 2), (64, 8), (128, 8))
    assert "BPE vocabulary" in m["model"] and m["corpus"]["tokenizer"]["vocab"] == 8192  # subword tokens
    assert (tr.lookahead is not None) == (m["split"] == "heldout")


def test_cli_simulate_and_dedup(tmp_path):
    if not COMMITTED:
        pytest.skip("no committed traces")
    run = lambda *a: subprocess.run([sys.executable, "-m", "prophet_kernels.cli", *a], capture_output=True, text=True)
    r = run("simulate", "--trace", "olmoe-heldout", "--predictor", "transition", "--depth", "2", "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    assert "hit rate" in r.stdout and "predictor by depth (1, 2, ...): recall" in r.stdout
    assert "read before eviction" in r.stdout and r.stdout.count("precision") == 1  # each figure named once
    r = run("dedup", "--trace", "mixtral-heldout", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dedup.png").exists() and (tmp_path / "unique_curve_mixtral.json").exists()
    r = run("simulate", "--policy", "mru", "--max-steps", "2")
    assert r.returncode == 2 and "unknown eviction policy" in r.stderr


def test_sweep_table_and_report(tmp_path):
    from prophet_kernels.routing import report as rr

    held, train = _random_trace(seqs=4, seq_len=15, seed=3), _random_trace(seqs=4, seq_len=15, seed=4)
    rows = rr.run_table(held, train, capacities=(0.25, 0.5), predictors=("frequency", "gate", "oracle"), depths=(1, 2),
                        progress=False)
    assert len(rows) == 2 * len(rr.configs(("frequency", "gate", "oracle"), (1, 2)))
    assert all(r["hits"] + r["misses"] == r["requests"] for r in rows)
    text = rr.render_section(rows)
    assert "| LRU |" in text and "| gate d=2 + LRU |" in text and "Best realisable at 50% by what landed in time" in text
    b = rr.best_vs_oracle(rows)
    assert b["oracle"].startswith("oracle") and "oracle" not in b["best"] and "Belady" not in b["best"]
    assert rr.figure_hit_vs_capacity(rows, tmp_path / "h.png", "t").stat().st_size > 0


def test_batch_table():
    from prophet_kernels.routing import report as rr

    held, train = _random_trace(seqs=4, seq_len=15, seed=3), _random_trace(seqs=4, seq_len=15, seed=4)
    rows = rr.batch_rows(held, train, batches=(1, 2), progress=False)
    assert len(rows) == 2 * len(rr.BATCH_CONFIGS) and {r["batch"] for r in rows} == {1, 2}
    text = rr.batch_table(rows)
    assert text.count("\n") == 1 + len(rr.BATCH_CONFIGS) and "| learned-gate d=3 + next-use |" in text and "B=2" in text and "| gate d=1 + device-next-use |" in text


def test_cli_sweeps_take_the_copy_budget(tmp_path):
    """--prefetch-budget / --unlimited-budget / --pcie-gbps reach every row of a sweep (they used to be
    dropped silently), the rows and file names record them, and contradictory options fail in one line."""
    import json

    from prophet_kernels.routing import report as rr

    held, train = _random_trace(seqs=4, seq_len=15, seed=3), _random_trace(seqs=4, seq_len=15, seed=4)
    held.save(tmp_path / "held.npz"), train.save(tmp_path / "train.npz")
    # (the batch sweep's configurations fit nothing on a train trace: --train-trace would be refused)
    run = lambda *a: subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "simulate", "--trace",
                                     str(tmp_path / "held.npz"), "--out", str(tmp_path), *a], capture_output=True, text=True)
    r = run("--batch-sweep", "1,2", "--prefetch-budget", "0", "--pcie-gbps", "20")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "simulate_test_batch_prefetch_budget0_pcie_gbps20.0.jsonl").open()]
    assert len(rows) == 2 * len(rr.BATCH_CONFIGS)
    assert all(x["prefetch_budget"] == 0 and x["pcie_gbps"] == 20.0 for x in rows)
    assert all(x["prefetched"] == 0 for x in rows)  # a budget of 0 experts issues no prefetch at all
    # the same sweep without the budget prefetches (so the option above was applied, not ignored)
    free = rr.batch_rows(held, train, batches=(1, 2), progress=False, pcie_gbps=20.0)
    assert sum(x["prefetched"] for x in free) > 0
    r = run("--batch-sweep", "1", "--layer-us", "100")
    assert r.returncode == 2 and "--layer-us" in r.stderr and "Traceback" not in r.stderr
    r = run("--sweep", "--unlimited-budget", "--prefetch-budget", "2")
    assert r.returncode == 2 and "not both" in r.stderr


def test_train_and_record_cli(tmp_path):
    """A few training steps on a small slice of the real corpus, then `prophet trace record`."""
    pytest.importorskip("transformers")
    from prophet_kernels.routing.traces.corpus import Corpus, load_corpus
    from prophet_kernels.routing.traces.tokenizer import tokenize_corpus
    from prophet_kernels.routing.traces.train import train

    full = load_corpus(max_bytes_per_source=1 << 20)
    small = tokenize_corpus(Corpus(full.train[:200_000], full.heldout[:50_000], full.meta))
    assert small.token_bytes[small.heldout].sum() > 0.95 * 50_000  # tokens stand for the bytes they encode
    log = train("olmoe", tmp_path / "ck", steps=3, batch=2, seq_len=32, progress=False, corpus=small, eval_windows=4)
    assert (tmp_path / "ck" / "model.safetensors").exists() and len(log["curve"]) >= 1
    assert np.isfinite(log["heldout_bits_per_byte"]) and 0 < log["unigram_bits_per_byte"] < 8
    assert {"balance_loss", "z_loss"} <= set(log["curve"][-1])
    out = tmp_path / "t.npz"
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "trace", "record", "--shape", "olmoe",
                        "--checkpoint", str(tmp_path / "ck"), "--seqs", "2", "--seq-len", "16", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tr = load_trace(out)
    assert tr.topk_ids.shape == (16, 32, 8) and tr.lookahead.shape == (3, 16, 32, 16)
    assert "BPE vocabulary 8192" in tr.meta["model"] and tr.meta["training"]["losses"]["balance_coef"] == 0.1
    assert tr.meta["training"]["steps"] == 3 and tr.meta["split"] == "heldout"


def test_router_losses_per_layer_and_per_sequence():
    """The balance loss is taken per layer (transformers' pools the layers' counts), over the step's
    tokens or each sequence's; the z-loss is the mean squared logsumexp."""
    import math

    from prophet_kernels.routing.traces.train import router_losses

    E, k, S = 8, 2, 5
    flat = torch.zeros(2 * S, E)
    lb, z = router_losses([flat], k, S)
    assert lb.item() == pytest.approx(k) and z.item() == pytest.approx(math.log(E) ** 2)
    # sequence 0 always picks experts 0, 1, sequence 1 experts 2, 3 (sharply)
    sharp = torch.full((2 * S, E), -30.0)
    sharp[:S, :2] = 0.0
    sharp[S:, 2:4] = 0.0
    batch, _ = router_losses([sharp], k, S, "batch")
    seq, _ = router_losses([sharp], k, S, "sequence")
    assert batch.item() == pytest.approx(E / 2, rel=1e-4) and seq.item() == pytest.approx(E, rel=1e-4)
    # per layer: layer 0 on experts 0, 1 and layer 1 on experts 2, 3 are each unbalanced, although the
    # pooled counts (transformers' load_balancing_loss_func) would spread over 4 experts
    one = torch.full((S, E), -30.0)
    one[:, :2] = 0.0
    other = torch.full((S, E), -30.0)
    other[:, 2:4] = 0.0
    per_layer, _ = router_losses([one, other], k, S)
    assert per_layer.item() == pytest.approx(E, rel=1e-4)
    with pytest.raises(ValueError, match="balance"):
        router_losses([flat], k, S, "global")
