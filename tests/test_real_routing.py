"""Real routing (the committed FLAME-MoE-290M trace and the CSV reader), routing statistics, sequence
slices of traces, and the simulator's refusal of nonsense (hypothesis over the `prophet simulate`
command line)."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prophet_kernels.routing import simulator
from prophet_kernels.routing.simulator import simulate
from prophet_kernels.routing.stats import distance, routing_stats
from prophet_kernels.routing.traces import Trace, load_trace
from prophet_kernels.routing.traces.real import FLAME_SOURCE, flame_trace, read_routing_csv

SHARED_CSV = (Path(__file__).resolve().parents[2] / "shared" / "data" / "real-routing" / "flame-moe-290m"
              / "flame290m_iter5473_prefill_2048tok_layers2-9_top6.csv")


def _write_csv(path, rows, k=3):
    head = "layer,token_index,token_id," + ",".join(f"e{i}" for i in range(k)) + "," + ",".join(f"s{i}" for i in range(k))
    path.write_text(head + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _csv_rows(L=3, N=10, E=7, k=3, seed=0):
    """Rows of a routing CSV in a shuffled order, layers numbered from 2 (as FLAME's), and the arrays
    they must give."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(N)]) for _ in range(L)])
    scores = np.sort(rng.random((L, N, k)), axis=-1)[..., ::-1].round(6)
    rows = [[l + 2, t, 1000 + t, *ids[l, t], *scores[l, t]] for l in range(L) for t in range(N)]
    rng.shuffle(rows)
    return rows, ids, scores


def test_read_routing_csv_exact(tmp_path):
    rows, ids, scores = _csv_rows()
    tr = read_routing_csv(_write_csv(tmp_path / "r.csv", rows), num_experts=7, window=4)
    assert np.array_equal(tr.topk_ids, ids)  # layers in ascending order, tokens in order, despite the shuffle
    assert np.allclose(tr.topk_weights, scores, atol=1e-6)
    assert tr.seq_starts.tolist() == [0, 4, 8, 10]  # windows of 4, the last one the remainder
    assert tr.meta["source_layers"] == [2, 3, 4] and tr.num_experts == 7 and tr.top_k == 3
    back = Trace.load(tr.save(tmp_path / "r.npz"))
    assert np.array_equal(back.topk_ids, ids) and back.meta["window"] == 4


@pytest.mark.parametrize("mutate, match", [
    (lambda rows: rows[:-1], "expected one per layer and token"),  # a row missing
    (lambda rows: [r if r[1] != 5 else [r[0], 11, *r[2:]] for r in rows], "consecutive"),  # token 5 missing
    (lambda rows: [[*r[:3], 7, *r[4:]] if i == 0 else r for i, r in enumerate(rows)], "outside"),  # id == E
    (lambda rows: [[*r[:3], r[4], *r[4:]] if i == 0 else r for i, r in enumerate(rows)], "twice"),
    (lambda rows: [], "no rows"),
])
def test_read_routing_csv_refuses(tmp_path, mutate, match):
    rows, _, _ = _csv_rows()
    with pytest.raises(ValueError, match=match):
        read_routing_csv(_write_csv(tmp_path / "r.csv", mutate(rows)), num_experts=7)
    (tmp_path / "bad.csv").write_text("layer,token,x\n1,2,3\n")
    with pytest.raises(ValueError, match="expected columns"):
        read_routing_csv(tmp_path / "bad.csv", num_experts=7)
    with pytest.raises(ValueError, match="window"):
        read_routing_csv(_write_csv(tmp_path / "r.csv", rows), num_experts=7, window=0)


def test_committed_flame_trace():
    tr = load_trace("flame-moe-290m")
    assert tr.topk_ids.shape == (8, 2048, 6) and tr.num_experts == 64
    assert tr.meta["source"] == FLAME_SOURCE and "Apache-2.0" in tr.meta["source"]["licence"]
    assert tr.meta["source_layers"] == list(range(2, 10)) and tr.lookahead is None
    # the dataset's published example (its README): layer 2, first token, experts 34 28 21 47 3 12, score 0.0998
    assert tr.topk_ids[0, 0].tolist() == [34, 28, 21, 47, 3, 12] and abs(tr.topk_weights[0, 0, 0] - 0.0998) < 1e-4
    from prophet_kernels.routing.traces import DATA
    assert "FLAME-MoE" in (DATA / "DATA_README.md").read_text()  # the attribution ships beside the data


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="the source CSV is not on this machine")
def test_committed_flame_trace_is_the_csv():
    made, committed = flame_trace(SHARED_CSV), load_trace("flame-moe-290m")
    assert np.array_equal(made.topk_ids, committed.topk_ids)
    assert np.allclose(made.topk_weights, committed.topk_weights, rtol=1e-3, atol=0)  # stored as fp16


