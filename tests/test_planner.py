"""Capacity planner: parameter counts vs published totals, KV bytes worked by hand, the sweep's
schema, errors, and the seed-vs-corrected section staying in sync with the catalogue."""

import csv
import dataclasses
import re
from pathlib import Path

import pytest

from prophet_kernels.cli import main as cli_main
from prophet_kernels.planner import (
    GPUS,
    MODELS,
    BufferSetting,
    ServingConfig,
    count_params,
    expected_unique_experts,
    expert_bytes,
    get_gpu,
    get_model,
    kv_bytes_per_token,
    plan,
    run_sweep,
    total_params,
    write_csv,
)
from prophet_kernels.planner.memory import seed_unique_experts, state_elems_per_sequence
from prophet_kernels.planner.seed import render as render_seed_report
from prophet_kernels.planner.sweep import CSV_FIELDS, format_table

REPO = Path(__file__).resolve().parents[1]

# Published totals given to one significant figure, which our count exceeds by more than 2%
# (the reason is in each entry's published_source; see also docs/planner.md).
ROUNDED_PUBLISHED = {"Kimi-K2", "JetMoE-8B"}

SEED_MODELS = [
    "Mixtral-8x7B", "Mixtral-8x22B", "DeepSeek-MoE-16B", "DeepSeek-V2", "DeepSeek-V3", "DBRX", "Grok-1",
    "Arctic", "Switch-Base-128", "Switch-Large-128", "Switch-XXL-128", "Jamba-1.5-Large",
    "Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B", "Qwen3-235B-A22B", "OLMoE-1B-7B",
]
EXTRA_MODELS = ["Qwen3-30B-A3B", "Phi-3.5-MoE", "GRIN-MoE", "JetMoE-8B", "DeepSeek-V2-Lite", "Kimi-K2", "GLM-4.5",
                "GLM-4.5-Air", "gpt-oss-120b", "gpt-oss-20b", "Qwen3-Next-80B-A3B", "Llama-4-Scout"]


