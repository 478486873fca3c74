"""miss: stream (issue 43): the fixed schedule (memory.stream), ProphetMoE(miss="stream") against an
independent reference, and the simulator replaying the same schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prophet_kernels import ProphetMoE
from prophet_kernels.kernels.moe import fused_experts_reference
from prophet_kernels.memory.stream import StreamSchedule, min_stream_slots, stream_parts


@settings(max_examples=300, deadline=None)
@given(L=st.integers(1, 12), E=st.integers(1, 16), data=st.data())
def test_schedule_invariants(L, E, data):
    """Any buffer from the smallest that streams to all experts: the slots used fit the buffer; no
    two resident experts share a slot or a ring slot; consecutive layers (cyclically) stream into
    different ring parts; a layer's streamed experts are one contiguous range into contiguous slots;
    more slots never mean fewer resident experts."""
    S = data.draw(st.integers(min_stream_slots(L, E), L * E + 3))
    sch = StreamSchedule(L, E, S)
    assert sch.used_slots <= S and sch.rows.shape == (L, E) and (sch.rows >= 0).all()
    resident = [int(sch.rows[l, e]) for l in range(L) for e in range(sch.resident[l])]
    assert len(set(resident)) == len(resident) and all(s < sch.ring_start for s in resident)
    for l in range(L):
        first, n, slot = sch.streamed(l)
        assert first == sch.resident[l] and n == E - first
        if n:
            assert list(sch.rows[l, first:]) == list(range(slot, slot + n)) and slot >= sch.ring_start
            m = (l + 1) % L
            if m != l and sch.streamed(m)[1]:
                assert sch.part_of(m) != sch.part_of(l)
    assert max(sch.resident) - min(sch.resident) <= 1
    if S > min_stream_slots(L, E):
        assert sum(StreamSchedule(L, E, S - 1).resident) <= sum(sch.resident)
    if S >= L * E:
        assert sch.resident == [E] * L and sch.parts == 0


def test_schedule_refuses_a_buffer_smaller_than_the_ring():
    assert stream_parts(1) == 1 and stream_parts(8) == 2 and stream_parts(7) == 3
    assert min_stream_slots(8, 8) == 16 and min_stream_slots(7, 8) == 24 and min_stream_slots(2, 8) == 16
    with pytest.raises(ValueError, match="streaming needs at least 16 slots .* the buffer has 15"):
        StreamSchedule(8, 8, 15)
    with pytest.raises(ValueError, match="num_slots must be a whole number"):
        StreamSchedule(8, 8, 0)


def _model(g, L, E, H, I):
    return torch.randn(L, E, 2 * I, H, generator=g) * 0.1, torch.randn(L, E, H, I, generator=g) * 0.1


def _call(moe, g, w13, w2, layer, T, E, k, H):
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k, generator=g)
    y = moe(layer, x, w, ids)
    torch.testing.assert_close(y, fused_experts_reference(x, w13[layer], w2[layer], w, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("L, E, slots", [(4, 8, 16), (4, 8, 21), (5, 8, 0), (6, 16, 40), (1, 4, 0), (3, 6, 18)])
def test_stream_layer_equals_the_reference_and_copies_once_per_step(L, E, slots):
    """Fresh random weights and routing, shapes that cross the kernels' tiles (H 96, I 40), the
    unused slots poisoned with NaN: every layer call equals the reference; after a step boundary,
    N steps copy each streamed layer exactly N times (once per step, whatever the tokens)."""
    g = torch.Generator().manual_seed(L * 100 + E + slots)
    H, I, k = 96, 40, 2
    w13, w2 = _model(g, L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", miss="stream")
    sch = moe.schedule
    moe.buffer.blocks[sch.used_slots:].fill_(float("nan"))
    for step in range(3):
        for layer in range(L):
            _call(moe, g, w13, w2, layer, (1, 7, 33)[(step + layer) % 3], E, k, H)
    moe.reset_stats()
    for step in range(4):
        for layer in range(L):
            _call(moe, g, w13, w2, layer, 5, E, k, H)
    for layer, s in enumerate(moe.stats.layers):
        n = E - sch.resident[layer]
        once = sch.part_of(layer) not in [sch.part_of(m) for m in range(L) if m != layer]  # a part of its own
        assert s.streamed == (0 if once else 4 * n) and s.bytes_h2d == s.streamed * moe.store.expert_bytes
        assert s.hits == s.misses == s.stall_s == 0
    assert moe.stats.demand_copies == 0


def test_stream_layer_out_of_order_calls_copy_on_demand():
    """Calls that leave the schedule's order (a profiling run that stops early, a caller's own order)
    are still exact: a layer whose ring part holds another layer's experts copies its own first."""
    g = torch.Generator().manual_seed(3)
    L, E, H, I, k = 6, 8, 64, 32, 2
    w13, w2 = _model(g, L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="stream")
    for layer in (3, 0, 5, 5, 2, 1, 4, 0, 1, 2, 3, 4, 5, 2):
        _call(moe, g, w13, w2, layer, 4, E, k, H)