def test_flame_statistics_match_the_independent_simulator():
    """The figures measured from outside the project with an independent LRU/Belady simulator
    (../shared/data/real-routing/README.md): top-25% share 31.4%, LRU 21.9 / 49.1 / 78.3%,
    Belady 58.4 / 80.9 / 93.3%, previous-token overlap 10.6% (9.4% random)."""
    s = routing_stats(load_trace("flame-moe-290m"))
    assert round(100 * s["top25_share"], 1) == 31.4
    assert [round(100 * s["lru"][c], 1) for c in (0.5, 0.75)] == [49.1, 78.3] and abs(100 * s["lru"][0.25] - 21.9) < 0.15
    assert [round(100 * s["belady"][c], 1) for c in (0.25, 0.5, 0.75)] == [58.4, 80.9, 93.3]
    assert abs(s["prev_overlap"] - 0.106) < 0.002 and s["prev_overlap_random"] == 6 / 64
    assert 0.99 < s["entropy"] <= 1.0


def test_routing_stats_on_known_routing():
    rng = np.random.default_rng(0)
    L, E, k, N = 3, 16, 2, 4000
    uni = Trace(np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(N)]) for _ in range(L)]),
                np.arange(0, N + 1, 100), meta={"num_experts": E})
    s = routing_stats(uni, capacities=(0.5,))
    assert abs(s["top25_share"] - 0.25) < 0.02 and abs(s["prev_overlap"] - k / E) < 0.02 and s["entropy"] > 0.99
    assert abs(s["lru"][0.5] - 0.5) < 0.05 and s["belady"][0.5] > s["lru"][0.5]
    # every token repeats its sequence's first routing: overlap 1, only the 2 experts of each layer used
    same = Trace(np.broadcast_to(uni.topk_ids[:, :1], uni.topk_ids.shape).copy(), uni.seq_starts, meta={"num_experts": E})
    s2 = routing_stats(same, capacities=(0.5,))
    assert s2["prev_overlap"] == 1.0 and s2["top25_share"] == 1.0 and s2["lru"][0.5] > 0.99
    d = distance(s2, s)
    assert d["max"] == max(abs(v) for k_, v in d.items() if k_ != "max") and d["top25_share"] == pytest.approx(100 * (1 - s["top25_share"]))


def test_sequence_slices():
    tr = load_trace("flame-moe-290m")
    a, b = load_trace("flame-moe-290m[:16]"), load_trace("flame-moe-290m[16:]")
    assert a.num_seqs == b.num_seqs == 16 and a.num_tokens + b.num_tokens == tr.num_tokens
    assert np.array_equal(np.concatenate([a.topk_ids, b.topk_ids], 1), tr.topk_ids)
    assert b.meta["sequences"] == [16, 32] and b.seq_starts[0] == 0
    assert not (a.fingerprints() & b.fingerprints()) and load_trace("flame-moe-290m[10:20]").fingerprints() & a.fingerprints()
    with pytest.raises(ValueError, match="selects no"):
        load_trace("flame-moe-290m[5:5]")
    with pytest.raises(ValueError, match="no trace named"):
        load_trace("no-such[1:2]")


# ------------------------------------------------------------------ landed in time: one definition


