"""Expert store, paged buffer, prefetcher and ProphetMoE on the CPU: results equal the
all-resident computation exactly in fp32, stats add up, pins hold under adversarial routing."""

import pytest
import torch

from prophet_kernels import fused_experts
from prophet_kernels.memory.buffer import LFUPolicy, LRUPolicy
from prophet_kernels.memory.layer import ProphetMoE
from prophet_kernels.memory.predictors import OraclePredictor
from prophet_kernels.memory.store import HostExpertStore

L, E, H, I, K = 3, 8, 24, 12, 2  # odd-ish sizes; 3 layers so prefetch wraps


@pytest.fixture
def torch_path(monkeypatch):
    """Run the experts on the PyTorch reference path (exact, fast); the Triton path has its own test."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4


def _routing(steps, seed=1, max_t=4):
    """Per forward: (layer, x, weights, ids); T varies 1..max_t, some batches send every token to
    the same pair of experts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        for layer in range(L):
            t = int(torch.randint(1, max_t + 1, (1,), generator=g))
            if (step + layer) % 5 == 0:
                ids = torch.tensor([[1, 6]] * t, dtype=torch.int32)
            else:
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).int()
            out.append((layer, torch.randn(t, H, generator=g), torch.rand(t, K, generator=g), ids))
    return out


def _check_run(moe, w13, w2, routing):
    """Every forward queued first (no synchronisation between layers), then each output against the
    same kernels on all-resident weights: exact on the CPU, within 1e-4 in fp32 on a GPU; the stats
    add up. Returns the stats."""
    ys = [moe.forward(layer, x, w, ids) for layer, x, w, ids in routing]
    w13, w2 = w13.to(moe.device), w2.to(moe.device)
    unique = 0
    for (layer, x, w, ids), y in zip(routing, ys):
        ref = fused_experts(x, w13[layer], w2[layer], w, ids)
        if moe.device.type == "cpu":
            assert torch.equal(y, ref), f"layer {layer} differs"
        else:
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        unique += len(torch.unique(ids))
    s = moe.stats  # waits for the demand copies' timing
    assert not moe.prefetcher._timed
    assert s.hits + s.misses == unique
    assert s.bytes_h2d == (s.misses + s.prefetched) * moe.store.expert_bytes
    assert 0 <= s.prefetch_used <= s.prefetched
    assert all(p == 0 for p in moe.buffer.pins)
    assert all((layer.stall_s > 0) == (layer.misses > 0) for layer in s.layers), "stall only where a layer missed"
    return s


@pytest.mark.parametrize("slots", [K * 4, 11, E * L])  # one layer's worst case, in between, everything
@pytest.mark.parametrize("policy", ["lru", "lfu", "cyclic", "next-use"])
@pytest.mark.parametrize("predictor", [None, "same"])
def test_equals_all_resident_exactly(torch_path, slots, policy, predictor):
    w13, w2 = _weights()
    moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", policy=policy, predictor=predictor)
    _check_run(moe, w13, w2, _routing(steps=6))
    if slots < E * L:
        assert moe.stats.misses > moe.store.num_experts and moe.stats.evictions > 0
    else:
        assert moe.stats.evictions == 0


def test_triton_path_equals_all_resident():
    # Triton kernels (interpreter on the CPU) behind the buffer: same exact equality.
    w13, w2 = _weights(3)
    moe = ProphetMoE.from_weights(w13, w2, 8, device="cpu", predictor="same")
    _check_run(moe, w13, w2, _routing(steps=1, seed=4))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("slots", [E, 12])  # one layer's worst case (T <= 4, k = 2), half the experts
