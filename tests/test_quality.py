"""The quality harness (routing/quality.py): experts quantized as the frontier's rows serve them, and a
model decoding beside buffers whose misses do not wait (the same Replay `prophet simulate` runs)."""

import numpy as np
import pytest
import torch

from prophet_kernels.memory.buffer import slots_for
from prophet_kernels.planner.memory import int4_bytes
from prophet_kernels.routing.quality import (STRATEGIES, decode_bits_per_byte, quantize_experts, quantize_int4,
                                             resident_bits_per_byte)
from prophet_kernels.routing.simulator import make_replay, simulate
from prophet_kernels.routing.traces.recorder import record
from prophet_kernels.routing.traces.train import RoutingShape, evaluate, model_class

L, E, K, V = 3, 8, 2, 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    shape = RoutingShape("t", "OLMoE-1B-7B", "olmoe", L, E, K, 32, 16, 2, False)
    cfg = shape.config(16, V)
    cfg.initializer_range = 0.2  # routing that varies token to token
    model = model_class(shape)(cfg).eval()
    rng = np.random.default_rng(0)
    windows = rng.integers(1, V, size=(8, 12))
    token_bytes = rng.integers(1, 5, size=V)
    return model, windows, token_bytes


def _replay(capacity=0.5, miss="no-wait", policy="lru"):
    return lambda: make_replay(L, E, slots_for(capacity, L, E), policy, None, 0, 10**6, 10.0e9, 50e-6, miss=miss)


def test_quantize_int4_reference():
    torch.manual_seed(1)
    w = torch.randn(3, 5, 70)  # K = 70: two groups of 32 and one of 6
    q = quantize_int4(w)
    x = torch.nn.functional.pad(w, (0, 26)).reshape(3, 5, 3, 32)
    scale = (x.abs().amax(-1, keepdim=True) / 7).to(torch.float16).float()
    err = (torch.nn.functional.pad(q - w, (0, 26)).reshape(3, 5, 3, 32)).abs()
    assert q.shape == w.shape and bool((err <= scale / 2 + 1e-6).all())  # rounding to the nearest step
    assert len(torch.unique(torch.round(torch.nn.functional.pad(q, (0, 26)).reshape(3, 5, 3, 32) / scale))) <= 16
    assert torch.equal(quantize_int4(q), q)  # already on the grid: unchanged
    assert int4_bytes(64) == 32 + 4 and int4_bytes(70) == 35 + 6


def test_resident_dtypes_change_quality_in_order(tiny):
    model, windows, tb = tiny
    ref = evaluate(model, windows, tb)
    got = {}
    for dtype in ("fp32", "bf16", "fp8", "int4"):
        m = type(model)(model.config).eval()
        m.load_state_dict(model.state_dict())
        got[dtype] = resident_bits_per_byte(m, windows, tb, dtype)
    assert got["fp32"] == ref
    assert abs(got["bf16"] - ref) < abs(got["int4"] - ref) and got["int4"] != ref
    with pytest.raises(ValueError, match="expert dtype"):
        quantize_experts(model, "int3")


def test_exact_decoding_equals_prefill(tiny):
    model, windows, tb = tiny
    r = decode_bits_per_byte(model, windows, tb, _replay(), batch=1, groups=4, strategy="exact")
    assert r["bits_per_byte"] == pytest.approx(evaluate(model, windows, tb), rel=1e-5)
    assert r["fallbacks"] > 0 and r["fallbacks"] == r["misses"] + r["late_hits"] and r["stall_s"] == 0


def test_online_replay_equals_the_trace_simulator(tiny):
    """Waiting misses and the exact computation: the harness's replay sees the model's own routing, so
    its counters equal `simulate` over the trace recorded from the same windows, lanes dealt alike."""
    model, windows, tb = tiny
    r = decode_bits_per_byte(model, windows, tb, _replay(miss="wait"), batch=2, groups=1, strategy="exact")
    tr = record(model, windows, lookahead_depth=0, meta={"mimics": "OLMoE-1B-7B"})
    tr = type(tr)(tr.topk_ids[:, np.arange(tr.num_tokens) % windows.shape[1] != windows.shape[1] - 1],
                  np.arange(0, len(windows) * (windows.shape[1] - 1) + 1, windows.shape[1] - 1), meta=tr.meta)
    s = simulate(tr, 0.5, "lru", batch=2, expert_bytes=10**6, pcie_gbps=10.0, layer_us=50.0)
    assert (r["hits"], r["misses"], r["late_hits"]) == (s.hits, s.misses, s.late_hits)
    assert r["stall_s"] == pytest.approx(s.stall_s)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "exact"])
def test_fallback_strategies_change_only_what_did_not_land(tiny, strategy):
    model, windows, tb = tiny
    ref = evaluate(model, windows, tb)
    full = decode_bits_per_byte(model, windows, tb, _replay(capacity=1.0), batch=1, groups=4, strategy=strategy)
    part = decode_bits_per_byte(model, windows, tb, _replay(capacity=0.25), batch=1, groups=4, strategy=strategy)
    assert np.isfinite(part["bits_per_byte"]) and part["fallbacks"] > full["fallbacks"] > 0
    assert part["bits_per_byte"] != pytest.approx(ref, rel=1e-6)  # what it computes for a fallback is not the expert
    with pytest.raises(ValueError, match="strategy"):
        decode_bits_per_byte(model, windows, tb, _replay(), strategy="guess")


def test_decoding_refuses_windows_that_do_not_deal(tiny):
    model, windows, tb = tiny
    with pytest.raises(ValueError, match="do not deal"):
        decode_bits_per_byte(model, windows[:6], tb, _replay(), batch=1, groups=4)