def test_catalogue_covers_the_seed_and_the_extra_models():
    assert set(SEED_MODELS + EXTRA_MODELS) <= set(MODELS)
    for m in MODELS.values():
        assert m.source.startswith("https://") and m.published_source, m.name
    assert {"V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB", "RTX4090-24GB"} <= set(GPUS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_param_count_within_2_percent_of_published(name):
    m = MODELS[name]
    dev = abs(total_params(m) / m.published_total - 1)
    if name in ROUNDED_PUBLISHED:
        assert dev > 0.02, f"{name} now lands within 2%: drop it from ROUNDED_PUBLISHED"
        assert "rounded" in m.published_source or "significant" in m.published_source
    else:
        assert dev <= 0.02, f"{name}: {total_params(m):,} vs published {m.published_total:,.0f} ({dev:.2%})"


def test_exact_counts_match_transformers_meta_device():
    # transformers 5.x instantiated on the meta device (environment.md): independent of our code.
    olmoe, mixtral = get_model("OLMoE-1B-7B"), get_model("Mixtral-8x7B")
    assert total_params(olmoe) == 6_919_161_856
    assert count_params(olmoe)["routed_experts"] == 6_442_450_944
    assert total_params(mixtral) == 46_702_792_704
    assert count_params(mixtral)["routed_experts"] == 45_097_156_608


def test_issue_bars_olmoe_and_mixtral():
    olmoe, mixtral = get_model("OLMoE-1B-7B"), get_model("Mixtral-8x7B")
    assert round(total_params(olmoe) / 1e9, 2) == 6.92
    assert expert_bytes(olmoe, "bf16") == 12_582_912  # 12.58 MB
    assert kv_bytes_per_token(olmoe, "bf16") == 131_072
    assert round(total_params(mixtral) / 1e9, 1) == 46.7
    assert round(expert_bytes(mixtral, "bf16") / 1e6, 1) == 352.3
    # fp8: half the weight bytes, plus an fp32 scale per output row (Prophet's fp8 expert layout)
    assert expert_bytes(get_model("Mixtral-8x7B"), "fp8") == 352_321_536 // 2 + 4 * (2 * 14336 + 4096)


def test_kv_bytes_worked_by_hand():
    # GQA, Mixtral-8x7B: 32 layers x (K + V) x 8 KV heads x 128 dims x 2 bytes.
    assert kv_bytes_per_token(get_model("Mixtral-8x7B"), "bf16") == 32 * 2 * 8 * 128 * 2
    # MLA, DeepSeek-V3: 61 layers x (512 latent + 64 RoPE key) x 2 bytes, one copy (no K/V pair).
    assert kv_bytes_per_token(get_model("DeepSeek-V3"), "bf16") == 61 * (512 + 64) * 2 == 70_272
    # Hybrid, Jamba-1.5-Large: attention in layers 4, 12, ..., 68 only (9 of 72): 9 x 2 x 8 x 128 x 2.
    jamba = get_model("Jamba-1.5-Large")
    assert kv_bytes_per_token(jamba, "bf16") == 9 * 2 * 8 * 128 * 2 == 36_864
    # ...and its 63 Mamba layers hold a fixed state per sequence: conv (d_conv - 1) + SSM (d_state)
    # per inner channel (expand x H = 16384).
    assert state_elems_per_sequence(jamba) == 63 * 16384 * (3 + 16)
    # fp8 KV halves it; tensor parallel splits GQA heads but replicates the MLA latent.
    assert kv_bytes_per_token(get_model("Mixtral-8x7B"), "fp8") == 65_536
    assert kv_bytes_per_token(get_model("Mixtral-8x7B"), "bf16", tp=2) == 65_536
    assert kv_bytes_per_token(get_model("Mixtral-8x7B"), "bf16", tp=16) == 131_072 // 8  # 1 head per GPU
    assert kv_bytes_per_token(get_model("DeepSeek-V3"), "bf16", tp=8) == 70_272


def test_unique_experts_expectation_vs_seed_law():
    for b in (1, 4, 16, 64, 256):
        u = expected_unique_experts(64, 8, b)
        assert u <= 64
    assert expected_unique_experts(64, 8, 1) == pytest.approx(8)
    assert expected_unique_experts(64, 8, 16) == pytest.approx(64 * (1 - (56 / 64) ** 16))
    assert seed_unique_experts(8, 16) > 64  # the seed's law asks for more experts than exist
    with pytest.raises(ValueError, match="top_k"):
        expected_unique_experts(8, 9, 1)


def test_plan_arithmetic_is_self_consistent():
    m, g = get_model("OLMoE-1B-7B"), get_gpu("H100-80GB")
    r = plan(m, g, 16, BufferSetting("batch"))
    assert r.usable_bytes == int(g.memory_bytes * 0.9)
    assert r.baseline_weight_bytes == total_params(m) * 2
    assert r.baseline_kv_tokens == (r.usable_bytes - r.baseline_weight_bytes - r.workspace_bytes) // 131_072
    assert r.buffer_bytes == r.buffer_slots * r.routed_expert_bytes
    assert r.buffer_slots >= min(64, 8 * 16) and r.buffer_ok
    assert r.prophet_kv_tokens > r.baseline_kv_tokens
    assert r.extension == pytest.approx(r.prophet_kv_tokens / r.baseline_kv_tokens)
    # A buffer of every expert frees nothing (up to the page table's few bytes).
    full = plan(m, g, 16, BufferSetting.parse("100%"))
    assert full.buffer_slots == 64 * 16
    assert abs(full.prophet_kv_bytes - full.baseline_kv_bytes) < 64 * 16 * 4 + 1
    # Mixtral's bf16 weights do not fit an 80 GB GPU; with Prophet they do.
    mx = plan(get_model("Mixtral-8x7B"), get_gpu("A100-80GB"), 1)
    assert not mx.baseline_fits and mx.extension is None and mx.prophet_fits
    # Tensor parallel: per-GPU weights halve.
    tp2 = plan(m, g, 16, BufferSetting("batch"), ServingConfig(tp=2))
    assert tp2.baseline_weight_bytes == r.baseline_weight_bytes // 2


def test_sliding_window_caps_kv_per_sequence():
    import dataclasses

    m = get_model("Mixtral-8x7B")  # v0.1's config has no window; give it Mistral-7B's 4096
    windowed = dataclasses.replace(m, sliding_window=4096)
    full = plan(m, get_gpu("H200-141GB"), 1, context=32768)
    win = plan(windowed, get_gpu("H200-141GB"), 1, context=32768)
    assert win.prophet_kv_tokens == full.prophet_kv_tokens  # same pool of KV memory
    assert win.prophet_max_seqs == full.prophet_kv_bytes // (131_072 * 4096)
    assert full.prophet_max_seqs == full.prophet_kv_bytes // (131_072 * 32768)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'GPT-5'"):
        get_model("GPT-5")
    with pytest.raises(ValueError, match="unknown GPU 'TPUv5'"):
        get_gpu("TPUv5")
    with pytest.raises(ValueError, match="unknown weight dtype 'int3'"):
        ServingConfig(weight_dtype="int3")
    with pytest.raises(ValueError, match="buffer setting"):
        BufferSetting.parse("lots")
    with pytest.raises(ValueError, match="buffer fraction"):
        BufferSetting.parse("150%")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        plan(get_model("OLMoE-1B-7B"), get_gpu("H100-80GB"), 0)
    assert get_model("mistralai/Mixtral-8x7B-v0.1").name == "Mixtral-8x7B"  # HF ids resolve


def test_cli_errors_are_one_line(capsys):
    assert cli_main(["plan", "--model", "NotAModel", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'NotAModel'" in err and "Traceback" not in err


def test_sweep_schema_and_csv(tmp_path):
    rows = run_sweep(["OLMoE-1B-7B", "DeepSeek-V3"], ["H100-80GB", "A100-40GB"], [1, 16], ["batch", "25%"])
    assert len(rows) == 2 * 2 * 2 * 2
    path = write_csv(rows, tmp_path / "plan.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        got = list(reader)
    assert len(got) == len(rows)
    for row in got:  # each row can be checked on its own
        m = get_model(row["model"])
        assert int(row["total_params"]) == total_params(m)
        assert int(row["routed_expert_bytes"]) == expert_bytes(m, row["weight_dtype"])
        assert int(row["kv_bytes_per_token"]) == kv_bytes_per_token(m, row["kv_dtype"], int(row["tp"]))
        kv = int(row["usable_bytes"]) - int(row["baseline_weight_bytes"]) - int(row["workspace_bytes"])
        assert int(row["baseline_kv_tokens"]) == max(0, kv) // int(row["kv_bytes_per_token"])


def test_cli_plan_writes_csv_and_figures(tmp_path, capsys):
    assert cli_main(["plan", "--model", "olmoe", "--gpu", "h100", "--batch", "1,16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OLMoE-1B-7B" in out and "configurations" in out
    with (tmp_path / "plan.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1 * 1 * 2 * 3  # models x GPUs x batches x default buffers
    for name in ("memory_breakdown", "kv_extension_by_model", "extension_vs_batch", "experts_vs_savings"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_unique_curve_from_trace(tmp_path):
    curve = tmp_path / "curve.json"
    curve.write_text('{"1": 8, "16": 30, "64": 48}')
    assert cli_main(["plan", "--model", "olmoe", "--gpu", "h100", "--batch", "16", "--buffer", "batch",
                     "--unique-curve", str(curve), "--out", str(tmp_path), "--no-figures"]) == 0
    with (tmp_path / "plan.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["unique_experts_per_layer"]) == pytest.approx(30.0)
    assert int(row["buffer_slots"]) == max(2 * 30, 64)  # never below one layer's worst case


def test_seed_report_is_in_sync_with_catalogue():
    committed = (REPO / "docs" / "seed_vs_corrected.md").read_text()
    assert committed == render_seed_report(), "regenerate: prophet plan --seed-report docs/seed_vs_corrected.md"


def test_fp8_experts_next_to_bf16():
    """Prophet's fp8 experts (issue 28): bytes per expert are the store's (e4m3 weights, an fp32
    scale per output row, padded to 16), worked by hand for OLMoE-1B-7B and Mixtral-8x7B; at the
    same buffer fraction the buffer holds the same slots in about half the bytes, so at the same
    bytes about twice the slots; the baseline (the weight dtype) is unchanged; rows sit side by side."""
    import dataclasses

    from prophet_kernels.memory.store import fp8_expert_bytes
    from prophet_kernels.planner import run_sweep

    olmoe, mixtral = get_model("OLMoE-1B-7B"), get_model("Mixtral-8x7B")
    assert expert_bytes(olmoe, "fp8") == 3 * 2048 * 1024 + 4 * (2 * 1024 + 2048) == 6_307_840
    assert expert_bytes(mixtral, "fp8") == 3 * 4096 * 14336 + 4 * (2 * 14336 + 4096) == 176_291_840
    for m in MODELS.values():  # the planner's figure is the store's layout, for every gated catalogue model
        if m.moe.gated:
            assert expert_bytes(m, "fp8") == fp8_expert_bytes(m.hidden, m.moe.intermediate), m.name
    cfg = ServingConfig()
    bf16 = plan(olmoe, get_gpu("H100-80GB"), 1, BufferSetting.parse("50%"), cfg)
    fp8 = plan(olmoe, get_gpu("H100-80GB"), 1, BufferSetting.parse("50%"), dataclasses.replace(cfg, expert_dtype="fp8"))
    assert (bf16.expert_dtype, fp8.expert_dtype) == ("bf16", "fp8")
    assert fp8.buffer_slots == bf16.buffer_slots == 512 and fp8.buffer_bytes == 512 * 6_307_840
    assert bf16.buffer_bytes == 512 * 12_582_912 and 1.99 < bf16.buffer_bytes / fp8.buffer_bytes < 2.0
    assert fp8.baseline_kv_tokens == bf16.baseline_kv_tokens
    gained = (bf16.buffer_bytes - fp8.buffer_bytes) / bf16.kv_bytes_per_token  # the bytes fp8 frees, as KV tokens
    assert abs(fp8.prophet_kv_tokens - bf16.prophet_kv_tokens - gained) <= 1
    rows = run_sweep(["OLMoE-1B-7B"], ["H100-80GB"], [1], ["25%", "50%"], cfg, expert_dtypes=("bf16", "fp8"))
    assert [(r.buffer, r.expert_dtype) for r in rows] == [("25%", "bf16"), ("25%", "fp8"), ("50%", "bf16"), ("50%", "fp8")]
    int4 = plan(olmoe, get_gpu("H100-80GB"), 1, BufferSetting.parse("50%"), dataclasses.replace(cfg, expert_dtype="int4"))
    assert int4.buffer_bytes == 512 * expert_bytes(olmoe, "int4") and int4.prophet_kv_tokens > fp8.prophet_kv_tokens


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_rows_per_gpu(tp):
    """Issue 29: the planner's per-GPU figures under tensor parallelism, against a computation from
    the published configs written here: Mixtral-8x22B (hidden 6144, expert I 16384, 8 experts, 56
    layers, 8 KV heads of 128) and DeepSeek-V3 (hidden 7168, expert I 2048, 256 routed experts on 58
    MoE layers of 61, MLA latent 512 + rope 64, which every rank caches whole)."""
    gpu = get_gpu("H100-80GB")
    cases = {
        "Mixtral-8x22B": dict(expert=3 * 6144 * 16384 * 2, experts=8 * 56, kv=2 * 56 * 8 * 128 * 2 // tp),
        "DeepSeek-V3": dict(expert=3 * 7168 * 2048 * 2, experts=256 * 58, kv=61 * (512 + 64) * 2),
    }
    for name, want in cases.items():
        m = get_model(name)
        p = plan(m, gpu, 1, BufferSetting.parse("25%"), ServingConfig(tp=tp))
        slots = -(-want["experts"] // 4)  # 25% of all routed experts, rounded up
        assert p.kv_bytes_per_token == want["kv"], name
        assert p.routed_expert_bytes == want["expert"] and p.buffer_slots == slots
        assert p.buffer_bytes == slots * want["expert"] // tp  # each GPU holds its shard of every slot
        routed = want["experts"] * want["expert"]
        assert p.baseline_weight_bytes == total_params(m) * 2 // tp
        assert p.prophet_weight_bytes == (total_params(m) * 2 - routed) // tp + p.buffer_bytes + want["experts"] * 4
        usable = int(gpu.memory_bytes * 0.9)
        assert p.prophet_kv_tokens == max(0, usable - p.prophet_weight_bytes - p.workspace_bytes) // want["kv"]


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_expert_parallel_rows_per_gpu(ep):
    """Issue 29: `--ep` (expert parallelism over the tp GPUs): each GPU holds E/ep experts per layer
    whole, its buffer is a fraction of those, the attention stays tensor-parallel (KV per GPU as
    under TP); against the same published figures written here (Mixtral-8x22B's 8 experts: 4, 2, 1
    per GPU; DeepSeek-V3's 256: 128, 64, 32)."""
    gpu = get_gpu("H100-80GB")
    cases = {
        "Mixtral-8x22B": dict(expert=3 * 6144 * 16384 * 2, E=8, layers=56, kv=2 * 56 * 8 * 128 * 2 // ep),
        "DeepSeek-V3": dict(expert=3 * 7168 * 2048 * 2, E=256, layers=58, kv=61 * (512 + 64) * 2),
    }
    for name, want in cases.items():
        m = get_model(name)
        local = want["E"] // ep
        p = plan(m, gpu, 1, BufferSetting.parse("25%"), ServingConfig(tp=ep, ep=True))
        slots = -(-local * want["layers"] // 4)  # 25% of this GPU's routed experts, rounded up
        assert p.ep and p.kv_bytes_per_token == want["kv"], name
        assert p.buffer_slots == slots and p.buffer_bytes == slots * want["expert"]  # whole experts
        routed_all = want["E"] * want["layers"] * want["expert"]
        mine = local * want["layers"] * want["expert"]
        assert p.baseline_weight_bytes == (total_params(m) * 2 - routed_all) // ep + mine
        assert p.prophet_weight_bytes == (total_params(m) * 2 - routed_all) // ep + p.buffer_bytes + \
            local * want["layers"] * 4
        # the same bytes per GPU as TP for the experts when E divides: EP moves whole experts, not shards
        tp = plan(m, gpu, 1, BufferSetting.parse("25%"), ServingConfig(tp=ep))
        assert abs(p.baseline_weight_bytes - tp.baseline_weight_bytes) <= ep
        # batch buffer: this GPU's share of the unique experts, never below its worst case min(E_local, kB)
        b = plan(m, gpu, 4, BufferSetting("batch"), ServingConfig(tp=ep, ep=True))
        k = m.moe.top_k
        assert b.unique_experts_per_layer == pytest.approx(expected_unique_experts(want["E"], k, 4) * local / want["E"])
        assert b.buffer_slots >= min(local, k * 4) and b.buffer_ok
    with pytest.raises(ValueError, match="give tp >= 2"):
        ServingConfig(ep=True)
    rows = run_sweep(["Mixtral-8x22B"], ["H100-80GB"], [1], ["25%"], ServingConfig(tp=4, ep=True))
    assert " 4ep " in format_table(rows)


# ------------------------------------------------------------------ pipeline parallelism (issue 38)
@pytest.mark.parametrize("layers, pp", [(4, 2), (16, 3), (32, 3), (61, 4), (94, 5), (48, 7), (5, 5)])
def test_pp_partition_is_vllms(layers, pp):
    from vllm.distributed.utils import get_pp_indices

    from prophet_kernels.planner.memory import pp_partition

    assert pp_partition(layers, pp) == [get_pp_indices(layers, r, pp) for r in range(pp)]


@pytest.mark.parametrize("name", ["Mixtral-8x7B", "OLMoE-1B-7B", "DeepSeek-V3", "Qwen3-30B-A3B"])
def test_pipeline_stages_hold_the_model_between_them(name):
    """The stages' parameters add up to the model's, plus one copy of a tied embedding (vLLM's last
    stage holds its own LM head); routed experts and KV per token split by layers."""
    from prophet_kernels.planner.memory import count_params, kv_elems_per_token, stage_spec

    m = get_model(name)
    for pp in (2, 3, 4):
        stages = [stage_spec(m, pp, r) for r in range(pp)]
        total = sum(total_params(s) for s in stages)
        assert total == total_params(m) + (m.vocab * m.hidden if m.tied_embeddings else 0)
        assert sum(count_params(s)["routed_experts"] for s in stages) == count_params(m)["routed_experts"]
        assert sum(kv_elems_per_token(s) for s in stages) == kv_elems_per_token(m)
        assert sum(s.moe_layers for s in stages) == m.moe_layers


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_plan_is_its_poorest_stage(pp):
    """Each side's numbers are those of its stage with the fewest KV tokens; a buffer fraction is of
    each stage's own experts."""
    from prophet_kernels.planner.memory import plan_stages

    m, gpu = get_model("Mixtral-8x22B"), get_gpu("H100-80GB")
    cfg = ServingConfig(tp=2, pp=pp)
    setting = BufferSetting.parse("25%")
    stages = plan_stages(m, gpu, 16, setting, cfg)
    r = plan(m, gpu, 16, setting, cfg)
    assert r.pp == pp and r.prophet_kv_tokens == min(s.prophet_kv_tokens for s in stages)
    assert r.baseline_kv_tokens == min(s.baseline_kv_tokens for s in stages)
    assert stages[r.prophet_stage].prophet_kv_tokens == r.prophet_kv_tokens
    for s in stages:
        assert s.buffer_slots == -(-m.moe.experts * stage_moe_layers(m, pp, s.prophet_stage) // 4)
    one = plan(m, gpu, 16, setting, ServingConfig(tp=2))
    assert r.prophet_kv_tokens > one.prophet_kv_tokens  # a stage holds fewer layers' weights and KV


def stage_moe_layers(m, pp, rank):
    from prophet_kernels.planner.memory import pp_partition

    a, b = pp_partition(len(m.layers), pp)[rank]
    return sum("moe" in layer.ffn for layer in m.layers[a:b])


@pytest.mark.parametrize("name, gpu", [("Mixtral-8x7B", "H100-80GB"), ("Qwen3-235B-A22B", "A100-40GB"),
                                       ("DeepSeek-V3", "H100-80GB")])
def test_smallest_layouts_are_smallest(name, gpu):
    """The layout found for each side serves one sequence at the context length (Prophet's buffer holds
    one layer's worst case), and no layout with fewer GPUs does."""
    from prophet_kernels.planner.memory import smallest_layouts

    m, g = get_model(name), get_gpu(gpu)
    setting = BufferSetting.parse("25%")
    base, prophet = smallest_layouts(m, g, 16, setting)
    assert prophet.gpus < base.gpus  # the models that most need Prophet need fewer GPUs with it

    def serves(side, tp, pp):
        r = plan(m, g, 16, setting, ServingConfig(tp=tp, pp=pp))
        return r.baseline_max_seqs >= 1 if side == "baseline" else r.prophet_max_seqs >= 1 and r.buffer_ok

    for lay in (base, prophet):
        assert serves(lay.side, lay.tp, lay.pp) and lay.nodes == -(-lay.gpus // 8)
        assert not any(serves(lay.side, tp, pp) for tp in (1, 2, 4, 8) for pp in range(1, 17) if tp * pp < lay.gpus)


def test_cli_pp_and_layouts(capsys, tmp_path):
    assert cli_main(["plan", "--pp", "2", "--model", "Mixtral-8x22B", "--gpu", "H100-80GB", "--batch", "16",
                     "--no-figures", "--out", str(tmp_path)]) == 0
    assert "1x2" in capsys.readouterr().out
    # --layouts counts each model's published dtype (DeepSeek-V3: fp8) unless --dtype says otherwise
    assert cli_main(["plan", "--layouts", "--model", "DeepSeek-V3,Mixtral-8x7B", "--gpu", "H100-80GB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"DeepSeek-V3 +H100-80GB +fp8 +11 GPUs \(1x11\), 2 nodes", out)
    assert re.search(r"Mixtral-8x7B +H100-80GB +bf16 ", out)
    assert cli_main(["plan", "--layouts", "--model", "DeepSeek-V3", "--gpu", "H100-80GB", "--dtype", "bf16"]) == 0
    assert "22 GPUs (2x11), 3 nodes" in capsys.readouterr().out
    assert cli_main(["plan", "--layouts", "--model", "DeepSeek-V3", "--gpu", "H100-80GB", "--dtype", "int4"]) == 0
    assert re.search(r"DeepSeek-V3 +H100-80GB +int4 +6 GPUs \(2x3\), 1 node +2 GPUs \(2x1\), 1 node",
                     capsys.readouterr().out)
    with pytest.raises(ValueError, match="pipeline parallel size must be a whole number >= 1, got 0"):
        plan(get_model("Mixtral-8x7B"), get_gpu("H100-80GB"), 1, cfg=ServingConfig(pp=0))
    with pytest.raises(ValueError, match=r"pipeline parallel size must be in \[1, 32\]"):
        plan(get_model("Mixtral-8x7B"), get_gpu("H100-80GB"), 1, cfg=ServingConfig(pp=33))


def test_int4_weights_and_experts():
    """Issue 45: int4 in the planner. A resident int4 checkpoint quantizes the linear layers (half a
    byte, an fp16 scale per 128 inputs) and keeps embeddings, routers and norms in bf16; fp8 likewise
    at a byte. Prophet's int4 expert is its store's row (fp32 scale per group: the store's own bytes,
    for every catalogue model whose shapes a group divides). A KV cache is never int4."""
    import dataclasses

    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import quantized_expert_bytes
    from prophet_kernels.planner import MODELS
    from prophet_kernels.planner.memory import (count_params, expert_bytes, int4_store_group, routed_expert_params,
                                                weight_bytes)

    m = get_model("Mixtral-8x7B")
    p = count_params(m)
    linear = p["attention"] + p["routed_experts"] + p.get("dense_mlp", 0) + p.get("shared_experts", 0)
    bf16_rest = 2 * (sum(p.values()) - linear)
    assert weight_bytes(p, "int4") == bf16_rest + linear // 2 + 2 * (linear // 128)
    assert weight_bytes(p, "fp8") == bf16_rest + linear
    assert weight_bytes(p, "bf16") == 2 * sum(p.values())
    for spec in (s for s in MODELS.values() if s.moe.gated):  # (the store's rows are gated experts')
        try:
            g = int4_store_group(spec)
        except ValueError:
            continue
        assert expert_bytes(spec, "int4") == quantized_expert_bytes(WeightFormat("int4", group_size=g), spec.hidden,
                                                                    spec.moe.intermediate), spec.name
    assert 0.26 < expert_bytes(m, "int4") / expert_bytes(m, "bf16") < 0.27
    # a plan in int4: the baseline holds int4 weights, Prophet's buffer int4 slots, the KV cache stays bf16
    cfg = ServingConfig(weight_dtype="int4")
    r = plan(m, get_gpu("H100-80GB"), 1, BufferSetting.parse("25%"), cfg)
    assert r.baseline_weight_bytes == weight_bytes(p, "int4") and r.expert_dtype == "int4"
    assert r.buffer_bytes == r.buffer_slots * expert_bytes(m, "int4")
    ep = plan(m, get_gpu("H100-80GB"), 1, BufferSetting.parse("25%"), dataclasses.replace(cfg, tp=2, ep=True))
    rest = {k: v for k, v in p.items() if k != "routed_experts"}
    assert ep.baseline_weight_bytes == weight_bytes(rest, "int4") // 2 + m.moe_layers * 4 * weight_bytes(
        {"routed_experts": routed_expert_params(m)}, "int4")
    for bad in (dict(kv_dtype="int4"), dict(weight_dtype="int3"), dict(expert_dtype="nf4")):
        with pytest.raises(ValueError, match="unknown"):
            ServingConfig(**bad)


def test_sliding_window_layers_hold_their_window_per_sequence():
    """gpt-oss alternates sliding-window (128) and full attention layers: KV per token of context counts the
    full layers only (vLLM's figure for its full-attention layers: 18 x 2 x 8 heads x 64 x 2 bytes); each
    windowed layer holds at most its window per sequence, counted as fixed per-sequence state."""
    from prophet_kernels.planner.memory import kv_bytes_per_token

    m = get_model("gpt-oss-120b")
    assert sum(1 for x in m.layers if x.window == 128) == 18
    assert kv_bytes_per_token(m) == 18 * 2 * 8 * 64 * 2
    assert state_elems_per_sequence(m) == 18 * 128 * 2 * 8 * 64
    full = dataclasses.replace(m, layers=tuple(dataclasses.replace(x, window=None) for x in m.layers))
    assert kv_bytes_per_token(full) == 2 * kv_bytes_per_token(m) and state_elems_per_sequence(full) == 0


def test_hybrid_2025_models_counted_as_transformers_and_vllm_build_them():
    """Qwen3-Next-80B-A3B (36 Gated DeltaNet layers, 12 gated-attention layers) and Llama-4-Scout (chunked
    attention of 8,192 on 3 of 4 layers): the parameter count equals transformers' model of the published
    config on the meta device, the KV per token and the state per sequence equal vLLM's own specs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from prophet_kernels.planner.memory import kv_bytes_per_token

    if not hasattr(transformers, "Qwen3NextConfig") or not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Qwen3-Next or Llama 4")
    nxt, scout = get_model("Qwen3-Next-80B-A3B"), get_model("Llama-4-Scout")
    g = nxt.linear_attn
    cfg = transformers.Qwen3NextConfig(  # Qwen/Qwen3-Next-80B-A3B-Instruct's config.json
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, vocab_size=151936, intermediate_size=5120, tie_word_embeddings=False,
        full_attention_interval=4)
    assert [x.mixer == "attn" for x in nxt.layers] == [t == "full_attention" for t in cfg.layer_types]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert total_params(nxt) == sum(p.numel() for p in model.parameters()) == 79_674_391_296
    cfg = transformers.Llama4TextConfig(  # meta-llama/Llama-4-Scout-17B-16E-Instruct's text_config
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, vocab_size=202048, num_local_experts=16,
        num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True,
        tie_word_embeddings=False)
    assert [x.window == 8192 for x in scout.layers] == [t == "chunked_attention" for t in cfg.layer_types]
    with torch.device("meta"):
        model = transformers.Llama4ForCausalLM(cfg)
    assert total_params(scout) == sum(p.numel() for p in model.parameters()) == 107_769_861_120
    del model

    vllm_kv = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator

    full = vllm_kv.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=256, dtype=torch.bfloat16)
    assert kv_bytes_per_token(nxt) == 12 * full.page_size_bytes // 16
    conv, temporal = MambaStateShapeCalculator.gated_delta_net_state_shape(1, g.key_heads, g.value_heads, g.key_dim,
                                                                            g.value_dim, g.conv)
    per_layer = conv[0] * conv[1] + temporal[0] * temporal[1] * temporal[2]
    for context in (1, 5000, None):  # (no windowed layers: the same at any context)
        assert state_elems_per_sequence(nxt, context) == 36 * per_layer
    chunked = vllm_kv.ChunkedLocalAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                                attention_chunk_size=8192)
    full = vllm_kv.FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    assert kv_bytes_per_token(scout) == 12 * full.page_size_bytes // 16
    for context, held in ((1000, 1000), (8192, 8192), (20000, 8192), (None, 8192)):  # a chunk at most per layer
        assert state_elems_per_sequence(scout, context) * 2 == 36 * held * chunked.page_size_bytes // 16


def test_kv_bytes_per_token_is_vllms_page_size_per_token():
    """For every decoder-only catalogue family: the planner's KV bytes per token of context equal what vLLM's own
    KV-cache specs (vllm.v1.kv_cache_interface) give per token, one spec per full-attention layer (MLA: one latent
    of kv_lora_rank + rope per token); each sliding-window layer's page holds its window."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    from prophet_kernels.planner import MODELS
    from prophet_kernels.planner.catalog import GQA, MLA
    from prophet_kernels.planner.memory import kv_bytes_per_token

    block = 16
    checked = 0
    for m in MODELS.values():
        a = m.attention
        if m.encoder_decoder or not isinstance(a, (GQA, MLA)):
            continue
        per_token = 0
        for layer in m.layers:
            if layer.mixer != "attn":
                continue
            if isinstance(a, MLA):
                spec = MLAAttentionSpec(block_size=block, num_kv_heads=1, head_size=a.kv_lora_rank + a.qk_rope_dim,
                                        dtype=torch.bfloat16)
            elif layer.window:
                spec = SlidingWindowSpec(block_size=block, num_kv_heads=a.kv_heads, head_size=a.head_dim,
                                         dtype=torch.bfloat16, sliding_window=layer.window)
                assert spec.page_size_bytes // block * layer.window <= state_elems_per_sequence(m) * 2
                continue
            else:
                spec = FullAttentionSpec(block_size=block, num_kv_heads=a.kv_heads, head_size=a.head_dim,
                                         dtype=torch.bfloat16)
            per_token += spec.page_size_bytes // block
        assert kv_bytes_per_token(m) == per_token, m.name
        checked += 1
    assert checked >= 20