def test_landed_in_time_one_definition_for_host_and_device(monkeypatch):
    """Host and device rows count a hit as landed in time by the same function (its copy done when the
    layer call began); with a slow copy engine both modes report late hits (device rows used to book
    every late prefetch as a stall and report landed = hit), with an instant one neither does."""
    from prophet_kernels.memory.predictors import SameExpertsPredictor

    tr = load_trace("flame-moe-290m")
    calls = {"n": 0}
    real = simulator.late_hits

    def counted(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(simulator, "late_hits", counted)
    for policy in ("next-use", "device-next-use"):
        calls["n"] = 0
        slow = simulate(tr, 0.5, policy, SameExpertsPredictor(), 1, max_steps=300, unlimited_budget=True,
                        expert_bytes=10**6, pcie_gbps=0.05, layer_us=10.0)
        assert calls["n"] == 300 * tr.num_layers  # every layer call of both modes goes through it
        assert slow.late_hits > 0 and slow.ready_hit_rate < slow.hit_rate
        fast = simulate(tr, 0.5, policy, SameExpertsPredictor(), 1, max_steps=300, unlimited_budget=True,
                        expert_bytes=1, pcie_gbps=1e6, layer_us=10.0)
        assert fast.late_hits == 0 and fast.ready_hit_rate == fast.hit_rate


# ------------------------------------------------------------------ nonsense refused (command line)


def _cli(*argv) -> tuple[int, str]:
    from prophet_kernels.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["simulate", *map(str, argv)])
        except SystemExit as e:  # argparse's own refusals (not a number)
            rc = e.code
    return rc, err.getvalue()


NONSENSE = {
    "--capacity": st.one_of(st.floats(min_value=1.0001, max_value=1e6), st.floats(max_value=0.0),
                            st.just(float("nan")), st.just(float("inf")), st.just("half")),
    "--pcie-gbps": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("-inf"))),
    "--layer-us": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf"))),
    "--expert-bytes": st.integers(max_value=0),
    "--max-steps": st.integers(max_value=0),
    "--batch": st.one_of(st.integers(max_value=0), st.integers(min_value=257, max_value=10**6)),  # 32 x 64 tokens: pieces of 8
    "--slots": st.one_of(st.integers(max_value=0), st.integers(min_value=513, max_value=10**6)),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(sorted(NONSENSE)), data=st.data())
def test_simulate_refuses_nonsense_values(flag, data):
    value = data.draw(NONSENSE[flag])
    rc, err = _cli("--trace", "flame-moe-290m", flag, value, "--max-steps", 5) if flag != "--max-steps" else \
        _cli("--trace", "flame-moe-290m", flag, value)
    assert rc == 2, (flag, value, err)
    assert "Traceback" not in err and err.strip().count("\n") <= 1 if "usage" not in err else True
    word = flag.lstrip("-").replace("-", "_")
    assert word in err or flag in err or ("batch" in flag and "batch" in err) or "slots" in err, (flag, value, err)


INERT = [  # options that do nothing in that invocation
    (["--depth", "2"], "--depth does nothing"),
    (["--prefetch-budget", "2"], "--prefetch-budget does nothing"),
    (["--unlimited-budget"], "--unlimited-budget does nothing"),
    (["--predictor", "same", "--train-trace", "olmoe-train"], "--train-trace does nothing"),
    (["--predictor", "oracle", "--train-trace", "olmoe-train"], "--train-trace does nothing"),
    (["--train-trace", "olmoe-train"], "--train-trace does nothing"),
    (["--predictor", "same", "--depth", "8"], "depth=8"),  # depth >= the trace's 8 layers
    (["--predictor", "same", "--depth", "0"], "depth=0"),
    (["--predictor", "gate"], "lookahead ranking"),  # real routing has no hidden states
    (["--predictor", "transition"], "has no train trace"),  # FLAME has no train trace of its own
    (["--predictor", "transition", "--train-trace", "flame-moe-290m"], "shares 32"),  # fitted on itself
    (["--predictor", "transition", "--train-trace", "olmoe-train"], "experts, the replayed"),  # another shape
    (["--quick"], "--quick goes with --sweep"),
    (["--sweep", "--predictor", "same"], "single runs"),
    (["--predictor", "same", "--unlimited-budget", "--prefetch-budget", "1"], "not both"),
    (["--policy", "mru"], "unknown eviction policy"),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(INERT), extra=st.lists(st.sampled_from([["--batch", "2"], ["--max-steps", "3"],
                                                                        ["--capacity", "0.25"]]), max_size=2))
def test_simulate_refuses_inert_and_contradictory_options(case, extra):
    args, match = case
    rc, err = _cli("--trace", "flame-moe-290m", *args, *[x for e in extra for x in e])
    assert rc == 2 and match in err and "Traceback" not in err, (args, extra, err)