def test_device_run_equals_all_resident(monkeypatch, device, slots):
    """The copy stream, ready/read events and demand timing on the device, with no synchronisation
    between layers: a copy that overwrote a slot a kernel still read, or a kernel that read a slot
    before its copy landed, shows as a wrong output. The reference: the same kernels on all-resident
    weights (exact on the CPU's PyTorch path; fp32 Triton on the GPU, compared within 1e-4)."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    w13, w2 = _weights(7)
    moe = ProphetMoE.from_weights(w13, w2, slots, device=device, policy="next-use", predictor="same",
                                  prefetch_depth=2)
    routing = [(layer, x.to(device), w.to(device), ids.to(device)) for layer, x, w, ids in _routing(steps=12, seed=8)]
    s = _check_run(moe, w13, w2, routing)
    assert s.misses > slots and s.prefetched > 0 and s.evictions > 0


def test_oracle_predictor_has_no_misses_after_warmup(torch_path):
    w13, w2 = _weights()
    routing = _routing(steps=8, max_t=3)
    schedule = [torch.unique(ids).tolist() for _, _, _, ids in routing]
    # room for this layer's and the next layer's unique experts
    moe = ProphetMoE.from_weights(w13, w2, 2 * K * 3, device="cpu", predictor=OraclePredictor(schedule))
    _check_run(moe, w13, w2, routing)
    assert moe.stats.misses == len(schedule[0])  # only the very first layer misses (warm-up)
    assert moe.stats.layers[0].misses == len(schedule[0])
    assert moe.stats.prefetch_used > 0 and moe.stats.hit_rate > 0.9


def test_pin_rule_under_adversarial_routing(torch_path):
    # Each layer needs exactly the experts the previous layer did not use, and the predictor keeps
    # predicting the wrong ones, so every prefetch evicts. The buffer holds one layer's worth.
    w13, w2 = _weights(5)
    t = 2
    routing = []
    for step in range(4):
        for layer in range(L):
            base = 0 if (step * L + layer) % 2 == 0 else 4
            ids = torch.tensor([[base, base + 1], [base + 2, base + 3]], dtype=torch.int32)
            routing.append((layer, torch.randn(t, H), torch.rand(t, K), ids))
    moe = ProphetMoE.from_weights(w13, w2, 6, device="cpu", predictor="same", prefetch_depth=2)
    copy = moe.prefetcher.copy

    def guarded_copy(slot, layer, expert, label="prefetch"):
        assert slot not in moe.current_slots, f"copy into slot {slot} while the layer reads it"
        copy(slot, layer, expert, label)

    moe.prefetcher.copy = guarded_copy
    _check_run(moe, w13, w2, routing)
    assert moe.stats.evictions > 0 and moe.stats.prefetched > 0


def test_prefetch_budget(torch_path):
    w13, w2 = _weights()
    eb = 3 * H * I * 4
    moe = ProphetMoE.from_weights(w13, w2, E * L, device="cpu", predictor="same", prefetch_budget_bytes=eb)
    routing = _routing(steps=2)
    _check_run(moe, w13, w2, routing)
    assert 0 < moe.stats.prefetched <= len(routing)


def test_page_table_rows_follow_the_host_table(monkeypatch):
    """upload_row copies a row only when it changed (fills and evictions of that layer), and the
    device row then equals the host table, across random churn with a small buffer."""
    from prophet_kernels.memory.buffer import PagedExpertBuffer

    buf = PagedExpertBuffer(L, E, H, I, num_slots=5, dtype=torch.float32, device="cpu")
    copies = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(1), real(self, src, *a, **k))[1])
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        layer, expert = int(torch.randint(0, L, (), generator=g)), int(torch.randint(0, E, (), generator=g))
        if buf.lookup(layer, expert) < 0:
            buf.allocate(layer, expert)  # may evict another layer's expert: that row changes too
        for l in range(L):
            before = len(copies)
            row = buf.upload_row(l)
            assert row.tolist() == [buf.lookup(l, e) for e in range(E)]
            assert len(copies) - before <= 1
            again = len(copies)
            buf.upload_row(l)
            assert len(copies) == again  # unchanged row: no copy
    assert len(copies) > 0 and buf.page_table.tolist() == [[buf.lookup(l, e) for e in range(E)] for l in range(L)]


def test_policies():
    lru, lfu = LRUPolicy(), LFUPolicy()
    for p in (lru, lfu):
        for s in range(3):
            p.insert(s)
    lru.touch(0)
    assert lru.victim({0, 1, 2}) == 1
    lfu.touch(0), lfu.touch(0), lfu.touch(2)
    assert lfu.victim({0, 1, 2}) == 1 and lfu.victim({0, 2}) == 2


def test_bad_configuration_errors(torch_path):
    w13, w2 = _weights()
    with pytest.raises(ValueError, match="need at least 8 slots"):
        ProphetMoE.from_weights(w13, w2, 7, device="cpu", top_k=2, max_batch_tokens=16)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        ProphetMoE.from_weights(w13, w2, 8, device="cpu", policy="fifo")
    with pytest.raises(ValueError, match="unknown predictor 'psychic'"):
        ProphetMoE.from_weights(w13, w2, 8, device="cpu", predictor="psychic")
    with pytest.raises(ValueError, match="prefetch_depth"):
        ProphetMoE.from_weights(w13, w2, 8, device="cpu", prefetch_depth=-1)
    with pytest.raises(ValueError, match=r"w13 must be \[L, E, 2I, H\]"):
        ProphetMoE.from_weights(w13[0], w2, 8, device="cpu")
    with pytest.raises(ValueError, match="do not match"):
        ProphetMoE.from_weights(w13, w2[:, :, :, :-1], 8, device="cpu")
    moe = ProphetMoE.from_weights(w13, w2, 4, device="cpu")
    x, w = torch.randn(3, H), torch.rand(3, K)
    with pytest.raises(ValueError, match=r"layer 3 out of range \[0, 3\)"):
        moe.forward(3, x, w, torch.zeros(3, K, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        moe.forward(0, x, w, torch.tensor([[0, 8]] * 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"outside \[0, 8\) in layer 1: -1"):
        moe.forward(1, x, w, torch.tensor([[0, 1], [-1, 2], [3, 1]]))
    with pytest.raises(ValueError, match="needs 6 unique experts but the buffer has 4 slots"):
        moe.forward(0, x, w, torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32))
    assert moe.stats.hits + moe.stats.misses == 0  # refused before touching anything
    assert moe.forward(0, x[:0], w[:0], torch.zeros(0, K, dtype=torch.int32)).shape == (0, H)


def test_one_block_layout_one_copy_per_expert(torch_path, monkeypatch):
    """Builders lay each expert out as one block (w13 then w2), the buffer's slots likewise, and the
    prefetcher moves an expert with one copy; a store given tensors in another layout still gives
    the exact result, at two copies per expert."""
    from prophet_kernels.memory.store import expert_block

    w13, w2 = _weights(9)
    moe = ProphetMoE.from_weights(w13, w2, 11, device="cpu", policy="next-use", predictor="same")
    assert all(b is not None for b in moe.store.blocks) and moe.buffer.blocks is not None
    assert moe.store.blocks[1][5].numel() * 4 == moe.store.expert_bytes
    assert torch.equal(moe.store.blocks[1][5][:2 * I * H].view(2 * I, H), w13[1, 5])
    assert torch.equal(moe.store.blocks[1][5][2 * I * H:].view(H, I), w2[1, 5])
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(1) or real_copy(self, src, *a, **k))
    _check_run(moe, w13, w2, _routing(steps=4, seed=5))
    s = moe.stats
    assert len(copies) >= s.misses + s.prefetched > 0
    n_one_block = len(copies)

    separate = HostExpertStore([w13[l].clone() for l in range(L)], [w2[l].clone() for l in range(L)])
    assert separate.blocks == [None] * L and expert_block(w13[0], w2[0]) is None
    moe2 = ProphetMoE(separate, 11, device="cpu", policy="next-use", predictor="same")
    copies.clear()
    _check_run(moe2, w13, w2, _routing(steps=4, seed=5))
    assert moe2.stats.misses + moe2.stats.prefetched == s.misses + s.prefetched  # same decisions
    assert len(copies) - n_one_block == s.misses + s.prefetched  # one more copy per expert


def test_pinned_store_registers_exact_sizes(monkeypatch):
    """Pinned stores register each layer's block with CUDA at its exact size (PyTorch's pinned
    allocator would round it up to a power of two) and unregister it once no tensor uses the memory
    (views included). CUDA's registration calls are recorded by a stand-in here; a GPU test pins for real."""
    import gc

    calls = []

    class Cudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    w13, w2 = _weights(3)
    store = HostExpertStore.from_tensors(w13, w2, pin=True)
    layer_bytes = E * 3 * I * H * 4
    assert layer_bytes & (layer_bytes - 1)  # not a power of two: rounding would show
    assert calls == [("register", store.w13[l].data_ptr(), layer_bytes) for l in range(L)]
    assert all(torch.equal(store.w13[l], w13[l]) and torch.equal(store.w2[l], w2[l]) for l in range(L))
    ptr, view = store.w13[0].data_ptr(), store.w2[0][1:3]  # a view that outlives the store
    del store
    gc.collect()
    assert ("unregister", ptr) not in calls and len([c for c in calls if c[0] == "unregister"]) == L - 1
    del view
    gc.collect()
    assert calls[-1] == ("unregister", ptr)

    class Failing(Cudart):
        def cudaHostRegister(self, ptr, size, flags):
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Failing())
    with pytest.raises(RuntimeError, match=r"page-locking [\d.]+ MiB of host memory for experts failed"):
        HostExpertStore.from_tensors(w13, w2, pin=True)