def test_stream_expert_parallel_and_bf16():
    """Under expert parallelism a rank streams its own experts and other ranks' token-slots add zero;
    bf16 experts (one block per expert: one copy per layer) equal the reference in bf16's tolerance."""
    g = torch.Generator().manual_seed(4)
    L, E, H, I, k, T = 4, 8, 64, 32, 2, 9
    w13, w2 = _model(g, L, E, H, I)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)  # this rank: even experts
    moe = ProphetMoE.from_weights(w13[:, ::2], w2[:, ::2], 0, device="cpu", miss="stream", expert_map=expert_map)
    for layer in range(L):
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        w = torch.rand(T, k, generator=g)
        mine = (ids % 2 == 0)
        want = fused_experts_reference(x, w13[layer], w2[layer], w * mine, ids)
        torch.testing.assert_close(moe(layer, x, w, ids), want, atol=1e-4, rtol=1e-4)
    bf = ProphetMoE.from_weights(w13.bfloat16(), w2.bfloat16(), 0, device="cpu", miss="stream")
    assert bf.store.blocks[0] is not None
    for layer in range(L):
        x = torch.randn(T, H, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        w = torch.rand(T, k, generator=g)
        want = fused_experts_reference(x.float(), w13[layer].bfloat16().float(), w2[layer].bfloat16().float(), w, ids)
        torch.testing.assert_close(bf(layer, x, w, ids).float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="device"), "use mode 'host'"),
    (dict(predictor="same"), "a predictor adds nothing"),
    (dict(num_slots=15), "streaming needs at least 16 slots"),
])
def test_stream_refusals(kwargs, match):
    g = torch.Generator().manual_seed(5)
    w13, w2 = _model(g, 8, 8, 32, 16)
    kwargs = {"num_slots": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        ProphetMoE.from_weights(w13, w2, kwargs.pop("num_slots"), device="cpu", miss="stream", **kwargs)


def test_a_refused_stream_call_leaves_no_trace():
    g = torch.Generator().manual_seed(6)
    L, E, H, I, k = 4, 8, 32, 16, 2
    w13, w2 = _model(g, L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="stream")
    before = (moe.stats.as_dict(), list(moe.schedule.holds), moe.buffer.blocks.clone())
    x, w = torch.randn(3, H), torch.rand(3, k)
    for bad, match in ((torch.zeros(3, k, dtype=torch.float32), "int32 or int64"),
                       (torch.zeros(3, k + 1, dtype=torch.int32), "must be \\[T, k\\]"),
                       (torch.zeros(3, k, dtype=torch.int32), "out of range")):
        with pytest.raises((ValueError, TypeError), match=match):
            moe(L if match == "out of range" else 1, x, w, bad)
    assert moe.stats.as_dict() == before[0] and moe.schedule.holds == before[1] and torch.equal(moe.buffer.blocks, before[2])


def test_an_expert_id_outside_the_model_is_dropped_without_a_host_read():
    """Streaming reads no routing on the host (as device mode): an id outside [0, E) (-1 padding, a
    corrupt id) contributes zero instead of reading another expert's page-table entry."""
    g = torch.Generator().manual_seed(7)
    L, E, H, I, k, T = 4, 8, 32, 16, 2, 5
    w13, w2 = _model(g, L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="stream")
    x, w = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    bad = ids.clone()
    bad[0, 0], bad[2, 1], bad[3, 0] = E, -1, 2**32 + 1
    keep = torch.ones(T, k)
    keep[0, 0] = keep[2, 1] = keep[3, 0] = 0
    torch.testing.assert_close(moe(0, x, w, bad), fused_experts_reference(x, w13[0], w2[0], w * keep, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg, match", [
    ({"miss": "stream", "mode": "device"}, "use mode host"),
    ({"miss": "stream", "predictor": "gate"}, "adds nothing to it"),
])
def test_settings_refusals(cfg, match):
    from integration.settings import ProphetSettings

    with pytest.raises(ValueError, match=match):
        ProphetSettings.resolve({"prophet": cfg})


def test_settings_buffer_zero_and_a_buffer_below_the_ring():
    from integration.settings import ProphetSettings

    ProphetSettings.resolve({"prophet": {"miss": "stream", "buffer": 0}}).check_fits(8, 8, 2, 4096)  # the ring alone
    quarter = ProphetSettings.resolve({"prophet": {"miss": "stream", "buffer": 0.25}})
    quarter.check_fits(8, 8, 2, 4096)  # 16 slots: a ring of two layers' 8 experts, any batch
    # 7 layers: an odd count streams through three parts (24 slots); 25% of 56 experts is 14
    with pytest.raises(ValueError, match=r"buffer=0.25 \(14 slots for 7 layers x 8 experts.*at least 24 slots"):
        quarter.check_fits(7, 8, 2, 4096)


def test_the_simulator_streams_as_the_layer_does():
    """One schedule: the simulator's stream replay and ProphetMoE(miss="stream") fed the same calls
    (in order, and out of order) copy the same layers the same number of times."""
    from prophet_kernels.memory.stream import StreamSchedule
    from prophet_kernels.routing.simulator import StreamReplay

    g = torch.Generator().manual_seed(8)
    L, E, H, I, k = 5, 8, 32, 16, 2
    w13, w2 = _model(g, L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, 29, device="cpu", miss="stream")
    replay = StreamReplay(StreamSchedule(L, E, 29, moe.store.expert_bytes), bw=1e9, layer_s=1e-4)
    order = [l for _ in range(3) for l in range(L)] + [2, 0, 4, 4, 1] + list(range(L))
    for layer in order:
        _call(moe, g, w13, w2, layer, 3, E, k, H)
        replay.call(layer, [])
    got = [(s.streamed, s.bytes_h2d) for s in moe.stats.layers]
    assert got == [(s.streamed, s.bytes_h2d) for s in replay.schedule.stats.layers] and moe.stats.streamed > 0


def test_stream_replay_timing():
    """Copy-bound: a step takes the layers' copies back to back (the first layer's copy, issued a
    step ahead, hidden); compute-bound: the layers' time, the copies hidden; hits are the resident
    experts a call needs."""
    from prophet_kernels.memory.stream import StreamSchedule
    from prophet_kernels.routing.simulator import StreamReplay

    L, E, S = 4, 8, 16  # the ring alone: 8 experts per layer streamed
    for layer_s, copy_s in ((1e-3, 1e-2 / 8), (1e-2, 1e-3 / 8)):
        sch = StreamSchedule(L, E, S, expert_bytes=1000)
        rep = StreamReplay(sch, bw=1000 / copy_s, layer_s=layer_s)
        for step in range(20):
            for layer in range(L):
                rep.call(layer, [0, 5])
        per_step = rep.now / 20
        assert per_step == pytest.approx(max(L * layer_s, L * 8 * copy_s), rel=0.08)
    assert sch.stats.hits == 0 and sch.stats.misses == 2 * L * 20
    sch = StreamSchedule(L, E, 24, expert_bytes=1000)  # 4 resident per layer
    StreamReplay(sch, 1e6, 1e-3).call(0, [0, 3, 5])
    assert (sch.stats.hits, sch.stats.misses) == (2, 1)


def test_prophet_simulate_miss_stream(capsys):
    from prophet_kernels.cli import main

    rc = main(["simulate", "--trace", "mixtral-heldout", "--miss", "stream", "--capacity", "0.5", "--batch", "16",
               "--max-steps", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "the stream schedule, batch 16" in out.out and "copied once per layer per step" in out.out
    assert main(["simulate", "--trace", "mixtral-heldout", "--miss", "stream", "--predictor", "oracle"]) == 2
    assert "takes no --predictor" in capsys.readouterr().err


def test_a_buffer_that_leaves_no_room_for_one_sequence_is_refused_with_the_numbers():
    from integration.vllm_plugin import check_kv_room

    GiB = 2**30
    # 80 GiB device, 0.9 of it for vLLM, 30 GiB held (weights and the buffer): 42 GiB of room
    check_kv_room(30 * GiB, 80 * GiB, 0.9, 131072, 32768, 20 * GiB, 64)  # 4 GiB for one sequence: fits
    with pytest.raises(ValueError, match=r"64 slots, 20.00 GiB\) leaves 0.00 GiB of the 90% of 80.0 GiB.*"
                                         r"max_model_len 32768 tokens needs 4.00 GiB"):
        check_kv_room(73 * GiB, 80 * GiB, 0.9, 131072, 32768, 20 * GiB, 64)


def test_warmup_steps_leave_the_cold_fill_out():
    """simulate(warmup_steps=w) replays w steps first and counts nothing of them: its counts and time
    are those of the steps after (equal to a replay of all of them less the first w, counted alike);
    the stream replay likewise; a warm-up as long as the trace is refused."""
    from prophet_kernels.routing.simulator import simulate
    from prophet_kernels.routing.traces import load_trace

    t = load_trace("mixtral-heldout")
    cold = simulate(t, 0.5, batch=64, layer_us=900.0, pcie_gbps=25.0)
    warm = simulate(t, 0.5, batch=64, layer_us=900.0, pcie_gbps=25.0, warmup_steps=4)
    assert warm.steps == cold.steps - 4 and warm.tokens == warm.steps * 64
    assert warm.hit_rate > cold.hit_rate  # the empty buffer's first steps missed everything
    assert warm.requests == cold.requests - 4 * 32 * 8  # every call needs all 8 experts at batch 64
    s = simulate(t, 0.5, batch=64, layer_us=900.0, pcie_gbps=25.0, miss="stream", warmup_steps=4)
    per_step = sum(8 - r for r in StreamSchedule(32, 8, 128).resident)  # 22 layers with 4 resident, 10 with 3
    assert s.steps == warm.steps and s.bytes_h2d == s.steps * per_step * (s.bytes_h2d // (s.steps * per_step))
    with pytest.raises(ValueError, match=r"warmup_steps=128: a whole number in \[0, 128\)"):
        simulate(t, 0.5, batch=64, warmup_steps=128)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 6), E=st.integers(2, 9), extra=st.integers(0, 20), data=st.data())
def test_stream_layer_any_buffer_and_call_order(L, E, extra, data):
    """Hypothesis over the public API: any model size, any buffer from the ring up, calls in any order
    (the schedule's, repeated layers, skipped ones), any batch: every call equals the reference."""
    g = torch.Generator().manual_seed(L * 1000 + E * 10 + extra)
    H, I, k = 16, 8, min(2, E)
    w13, w2 = _model(g, L, E, H, I)
    slots = min(L * E, min_stream_slots(L, E) + extra)
    moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", miss="stream")
    order = data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=12)) + list(range(L))
    for layer in order:
        _call(moe, g, w13, w2, layer, data.draw(st.integers(1, 9)), E, k, H)