def test_simulate_sensible_runs_pass_the_checks():
    """The same command line with sensible values runs (the checks refuse nonsense only)."""
    rc, err = _cli("--trace", "flame-moe-290m", "--capacity", "0.25", "--max-steps", "5", "--pcie-gbps", "20",
                   "--layer-us", "50", "--expert-bytes", "1000000")
    assert rc == 0, err
    rc, err = _cli("--trace", "flame-moe-290m[16:]", "--predictor", "transition", "--train-trace", "flame-moe-290m[:16]",
                   "--depth", "2", "--max-steps", "5", "--slots", "100", "--batch", "2")
    assert rc == 0, err
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "simulate", "--trace", "flame-moe-290m",
                        "--max-steps", "20"], capture_output=True, text=True)
    assert r.returncode == 0 and "OLMoE-1B-7B's expert bytes" in r.stdout, r.stderr


# ------------------------------------------------------------------ a miss that does not wait


def test_no_wait_misses_never_stall_and_fill_ahead():
    tr = load_trace("flame-moe-290m")
    kw = dict(expert_bytes=10**7, pcie_gbps=50.0, layer_us=100.0, max_steps=200)
    wait = simulate(tr, 0.5, "lru", **kw)
    free = simulate(tr, 0.5, "lru", miss="no-wait", **kw)
    assert wait.stall_s > 0 and free.stall_s == 0  # the layer never waits for a copy
    # every expert use that had not landed when its call began is computed another way
    assert free.fallbacks == free.misses + free.late_hits and free.late_hits > 0
    assert free.ready_hit_rate == pytest.approx(1 - free.fallbacks / free.requests)
    # a fallback on the GPU adds its time to the layer; the host CPU's runs beside it
    serial = simulate(tr, 0.5, "lru", miss="no-wait", fallback_s=20e-6, **kw)
    assert serial.extra_s == pytest.approx(serial.fallbacks * 20e-6)
    beside = simulate(tr, 0.5, "lru", miss="no-wait", fallback_s=20e-6, fallback_parallel=True, **kw)
    assert 0 < beside.extra_s < serial.extra_s
    late = simulate(tr, 0.5, "lru", miss="no-wait", fallback_s=20e-6, fallback_parallel=True, fallback_latency_s=30e-6, **kw)
    assert late.extra_s > beside.extra_s  # the activations' round trip to the host
    with pytest.raises(ValueError, match="device policies: wait"):
        simulate(tr, 0.5, "device-lru", miss="no-wait", **kw)


def test_no_wait_fills_the_missed_experts_for_the_next_call():
    """The same experts at every step: the first step computes them all another way, their copies
    land for the next step (a fast copy engine), and from then on every use has landed."""
    L, E, k, N = 3, 8, 2, 12
    ids = np.broadcast_to(np.array([1, 5]), (L, N, k)).copy()
    tr = Trace(ids, np.array([0, N]), meta={"num_experts": E})
    r = simulate(tr, 0.5, "lru", miss="no-wait", expert_bytes=1000, pcie_gbps=100.0, layer_us=10.0)
    assert r.misses == L * k and r.fallbacks == L * k and r.hits == (N - 1) * L * k and r.late_hits == 0
    # with a copy engine too slow for one step, the copies land later: late hits, computed another way
    slow = simulate(tr, 0.5, "lru", miss="no-wait", expert_bytes=10**6, pcie_gbps=0.1, layer_us=10.0)
    assert slow.late_hits > 0 and slow.fallbacks == slow.misses + slow.late_hits


def test_uniform_like_keeps_the_shape_and_routes_at_random():
    from prophet_kernels.routing.stats import uniform_like

    tr = load_trace("flame-moe-290m")
    u = uniform_like(tr)
    assert u.topk_ids.shape == tr.topk_ids.shape and np.array_equal(u.seq_starts, tr.seq_starts)
    assert all(len(set(r)) == tr.top_k for r in u.topk_ids[0, :50])  # k distinct experts per token
    s = routing_stats(u, capacities=(0.5,))
    assert abs(s["prev_overlap"] - tr.top_k / tr.num_experts) < 0.01 and s["entropy"] > 0.99