def test_store_builders(tmp_path):
    from safetensors.torch import save_file

    w13, w2 = _weights(7)
    store = HostExpertStore.from_tensors(w13, w2, pin=False)
    assert (store.num_layers, store.num_experts, store.hidden, store.intermediate) == (L, E, H, I)
    assert store.expert_bytes == 3 * H * I * 4

    released = []
    s2 = HostExpertStore.from_parameters(zip(w13, w2), pin=False, release=released.append)
    assert released == list(range(L)) and torch.equal(s2.w2[1], w2[1]) and s2.blocks[1] is not None

    class Experts(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.gate_up_proj, self.down_proj = torch.nn.Parameter(a), torch.nn.Parameter(b)

    model = torch.nn.Sequential(*[Experts(w13[l], w2[l]) for l in range(L)])
    assert torch.equal(HostExpertStore.from_module(model, pin=False).w13[2], w13[2])
    with pytest.raises(ValueError, match="no submodule"):
        HostExpertStore.from_module(torch.nn.Linear(2, 2))

    # HF per-expert checkpoints, OLMoE naming in one file and Mixtral naming in two shards.
    olmoe, mixtral_a, mixtral_b = {}, {}, {}
    for l in range(L):
        for e in range(E):
            p = f"model.layers.{l}.mlp.experts.{e}."
            olmoe[p + "gate_proj.weight"], olmoe[p + "up_proj.weight"] = w13[l, e, :I].clone(), w13[l, e, I:].clone()
            olmoe[p + "down_proj.weight"] = w2[l, e].clone()
            q = f"model.layers.{l}.block_sparse_moe.experts.{e}."
            shard = mixtral_a if l < 2 else mixtral_b
            shard[q + "w1.weight"], shard[q + "w3.weight"] = w13[l, e, :I].clone(), w13[l, e, I:].clone()
            shard[q + "w2.weight"] = w2[l, e].clone()
    olmoe["model.embed_tokens.weight"] = torch.randn(5, H)
    save_file(olmoe, tmp_path / "olmoe.safetensors")
    save_file(mixtral_a, tmp_path / "m-1.safetensors")
    save_file(mixtral_b, tmp_path / "m-2.safetensors")
    for paths in (tmp_path / "olmoe.safetensors", [tmp_path / "m-1.safetensors", tmp_path / "m-2.safetensors"]):
        s = HostExpertStore.from_safetensors(paths, pin=False, progress=False)
        assert all(torch.equal(s.w13[l], w13[l]) and torch.equal(s.w2[l], w2[l]) for l in range(L))
        assert all(b is not None for b in s.blocks)
    del olmoe["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(olmoe, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="layer 1: checkpoint lacks expert tensors"):
        HostExpertStore.from_safetensors(tmp_path / "broken.safetensors", pin=False, progress=False)


def test_bench_prefetch_parts_run_on_the_cpu(torch_path, tmp_path):
    """The decode (c) and host-time (d) parts of bench/bench_prefetch.py run end to end on tiny
    shapes and write their rows, so a lent GPU's minutes are not spent on a broken script."""
    import json

    from bench import bench_prefetch

    bench_prefetch.main(["--small", "--only", "host", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "bench_prefetch_cpu.jsonl").open()]
    assert [r["config"] for r in rows][:2] == ["resident, id check", "resident, no check"] and len(rows) == 5
    assert all(r["us_per_layer_call"] > 0 and r["top_own_us_per_layer_call"] and r["device"] for r in rows)
    bench_prefetch.main(["--small", "--only", "host", "--stub-experts", "--out", str(tmp_path)])
    stubbed = [json.loads(x) for x in (tmp_path / "bench_prefetch_cpu.jsonl").open()][5:]
    assert len(stubbed) == 3 and all(r["experts_stubbed"] and r["config"].startswith("prophet") for r in stubbed)
    import prophet_kernels.memory.layer
    from prophet_kernels.kernels.moe import fused_experts_paged
    assert prophet_kernels.memory.layer.fused_experts_paged is fused_experts_paged  # the stub was taken out again
    bench_prefetch.main(["--small", "--only", "decode", "--budget-experts", "1", "--out", str(tmp_path)])
    rows = [json.loads(x) for x in (tmp_path / "bench_prefetch_cpu.jsonl").open()][8:]
    assert rows and all(r["bench"] == "decode_step" and r["budget_experts"] == 1 and 0 <= r["hit_rate"] <= 1
                        for r in rows)
    n = len(rows) + 8
    bench_prefetch.main(["--small", "--only", "device", "--out", str(tmp_path)])  # (e), eager off CUDA
    rows = [json.loads(x) for x in (tmp_path / "bench_prefetch_cpu.jsonl").open()][n:]
    assert [(r["bench"], r["buffer_frac"], r["fill"]) for r in rows] == [
        ("device_step", 1.0, "copy"), ("device_step", 0.5, "copy"), ("device_step", 0.5, "read-through")]
    assert rows[0]["misses_per_step"] == 0 and rows[1]["misses_per_step"] > 0  # 100%: preloaded
    assert rows[1]["misses_per_step"] == rows[2]["misses_per_step"]  # the same decisions, either fill


def test_bench_read_through_layer_runs_under_the_interpreter(monkeypatch):
    """(e)'s read-through comparison (GPU only in the bench) on tiny shapes under the interpreter, with
    wall-clock timing for CUDA events: its checks (slots filled, output unchanged) pass."""
    import time

    from bench import bench_prefetch
    from prophet_kernels.memory.store import expert_block, expert_tensors

    def wall(fn, repeats, stream=None):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    monkeypatch.setattr(bench_prefetch, "_cuda_time", wall)
    monkeypatch.setenv("PROPHET_MOE_CONFIG", '{"gemv": true, "block_m": 16, "gate_up": {"BN": 16, "BK": 32}, '
                                             '"down": {"BN": 32, "BK": 16}}')
    E, H, I = 8, 32, 16
    src = expert_block(*expert_tensors(E, H, I, torch.float32))
    src.copy_(torch.randn(src.shape))
    dst = torch.randn((16, src.shape[1]))
    rows = bench_prefetch._read_through_layer(torch.device("cpu"), 1, src, dst, E, H, I)
    assert [r["missed"] for r in rows] == [1, 8] and all(r["read_through_GBps"] > 0 for r in rows)


@pytest.mark.parametrize("T,k,E_", [(1, 8, 64), (5, 2, 8), (128, 8, 64), (700, 2, 8), (4096, 8, 64)])
def test_unique_experts_both_paths(T, k, E_):
    """Decode-sized batches (a Python set) and larger ones (torch.unique on the host copy) give the
    sorted unique ids, as torch.unique does on the original tensor."""
    from prophet_kernels.memory.layer import unique_experts

    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, E_, (T, k), generator=g, dtype=torch.int32)
    assert unique_experts(ids) == torch.unique(ids).tolist()
    assert unique_experts(ids.long()) == torch.unique(ids).tolist()


@pytest.mark.parametrize("mode, predictor", [("host", None), ("device", None), ("host", "gate"), ("device", "gate"),
                                             ("host", "same")])
def test_expert_parallel_ranks_add_up_to_all_resident(mode, predictor, monkeypatch):
    """Issue 29, the EP path in the layer (vLLM's expert_map convention): two ranks, each with a store
    of its own experts (interleaved, as a round-robin placement would put them) and a buffer smaller
    than them, fed the same global routing; each rank's output counts only its experts, and the two
    add up to the all-resident output (fp32, to rounding), over steps with misses and evictions.
    With a predictor (the gate lookahead over all experts' routers, or same), each rank prefetches
    the part of the global answer it holds, and uses some of it. Refusals: a malformed map, a map
    that misses a local expert."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path: exactness of the bookkeeping
    from prophet_kernels import fused_experts_reference
    from prophet_kernels.memory.predictors import GateLookaheadPredictor

    g = torch.Generator().manual_seed(29)
    L, E, H, I, K, T = 3, 8, 16, 8, 2, 3
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4
    routers = [torch.randn(E, H, generator=g) for _ in range(L)]
    owned = [list(range(0, E, 2)), list(range(1, E, 2))]  # rank r holds experts r, r+2, ...
    ranks = []
    for mine in owned:
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[mine] = torch.arange(len(mine), dtype=torch.int32)
        pred = GateLookaheadPredictor(routers, [torch.ones(H)] * L, K) if predictor == "gate" else predictor
        ranks.append(ProphetMoE.from_weights(w13[:, mine], w2[:, mine], 6, device="cpu", mode=mode, expert_map=emap,
                                             predictor=pred, prefetch_budget_bytes=None))
    unique_total = 0
    for step in range(6):
        for layer in range(L):
            x = torch.randn(T, H, generator=g)
            if predictor == "gate":  # route as the router says, so that the lookahead is worth something
                ids = torch.topk(x @ routers[layer].t(), K, dim=-1).indices
            else:
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
            unique_total += len(set(ids.flatten().tolist()))
            w = torch.rand(T, K, generator=g)
            ys = [moe.forward(layer, x, w, ids) for moe in ranks]
            torch.testing.assert_close(ys[0] + ys[1], fused_experts_reference(x, w13[layer], w2[layer], w, ids),
                                       rtol=1e-5, atol=1e-5)
    for moe in ranks:
        assert moe.stats.misses > 0 and moe.stats.evictions > 0
        if predictor:
            assert moe.stats.prefetched > 0 and moe.stats.prefetch_used > 0
    # each rank counts its own experts only: together, every unique expert of every call once
    assert sum(m.stats.hits + m.stats.misses for m in ranks) == unique_total
    if mode == "host":
        with pytest.raises(ValueError, match=r"topk_ids holds expert ids outside \[0, 8\)"):
            ranks[0].forward(0, torch.randn(1, H), torch.rand(1, K), torch.tensor([[0, 8]]))
    bad = torch.tensor([0, -1, 1, -1, 1, -1, 2, -1])
    with pytest.raises(ValueError, match="must hold each of this rank's 4 experts"):
        ProphetMoE.from_weights(w13[:, :4], w2[:, :4], 5, device="cpu", expert_map=bad)


def test_rank_experts_answers_in_this_ranks_experts():
    """predictors.RankExperts: the global answer of the predictor it wraps, in this rank's store
    indices, others' experts dropped, order kept; on the device the same ranking, -1 where another
    rank's expert stood (residency steps skip -1)."""
    from prophet_kernels.memory.predictors import GateLookaheadPredictor, RankExperts, SameExpertsPredictor

    g = torch.Generator().manual_seed(1)
    L, E, H, K = 3, 8, 16, 2
    gate = GateLookaheadPredictor([torch.randn(E, H, generator=g) for _ in range(L)], [torch.ones(H)] * L, K)
    emap = torch.tensor([-1, 0, -1, 1, 2, -1, -1, 3], dtype=torch.int32)
    local_of = {int(e): int(v) for e, v in enumerate(emap) if v >= 0}
    x, ids = torch.randn(5, H, generator=g), torch.randint(0, E, (5, K), generator=g)
    for inner in (gate, SameExpertsPredictor()):
        wrapped = RankExperts(inner, emap)
        want = {f: [local_of[e] for e in r if e in local_of] for f, r in inner.predict(0, ids, x, L, 2).items()}
        assert wrapped.predict(0, ids, x, L, 2) == want and any(want.values())
        on_device = wrapped.device_predict(0, ids, x, L, 2, 4)
        assert {f: [int(e) for e in r if e >= 0] for f, r in on_device.items()} == want
        for f, r in inner.device_predict(0, ids, x, L, 2, E).items():
            assert [int(emap[e]) if e >= 0 else -1 for e in r.tolist()] == on_device[f].tolist()


def test_prefetch_entry_predicts_the_first_layers_from_the_incoming_hidden_state(monkeypatch):
    """A later pipeline stage's first layers: layer j's router on rmsnorm(residual) x layer j's norm
    weight, j < depth, copied ahead before layer 0 runs (an independent reference of the ranking);
    counted as prefetches of those layers, then read as hits; nothing without the gate predictor, in
    device mode, or for an empty batch; a malformed hidden state refused with nothing changed."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from prophet_kernels.memory.predictors import GateLookaheadPredictor

    g = torch.Generator().manual_seed(41)
    L, E, H, I, K = 3, 8, 16, 8, 2
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4
    routers = [torch.randn(E, H, generator=g) for _ in range(L)]
    norms = [torch.rand(H, generator=g) + 0.5 for _ in range(L)]
    moe = ProphetMoE.from_weights(w13, w2, 8, device="cpu", predictor=GateLookaheadPredictor(routers, norms, K),
                                  prefetch_depth=2, prefetch_budget_bytes=None)
    r = torch.randn(1, H, generator=g) * 3
    x = r / r.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    want = {j: torch.topk((x * norms[j]) @ routers[j].t(), K).indices[0].tolist() for j in range(2)}
    with pytest.raises(ValueError, match=r"hidden state \[T, 16\] expected"):
        moe.prefetch_entry(torch.randn(1, H + 1))
    assert moe.stats.prefetched == 0
    assert moe.prefetch_entry(r) == 2 * K
    assert [moe.stats.layers[j].prefetched for j in range(L)] == [K, K, 0]
    for j in range(2):
        assert sorted(e for e in range(E) if moe.buffer.lookup(j, e) >= 0) == sorted(want[j])
    w = torch.rand(1, K, generator=g)
    moe.forward(0, torch.randn(1, H, generator=g), w, torch.tensor([want[0]]))
    assert moe.stats.layers[0].hits == K and moe.stats.layers[0].misses == 0
    assert moe.prefetch_entry(torch.empty(0, H)) == 0
    plain = ProphetMoE.from_weights(w13, w2, 8, device="cpu", predictor="same")
    assert plain.prefetch_entry(r) == 0 and plain.stats.prefetched == 0
