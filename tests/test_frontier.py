"""`prophet plan --frontier`: the arithmetic over measured inputs (synthetic rows here; the committed
ones come from bench/frontier_inputs.py)."""

import json
import re
import subprocess
import sys

import pytest

from prophet_kernels.planner import frontier as fr
from prophet_kernels.planner.catalog import get_model
from prophet_kernels.planner.memory import expert_bytes, kv_bytes_per_token


def _inputs(shape="olmoe"):
    rows = [{"kind": "unique", "shape": shape, "batch": b, "unique_per_layer": u} for b, u in ((1, 8), (4, 26.0))]
    rows += [{"kind": "quality_resident", "shape": shape, "dtype": d, "bits_per_byte": v}
             for d, v in (("fp32", 1.0), ("bf16", 1.0001), ("fp8", 1.002), ("int4", 1.05))]
    for g in fr.GPUS_DEFAULT:
        for b in (1, 4):
            for cap in fr.CAPACITIES:
                for d in ("bf16", "fp8"):
                    rows.append({"kind": "sim_wait", "shape": shape, "gpu": g, "batch": b, "capacity": cap,
                                 "expert_dtype": d, "layer_us": 100.0, "stall_us_per_step": 1000 * (1 - cap),
                                 "ready_hit_rate": cap, "hit_rate": cap, "policy": "lru", "predictor": "none", "depth": 0})
                for s in fr.NO_WAIT:
                    rows.append({"kind": "no_wait", "shape": shape, "gpu": g, "batch": b, "capacity": cap, "strategy": s,
                                 "layer_us": 100.0, "extra_us_per_step": 10.0, "ready_hit_rate": cap,
                                 "bits_per_byte": None if s == "host-cpu" else 1.0 + (1 - cap) / 10,
                                 "quality_from": "exact (= fp32 experts)" if s == "host-cpu" else "decoded"})
    return rows


def test_layer_time_is_calibrated_on_the_measured_olmoe_decode():
    m = get_model("OLMoE-1B-7B")
    assert fr.layer_seconds(m, "H100-80GB", 8) * 1e6 == pytest.approx(1e6 / 512 / 16, rel=1e-4)
    assert fr.layer_seconds(m, "H100-80GB", 8, "fp8") < fr.layer_seconds(m, "H100-80GB", 8)
    assert fr.layer_seconds(m, "RTX4090-24GB", 8) > fr.layer_seconds(m, "H100-80GB", 8)  # slower memory
    # a GPU without measurements: its datasheet bandwidth at the H100's measured share, said so
    a100 = fr.gpu_constants("a100")
    assert a100["source"].startswith("NOT measured") and a100["pcie_gbps"] == 25.0
    assert a100["hbm_gbps"] == pytest.approx(2039 * fr.CONSTANTS["h100_hbm_gbps"] / fr.CONSTANTS["h100_hbm_datasheet_gbps"])
    assert fr.layer_seconds(m, "H100-80GB", 8) < fr.layer_seconds(m, "A100-80GB", 8) < fr.layer_seconds(m, "RTX4090-24GB", 8)


def test_kv_tokens_and_fits():
    m = get_model("Mixtral-8x7B")
    full = m.moe_layers * m.moe.experts * expert_bytes(m, "bf16")
    assert fr.kv_tokens(m, "H100-80GB", full) == 0  # 93 GB of bf16 Mixtral does not fit 80 GB
    assert fr.kv_tokens(m, "H100-80GB", full // 4) > fr.kv_tokens(m, "H100-80GB", full // 2) > 0


@pytest.mark.parametrize("name", ["Mixtral-8x7B", "gpt-oss-20b", "Llama-4-Scout", "Qwen3-Next-80B-A3B"])
def test_the_context_each_sequence_holds_counts_windows_and_recurrent_state(name):
    """The longest context of each of B sequences: the largest c whose B x (full layers' KV for c tokens +
    windowed layers' min(c, window) + Mamba / DeltaNet state) fits the free bytes; without windows or state,
    the KV tokens / B it always was."""
    m = get_model(name)
    free = fr.kv_free_bytes(m, "H100-80GB", 0)
    per_token = kv_bytes_per_token(m)
    for B in (1, 7, 64, 256):
        c = fr.context_per_sequence(m, free, B)
        assert c > 0 and B * fr.kv_bytes_per_sequence(m, c) <= free < B * fr.kv_bytes_per_sequence(m, c + 1)
        if name == "Mixtral-8x7B":
            assert c == fr.kv_tokens(m, "H100-80GB", 0) // B
    assert fr.context_per_sequence(m, -1, 1) == 0
    if name == "Llama-4-Scout":  # below a chunk every layer holds each token: 4 x the full layers' figure
        assert fr.kv_bytes_per_sequence(m, 1000) == 4 * 1000 * per_token
        assert fr.kv_bytes_per_sequence(m, 100_000) == 100_000 * per_token + 3 * 8192 * per_token


def test_frontier_rows_from_inputs(tmp_path):
    rows = fr.frontier(["OLMoE-1B-7B"], fr.GPUS_DEFAULT, [1, 4], _inputs())
    # resident, prophet bf16/fp8/int4, no-wait, and cpu-moe in bf16/int4 at each target host with every layer on the
    # CPU (OLMoE fits whole: the smallest N that fits is 0, the resident row)
    per = 3 + 3 * len(fr.CAPACITIES) + len(fr.NO_WAIT) * len(fr.CAPACITIES) + 2 * len(fr.CPU_TARGETS)
    assert len(rows) == len(fr.GPUS_DEFAULT) * 2 * per
    by = {(r.gpu, r.batch, r.config): r for r in rows}
    r = by[("H100-80GB", 1, "resident-int4")]
    assert r.quality_loss_pct == pytest.approx(5.0) and r.tokens_per_s > by[("H100-80GB", 1, "resident-bf16")].tokens_per_s
    p = by[("H100-80GB", 1, "prophet-bf16 25.0%")]
    kv_read = fr.kv_read_seconds(get_model("OLMoE-1B-7B"), "H100-80GB", 1, fr.PROMPT)  # the prompt's KV, each step
    assert p.step_ms == pytest.approx((16 * (100 + fr.HOST_US_PER_LAYER) + 750) / 1e3 + kv_read * 1e3)  # host mode
    assert p.tokens_per_s == pytest.approx(1 / p.step_ms * 1e3)
    assert p.kv_tokens > by[("H100-80GB", 1, "resident-bf16")].kv_tokens
    assert by[("H100-80GB", 4, "host-cpu 50.0%")].quality_loss_pct == 0  # the exact expert: fp32's quality
    s = by[("H100-80GB", 1, "stand-in 50.0%")]  # a bf16 buffer plus every expert in int4
    assert s.expert_gpu_bytes > by[("H100-80GB", 1, "substitute 50.0%")].expert_gpu_bytes
    best = fr.recommend(rows)
    assert {(b.gpu, b.batch) for b in best} == {(g, b) for g in fr.GPUS_DEFAULT for b in (1, 4)}
    for b in best:
        assert b.quality_loss_pct <= 1.0 and all(
            o.tokens_per_s <= b.tokens_per_s for o in rows if (o.gpu, o.batch) == (b.gpu, b.batch) and o.fits
            and o.quality_loss_pct is not None and o.quality_loss_pct <= 1.0 and o.tokens_per_s is not None)
    assert "| OLMoE-1B-7B | H100-80GB | 1 | resident-bf16 |" in fr.markdown(rows)
    assert fr.summary(rows).count("\n") == 1 + len(fr.GPUS_DEFAULT) * 2 and "resident-fp8" in fr.summary(rows) and "resident-int4" not in fr.summary(rows)  # int4 loses 5%
    assert fr.figure(rows, tmp_path / "f.png").stat().st_size > 0
    missing = fr.frontier(["OLMoE-1B-7B"], ["H100-80GB"], [16], _inputs())  # no measured inputs at batch 16
    assert all(r.tokens_per_s is None for r in missing)


def test_cli_frontier(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _inputs()))
    run = lambda *a: subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "plan", "--frontier", "--frontier-inputs",
                                     str(path), "--out", str(tmp_path), *a], capture_output=True, text=True)
    r = run("--model", "OLMoE-1B-7B", "--batch", "1,4", "--gpu", "H100-80GB")
    assert r.returncode == 0, r.stderr
    assert "Pick (fastest" in r.stdout and (tmp_path / "frontier.csv").exists() and (tmp_path / "frontier_b1.png").exists()
    r = run("--model", "OLMoE-1B-7B", "--batch", "1", "--gpu", "H100-80GB", "--json", "--no-figures")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "frontier.jsonl").read_text().splitlines()]
    assert rows and all(set(x) >= {"config", "tokens_per_s", "context_tokens", "inputs"} for x in rows)
    for flag, value in (("--util", "0.8"), ("--workspace-gib", "2"), ("--tp", "2")):
        r = run("--model", "OLMoE-1B-7B", flag, value)  # options the frontier does not read: refused, not ignored
        assert r.returncode == 2 and f"{flag}: not read by --frontier" in r.stderr, (flag, r.stderr)
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "plan", "--json"], capture_output=True, text=True)
    assert r.returncode == 2 and "--json goes with --frontier" in r.stderr
    r = run("--model", "OLMoE-1B-7B", "--cpu-moe-layers", "17", "--batch", "1", "--no-figures")
    assert r.returncode == 2 and "--cpu-moe-layers 17: OLMoE-1B-7B has 16 MoE layers" in r.stderr
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "plan", "--cpu-moe-layers", "4"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--cpu-moe-layers goes with --frontier" in r.stderr
    r = run("--model", "OLMoE-1B-7B", "--batch", "1", "--gpu", "A100-40GB", "--no-figures")  # nothing simulated there:
    assert r.returncode == 0, r.stderr  # resident rows from its constants, the rest say they have no input
    assert re.search(r"\| OLMoE-1B-7B \| A100-40GB \| 1 \| resident-bf16 \|[^\n]*\| [\d,]+ \|", r.stdout)
    assert re.search(r"\| OLMoE-1B-7B \| A100-40GB \| 1 \| prophet-bf16 25.0% \|[^\n]*\| no input \|", r.stdout)
    r = subprocess.run([sys.executable, "-m", "prophet_kernels.cli", "plan", "--frontier", "--frontier-inputs",
                        str(tmp_path / "none.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "no frontier inputs" in r.stderr


def test_committed_frontier_is_the_arithmetic_over_the_committed_measurements(tmp_path):
    """bench/results/frontier.csv is what `prophet plan --frontier` computes from the committed inputs
    today; every quality in it comes from a measured row (decoded, or the exact expert = fp32's), every
    row names its inputs, and every row of the three models' resident and Prophet kinds has its quality."""
    import csv
    from pathlib import Path

    results = Path(fr.INPUTS).parent
    if not (results / "frontier.csv").exists():
        pytest.skip("no committed frontier")
    inputs = fr.read_inputs()
    assert {r["shape"] for r in inputs} == set(fr.SHAPE_OF.values())
    assert all(r.get("commit") and r.get("date") for r in inputs)  # measured here, stamped
    rows = fr.frontier(inputs=inputs)
    fresh = fr.write_csv(rows, tmp_path / "frontier.csv").read_text()
    assert fresh == (results / "frontier.csv").read_text()  # committed table = today's arithmetic
    committed = list(csv.DictReader(open(results / "frontier.csv")))
    assert {r["model"] for r in committed} == set(fr.MODELS)
    for r in committed:
        assert r["inputs"]
        if r["kind"] in ("resident", "prophet"):
            assert r["bits_per_byte"], r["config"]


def test_stream_rows_and_the_context_each_sequence_holds():
    """miss: stream rows come from the schedule's replay rows; above batch 16 only resident, waiting
    and streaming rows are made; each row says the context each of the B sequences can hold, and a
    row fits only when each can hold a token."""
    from prophet_kernels.routing.simulator import stream_step

    m = get_model("Mixtral-8x7B")
    inputs = _inputs("mixtral") + [{"kind": "unique", "shape": "mixtral", "batch": 64, "unique_per_layer": 8.0}]
    layer_s = fr.layer_seconds(m, "RTX4090-24GB", 8.0, "fp8")
    st = stream_step(32, 8, 64, expert_bytes(m, "fp8"), 25e9, layer_s)
    inputs.append({"kind": "stream", "shape": "mixtral", "gpu": "RTX4090-24GB", "batch": 64, "capacity": 0.25,
                   "expert_dtype": "fp8", "slots": 64, "layer_us": layer_s * 1e6, "pcie_gbps": 25.0,
                   "step_us": st["step_s"] * 1e6, "stall_us_per_step": st["stall_s"] * 1e6,
                   "copy_busy": st["copy_busy"], "resident_per_layer": st["resident_per_layer"], "hit_rate": 0.25})
    rows = fr.frontier(["Mixtral-8x7B"], ["RTX4090-24GB"], [64], inputs)
    assert {r.kind for r in rows} == {"resident", "prophet-stream", "cpu-moe"}  # no waiting-miss input at 64: no such row
    s = next(r for r in rows if r.kind == "prophet-stream")
    assert s.config == "prophet-stream-fp8 25.0%" and s.expert_gpu_bytes == 64 * expert_bytes(m, "fp8")
    # copy-bound: 32 layers x 6-7 streamed experts at 25 GB/s per step, 64 tokens a step
    copies = sum(8 - r for r in [st["resident_per_layer"][1]] * 16 + [st["resident_per_layer"][0]] * 16)
    assert s.tokens_per_s == pytest.approx(64 / (copies * expert_bytes(m, "fp8") / 25e9), rel=0.03)
    assert s.context_tokens == s.kv_tokens // 64 and s.fits == (s.context_tokens > fr.PROMPT)
    assert "context per sequence" in fr.markdown(rows) and "fastest Prophet (stream)" in fr.summary(rows)


def _committed_rows():
    import csv
    from pathlib import Path

    path = Path(fr.INPUTS).parent / "frontier.csv"
    if not path.exists():
        pytest.skip("no committed frontier")
    return list(csv.DictReader(open(path)))


def test_the_readme_quotes_the_committed_table():
    """The frontier's figures quoted in README.md and docs/routing.md are the committed table's:
    int4 resident over Prophet's fastest within 1% quality (at batch 1-16, and up to what at 64-256),
    Mixtral on 24 GB with int4 misses on the CPU (server-200, 50%) and waiting (int4 50%), bf16 misses
    on the CPU (server-200, 12.5%) and fp8 misses waiting (25%) at batch 1 / 4 / 16, and streaming vs
    waiting at batch 64 / 256."""
    from collections import defaultdict
    from pathlib import Path

    rows = _committed_rows()
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["gpu"], int(r["batch"]))].append(r)

    def ok(r):
        return r["fits"] == "True" and r["tokens_per_s"] and r["quality_loss_pct"] and float(r["quality_loss_pct"]) <= 1

    small, large = [], []
    for (model, gpu, batch), rs in groups.items():
        int4 = [r for r in rs if r["config"] == "resident-int4" and ok(r)]
        prophet = [float(r["tokens_per_s"]) for r in rs if r["kind"].startswith("prophet") and ok(r)]
        if int4 and prophet:
            (small if batch <= 16 else large).append(float(int4[0]["tokens_per_s"]) / max(prophet))
    quoted = f"{min(small):.1f}-{max(small):.0f}x"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    routing = (Path(__file__).resolve().parents[1] / "docs" / "routing.md").read_text()
    assert f"({quoted} in the table at batch 1-16, up to {max(large):.0f}x at 64-256)" in readme
    routing = routing.replace("\n", " ")
    assert f"It is {quoted} faster than" in routing and f"up to {max(large):.0f}x at batch 64-256" in routing

    tps = {(r["gpu"], int(r["batch"]), r["config"]): round(float(r["tokens_per_s"])) for r in rows
           if r["model"] == "Mixtral-8x7B" and r["tokens_per_s"]}
    g = "RTX4090-24GB"

    def at(config):
        return " / ".join(str(tps[(g, b, config)]) for b in (1, 4, 16))
    flat = readme.replace("\n", " ")
    assert (f"{at('prophet-cpu-int4 server-200 50.0%')} tok/s at batch 1 / 4 / 16 against "
            f"{at('prophet-int4 50.0%')} with int4 misses waiting, {at('prophet-cpu server-200 12.5%')} with bf16 "
            f"misses on the CPU and {at('prophet-fp8 25.0%')} with fp8 misses waiting") in flat
    stream = " / ".join(str(tps[(g, b, "prophet-stream-fp8 25.0%")]) for b in (64, 256))
    assert f"{stream} tok/s at batch 64 / 256" in readme.replace("\n", " ")
    ratios = []
    by = {(r["model"], r["gpu"], r["batch"], r["config"]): r for r in rows}
    for (model, gpu, batch, config), r in by.items():
        if config.startswith("prophet-stream-") and not config.endswith("ring") and int(batch) >= 64:
            dtype, cap = config.split()[0].rsplit("-", 1)[1], config.split()[1]
            w = by.get((model, gpu, batch, f"prophet-{dtype} {cap}"))
            if w and w["tokens_per_s"] and r["tokens_per_s"]:
                ratios.append(float(r["tokens_per_s"]) / float(w["tokens_per_s"]))
    assert f"(streaming {min(ratios):.2f}-{max(ratios):.2f}x of them)" in readme.replace("\n", " ")
    # llama.cpp's split beside it: the smallest-N cpu-moe rows at the same host, and the check against reports
    moe = {int(r["batch"]): r for r in rows if r["model"] == "Mixtral-8x7B" and r["gpu"] == g and r["kind"] == "cpu-moe"
           and r["config"].startswith("cpu-moe-int4 server-200") and not r["config"].endswith("32/32")}
    assert (f"gives {' / '.join(str(round(float(moe[b]['tokens_per_s']))) for b in (1, 4, 16))} tok/s with N = "
            f"{' / '.join(moe[b]['config'].split()[-1].split('/')[0] for b in (1, 4, 16))} of 32 layers") in flat
    check = (Path(__file__).resolve().parents[1] / "bench" / "results" / "frontier_check.md").read_text()
    errors = [int(x) for x in re.findall(r"\| ([+-]\d+)% \|", check)]
    assert f"{min(errors)}-{max(errors)}% too fast" in flat


def test_any_catalogue_model_takes_the_routing_of_the_nearest_study_shape():
    """A model without its own trace takes the study shape of the nearest sparsity k/E; its rows say so, and
    say why a row has no tokens/s (no simulation of it) or why Prophet does not serve its family."""
    from prophet_kernels.routing.traces.train import SHAPES

    assert fr.STUDY_SHAPES == {s.name: (s.num_experts, s.top_k) for s in SHAPES.values()}
    assert {fr.SHAPE_OF[s.mimics] for s in SHAPES.values()} == set(fr.STUDY_SHAPES)
    for name, shape in fr.SHAPE_OF.items():
        assert fr.routing_proxy(get_model(name)) == (shape, 1.0)
    assert fr.routing_proxy(get_model("DeepSeek-V3")) == ("qwen3", 1.0)  # 8/256: nearest 8/128
    assert fr.routing_proxy(get_model("Mixtral-8x22B")) == ("mixtral", 1.0)
    assert fr.routing_proxy(get_model("DBRX")) == ("mixtral", 2.0)  # 4/16 = 2/8: a trace expert stands for two
    assert fr.routing_proxy(get_model("Phi-3.5-MoE")) == ("olmoe", 0.25)  # 2/16 = 8/64
    inputs = [r for r in _inputs("mixtral") if r["kind"] != "unique"] + [
        {"kind": "unique", "shape": "mixtral", "batch": b, "unique_per_layer": u} for b, u in ((1, 2.0), (4, 5.0))]
    dbrx = get_model("DBRX")
    assert fr.unique_experts(dbrx, 1, inputs) == 4  # 2 of the trace's x 2: its top-4
    assert fr.unique_experts(dbrx, 4, inputs) == 10.0  # 5 x 2
    assert fr.unique_experts(dbrx, 16, inputs) is None  # no measured row at 16
    rows = fr.frontier(["DBRX"], ["H100-80GB"], [1], inputs)
    assert all(r.routing.startswith("mixtral study trace as proxy") for r in rows)
    assert all(r.served.startswith("not served yet") for r in rows)
    assert {r.kind for r in rows} == {"resident", "prophet", "cpu-moe"}  # no no-wait rows: they decode the study model
    for r in rows:
        if r.kind == "prophet":  # the sims of the mixtral rows are Mixtral-8x7B's, not DBRX's
            assert r.tokens_per_s is None and "no simulation" in r.missing
        else:
            assert r.tokens_per_s is not None and not r.missing
        assert r.quality_loss_pct == (0.0 if r.expert_dtype == "bf16" else None)  # bf16: its own experts
    served = {"OLMoE-1B-7B", "Mixtral-8x7B", "Qwen3-30B-A3B"}
    assert all(not r.served for r in fr.frontier(sorted(served), ["H100-80GB"], [1], _inputs()) if r.model in served)


def test_the_served_families_are_the_plugins():
    from integration.settings import MODEL_FAMILIES

    family = {"OLMoE-1B-7B": "olmoe", "Mixtral-8x7B": "mixtral", "Mixtral-8x22B": "mixtral", "Qwen3-30B-A3B": "qwen3_moe",
              "Qwen3-235B-A22B": "qwen3_moe", "Qwen1.5-MoE-A2.7B": "qwen2_moe", "Qwen2-57B-A14B": "qwen2_moe",
              "DeepSeek-V2": "deepseek_v2", "DeepSeek-V2-Lite": "deepseek_v2"}  # (their configs' model_type)
    assert set(family) == fr.SERVED and set(family.values()) == set(MODEL_FAMILIES)
    assert fr.served(get_model("Switch-Base-128")).startswith("encoder-decoder")
    assert "noaux_tc" in fr.served(get_model("DeepSeek-V3"))


def test_cpu_moe_rows_are_llama_cpp_n_cpu_moe():
    """--n-cpu-moe N: N layers' routed experts read and computed by the host CPU every step, the rest resident;
    the arithmetic term by term, and the smallest N that leaves KV for the context."""
    from prophet_kernels.planner.memory import routed_expert_params

    m = get_model("Mixtral-8x7B")
    cpu = {"cpu_gbps": 100.0, "cpu_gflops": 1000.0, "call_us": 40.0}
    L, gpu = m.moe_layers, "RTX4090-24GB"
    assert fr.cpu_moe_seconds(m, gpu, 1, 2.0, 0, cpu) == pytest.approx(L * fr.layer_seconds(m, gpu, 2.0))
    b = expert_bytes(m, "bf16")
    one_cpu_layer = max(2 * b / 100e9, 1 * 2 * 2 * routed_expert_params(m) / 1e12) + 40e-6
    assert fr.cpu_moe_seconds(m, gpu, 1, 2.0, 5, cpu) == pytest.approx(
        (L - 5) * fr.layer_seconds(m, gpu, 2.0) + 5 * (fr.layer_seconds(m, gpu, 0) + one_cpu_layer))
    slow = cpu | {"cpu_gflops": 1.0}  # compute-bound at a large batch
    assert fr.cpu_layer_seconds(m, 8.0, 64, slow, b) == pytest.approx(64 * 2 * 2 * routed_expert_params(m) / 1e9 + 40e-6)
    with pytest.raises(ValueError, match="33 CPU MoE layers; it has 32"):
        fr.cpu_moe_seconds(m, gpu, 1, 2.0, 33, cpu)
    for B in (1, 16):
        n = fr.cpu_moe_layers(m, gpu, B, "int4")
        per_layer = m.moe.experts * fr.one_expert_bytes(m, "int4")  # (the resident int4 rows' bytes)
        assert fr.kv_tokens(m, gpu, (L - n) * per_layer) >= B * fr.CPU_MOE_CONTEXT
        assert n == 0 or fr.kv_tokens(m, gpu, (L - n + 1) * per_layer) < B * fr.CPU_MOE_CONTEXT
    rows = fr.frontier(["Mixtral-8x7B"], [gpu], [1], _inputs("mixtral"))
    moe = [r for r in rows if r.kind == "cpu-moe"]
    n = fr.cpu_moe_layers(m, gpu, 1, "bf16")
    r = next(r for r in moe if r.config == f"cpu-moe-bf16 server-200 {n}/{L}")
    assert r.expert_gpu_bytes == (L - n) * 8 * b and r.host_bytes == n * 8 * b and r.context_tokens >= fr.CPU_MOE_CONTEXT
    assert {x.config.split()[-1] for x in moe} == {f"{n}/{L}", f"{fr.cpu_moe_layers(m, gpu, 1, 'int4')}/{L}", f"{L}/{L}"}
    mine = fr.frontier(["Mixtral-8x7B"], [gpu], [1], _inputs("mixtral"), cpu_moe=(0, 4))
    assert {x.config.split()[-1] for x in mine if x.kind == "cpu-moe"} == {"0/32", "4/32"}


def test_frontier_check_is_the_arithmetic_of_its_reports(tmp_path):
    """bench/results/frontier_check.md is what bench/frontier_check.py computes today; a report without its
    host memory or split says "not checkable"."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier_check

    committed = Path(frontier_check.OUT)
    assert frontier_check.main(["--out", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert text == committed.read_text()
    assert "| 13.4 |" in text and "not checkable" in text
    kt = frontier_check.predict(frontier_check.REPORTS[0])
    assert kt["checkable"] and kt["predicted"] == pytest.approx(1 / ((kt["gpu_ms"] + kt["cpu_ms"]) / 1e3))


def test_frontier_inputs_simulate_another_model_on_its_proxy_trace(tmp_path):
    """bench/frontier_inputs.py --models: DBRX's waiting-miss simulation replays the mixtral trace with DBRX's
    bytes (a trace expert is two of its experts) and layer time, its stall scaled from the trace's 32 layers to
    its 40; the frontier then fills DBRX's Prophet row from it."""
    from pathlib import Path

    from prophet_kernels.memory.predictors import fit_predictor
    from prophet_kernels.routing.simulator import simulate
    from prophet_kernels.routing.traces import load_trace

    out = tmp_path / "inputs.jsonl"
    bench = Path(__file__).resolve().parents[1] / "bench" / "frontier_inputs.py"
    args = ["--models", "DBRX", "--gpus", "H100-80GB", "--batches", "1", "--capacities", "0.25", "--max-steps", "16",
            "--parts", "sim_wait", "--out", str(out)]
    r = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all((x["model"], x["trace_layers"], x["unit"]) == ("DBRX", 32, 2.0) for x in rows)
    m = get_model("DBRX")
    bf16 = next(x for x in rows if x["expert_dtype"] == "bf16")
    assert bf16["layer_us"] == pytest.approx(fr.layer_seconds(m, "H100-80GB", 4.0) * 1e6)  # 2 trace experts x 2
    held = load_trace("mixtral-heldout")
    again = simulate(held, 0.25, "next-use", fit_predictor("gate", None, held), 1, batch=1, layer_us=bf16["layer_us"],
                     pcie_gbps=52.7, expert_bytes=2 * expert_bytes(m, "bf16"), max_steps=16)
    assert bf16["stall_us_per_step"] == pytest.approx(again.stall_s / again.steps * 1e6 * 40 / 32)
    inputs = _inputs("mixtral") + rows
    p = next(x for x in fr.frontier(["DBRX"], ["H100-80GB"], [1], inputs) if x.config == "prophet-bf16 25.0%")
    kv_read = fr.kv_read_seconds(m, "H100-80GB", 1, fr.PROMPT)
    assert p.step_ms == pytest.approx((40 * (bf16["layer_us"] + fr.HOST_US_PER_LAYER) + bf16["stall_us_per_step"]) / 1e3
                                      + kv_read * 1e3)
    assert not p.missing
    r = subprocess.run([sys.executable, str(bench), "--models", "Mixtral-8x7B", "--parts", "sim_wait", "--out",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "--models: other catalogue models than the study ones" in r.stderr


def test_nonexpert_weights_quantized_as_a_quantized_checkpoint_holds_them(tmp_path, capsys):
    """--nonexpert-dtype fp8 / int4: attention, dense and shared MLPs at the planner's checkpoint bytes (embeddings,
    LM head, routers, norms bf16) in the resident and cpu-moe rows: more KV, a shorter step by their bytes at the
    HBM rate; the simulated rows (run with bf16 ones) without tok/s, saying so; the labels say which."""
    from prophet_kernels.planner.memory import count_params, weight_bytes

    m = get_model("Llama-4-Scout")
    p = count_params(m)
    rest = sum(p.values()) - p["routed_experts"]
    assert fr.nonexpert_bytes(m) == 2 * rest
    quantized = p["attention"] + p["shared_experts"] + p["dense_mlp"]
    assert fr.nonexpert_bytes(m, "fp8") == 2 * (rest - quantized) + quantized
    assert fr.nonexpert_bytes(m, "int4") == weight_bytes({k: v for k, v in p.items() if k != "routed_experts"}, "int4")
    assert fr.nonexpert_bytes(m, "int4") < fr.nonexpert_bytes(m, "fp8") < fr.nonexpert_bytes(m)
    gpu = "H100-80GB"
    c = fr.gpu_constants(gpu)
    saved = (fr.nonexpert_layer_bytes(m) - fr.nonexpert_layer_bytes(m, "int4")) / (c["hbm_gbps"] * 1e9)
    assert fr.layer_seconds(m, gpu, 1.0, "int4", nonexpert_dtype="int4") == pytest.approx(
        fr.layer_seconds(m, gpu, 1.0, "int4") - saved)
    assert fr.kv_free_bytes(m, gpu, 0, nonexpert_dtype="int4") - fr.kv_free_bytes(m, gpu, 0) == \
        fr.nonexpert_bytes(m) - fr.nonexpert_bytes(m, "int4")
    inputs = _inputs("mixtral")
    mix = get_model("Mixtral-8x7B")
    base = {r.config: r for r in fr.frontier(["Mixtral-8x7B"], [gpu], [1], inputs)}
    q = {r.config: r for r in fr.frontier(["Mixtral-8x7B"], [gpu], [1], inputs, nonexpert_dtype="int4")}
    assert set(q) == set(base) and all(r.gpu == "H100-80GB (non-expert int4)" for r in q.values())
    for name in ("resident-int4", "cpu-moe-int4 server-200 32/32"):
        assert q[name].kv_tokens > base[name].kv_tokens and q[name].tokens_per_s > base[name].tokens_per_s
    assert q["resident-int4"].kv_tokens == (fr.kv_free_bytes(mix, gpu, q["resident-int4"].expert_gpu_bytes)
                                            + fr.nonexpert_bytes(mix) - fr.nonexpert_bytes(mix, "int4")) // kv_bytes_per_token(mix)
    assert base["prophet-bf16 25.0%"].tokens_per_s is not None
    assert q["prophet-bf16 25.0%"].tokens_per_s is None and q["prophet-bf16 25.0%"].missing == \
        "simulated with bf16 non-expert weights only"
    with pytest.raises(ValueError, match="non-expert dtype 'int8'"):
        fr.frontier(["Mixtral-8x7B"], [gpu], [1], inputs, nonexpert_dtype="int8")
    from prophet_kernels.cli import main

    assert main(["plan", "--nonexpert-dtype", "int4", "--out", str(tmp_path)]) == 2
    assert "--nonexpert-dtype goes with --frontier" in capsys.readouterr().err


def test_the_users_gpu_and_host_rates():
    """--hbm-gbps / --gpu-memory-gib: resident and cpu-moe rows at the given GPU (labelled so), the simulated rows
    without tok/s and saying why; --cpu-gbps / --cpu-tflops: the cpu-moe rows at the given host (the one not
    given: this machine's measured figure)."""
    inputs = _inputs("mixtral")
    base = {r.config: r for r in fr.frontier(["Mixtral-8x7B"], ["H100-80GB"], [1], inputs)}
    mine = {r.config: r for r in fr.frontier(["Mixtral-8x7B"], ["H100-80GB"], [1], inputs, hbm_gbps=1500.0, memory_gib=40,
                                             cpu_gbps=50.0)}
    r = mine["resident-int4"]
    assert r.gpu == "H100-80GB (given: 1500 GB/s, 40 GiB)"
    assert r.tokens_per_s < base["resident-int4"].tokens_per_s and r.kv_tokens < base["resident-int4"].kv_tokens
    m = get_model("Mixtral-8x7B")
    given = fr.gpu_constants("H100-80GB") | {"hbm_gbps": 1500.0}
    assert r.step_ms == pytest.approx((32 * fr.layer_seconds(m, "H100-80GB", 2.0, "int4", given)
                                       + fr.kv_read_seconds(m, "H100-80GB", 1, fr.PROMPT, given)) * 1e3)
    assert r.kv_tokens == fr.kv_tokens(m, "H100-80GB", r.expert_gpu_bytes, memory_bytes=40 * 2**30)
    p = mine["prophet-bf16 25.0%"]
    assert p.tokens_per_s is None and "catalogue GPUs' rates only" in p.missing
    moe = [x for x in mine.values() if x.kind == "cpu-moe"]
    assert moe and all(" given " in x.config for x in moe)
    here = fr.cpu_targets("mixtral")["this-vm"]
    assert all(x.inputs["cpu"]["cpu_gbps"] == 50.0 for x in moe if x.expert_dtype == "bf16")
    assert all(x.inputs["cpu"]["cpu_gflops"] == here["cpu_gflops"] for x in moe if x.expert_dtype == "bf16")
    # --pcie-gbps: every row's prefill copies at the given link; the decode rows simulated at the catalogue's left out
    link = {r.config: r for r in fr.frontier(["Mixtral-8x7B"], ["RTX4090-24GB"], [1], inputs, pcie_gbps=10.0)}
    slow = fr.gpu_constants("RTX4090-24GB") | {"pcie_gbps": 10.0}
    r = link["prophet-int4 50.0%"]
    assert r.gpu == "RTX4090-24GB (given: PCIe 10 GB/s)" and r.tokens_per_s is None and "rates only" in r.missing
    assert r.ttft_s == pytest.approx(fr.prefill_seconds(m, "RTX4090-24GB", fr.PROMPT, "int4", copied=0.5, rates=slow))
    assert link["resident-int4"].tokens_per_s is not None


def test_prefill_time_to_first_token_and_the_prompts_kv():
    """One prompt's prefill, chunk by chunk: the layer's FLOPs at the GPU's matmul rate (experts at the grouped
    GEMM's measured share) against the copy of the non-resident experts, whichever is longer; on the CPU (cpu-moe)
    the faster of computing there and copying. Each decode step reads the B prompts' KV; a row fits when each
    sequence holds its prompt."""
    from prophet_kernels.planner.memory import routed_expert_params

    m, gpu = get_model("Mixtral-8x7B"), "RTX4090-24GB"
    c = fr.gpu_constants(gpu)
    flops, pcie = c["tflops"] * 1e12, c["pcie_gbps"] * 1e9
    dense = (fr.nonexpert_bytes(m) - m.vocab * m.hidden * 2) / 2 / 32
    experts = 2 * 2 * routed_expert_params(m)

    def chunk(n, before):  # one chunk of n tokens after `before`, one layer, on the GPU
        attn = 2 * n * (before + n / 2) * 32 * (128 + 128)
        return (2 * n * dense + attn) / flops + n * experts / (fr.CONSTANTS["moe_prefill_fraction"] * flops)

    assert fr.prefill_seconds(m, gpu, 1000) == pytest.approx(32 * chunk(1000, 0))
    assert fr.prefill_seconds(m, gpu, 10000) == pytest.approx(32 * (chunk(8192, 0) + chunk(1808, 8192)))
    copy = 8 * expert_bytes(m, "bf16") / pcie  # a layer's experts over the link
    assert copy > chunk(1000, 0)  # the 4090's link: a 75%-copied chunk is copy-bound
    assert fr.prefill_seconds(m, gpu, 1000, copied=0.75) == pytest.approx(32 * 0.75 * copy)
    slow = {"cpu_gflops": 100.0}  # a CPU slower than copying the layer: the copy is taken
    rest = chunk(1000, 0) - 1000 * experts / (fr.CONSTANTS["moe_prefill_fraction"] * flops)
    assert fr.prefill_seconds(m, gpu, 1000, n_cpu=4, cpu=slow) == pytest.approx(
        28 * chunk(1000, 0) + 4 * (rest + copy + chunk(1000, 0) - rest))
    fast = {"cpu_gflops": 1e6}
    assert fr.prefill_seconds(m, gpu, 1000, n_cpu=4, cpu=fast) == pytest.approx(
        28 * chunk(1000, 0) + 4 * (rest + 1000 * experts / 1e15))
    assert fr.kv_read_seconds(m, gpu, 16, 1024) == pytest.approx(16 * 1024 * kv_bytes_per_token(m) / (c["hbm_gbps"] * 1e9))
    oss = get_model("gpt-oss-20b")  # 12 full layers read the context, 12 windowed layers at most their 128 tokens
    per_layer_token = 2 * 8 * 64 * 2
    for context in (100, 1024):
        assert fr.kv_read_seconds(oss, gpu, 2, context) == pytest.approx(
            2 * per_layer_token * (12 * context + 12 * min(context, 128)) / (c["hbm_gbps"] * 1e9))
    rows = fr.frontier(["Mixtral-8x7B"], [gpu], [1], _inputs("mixtral"), prompt=1000)
    by = {r.config: r for r in rows}
    assert by["prophet-bf16 25.0%"].ttft_s == pytest.approx(fr.prefill_seconds(m, gpu, 1000, copied=0.75))
    assert by["prophet-bf16 25.0%"].prefill_tok_s == pytest.approx(1000 / by["prophet-bf16 25.0%"].ttft_s)
    assert by["stand-in 25.0%"].ttft_s is None  # (misses that do not wait: prefill not modelled)
    assert all(r.fits == (r.context_tokens > 1000) for r in rows)
    long = fr.frontier(["Mixtral-8x7B"], [gpu], [1], _inputs("mixtral"), prompt=10**6)
    assert not any(r.fits for r in long)


def test_a_large_batch_layer_is_bound_by_its_flops_where_they_take_longer_than_its_bytes():
    from prophet_kernels.planner.memory import routed_expert_params

    m, gpu = get_model("Mixtral-8x7B"), "H100-80GB"
    c = fr.gpu_constants(gpu)
    assert fr.layer_seconds(m, gpu, 8, "int4", batch=64) == fr.layer_seconds(m, gpu, 8, "int4")  # bytes-bound
    big = fr.layer_seconds(m, gpu, 8, "int4", batch=256)
    bytes_only = fr.layer_seconds(m, gpu, 8, "int4")
    read = 8 * fr.one_expert_bytes(m, "int4") / (fr.CONSTANTS["moe_hbm_fraction"] * c["hbm_gbps"] * 1e9)
    compute = 2 * 256 * 2 * routed_expert_params(m) / (fr.CONSTANTS["moe_prefill_fraction"] * c["tflops"] * 1e12)
    rest = (fr.nonexpert_bytes(m) - m.vocab * m.hidden * 2) / 32  # the layer's non-expert bytes, bf16
    rest_read, rest_compute = rest / (c["hbm_gbps"] * 1e9), 2 * 256 * rest / 2 / (c["tflops"] * 1e12)
    assert compute > read and rest_compute > rest_read  # both compute-bound at 256 on the H100
    assert big == pytest.approx(bytes_only - read - rest_read + compute + rest_compute)


def test_every_catalogue_model_on_three_gpus_at_every_batch_is_filled_or_says_why():
    """`prophet plan --frontier --all` (H100, A100-80GB, RTX 4090; batch 1-256): every row has its tok/s or the
    reason it has none; the committed catalogue summary (bench/results/frontier_catalogue.md) is today's."""
    from pathlib import Path

    from prophet_kernels.planner import MODELS

    rows = fr.frontier(list(MODELS), fr.GPUS_DEFAULT, fr.BATCHES + fr.LARGE_BATCHES, fr.read_inputs())
    assert {r.model for r in rows} == set(MODELS) and {r.gpu for r in rows} == set(fr.GPUS_DEFAULT)
    assert all((r.tokens_per_s is not None) != bool(r.missing) for r in rows)
    assert all(r.served == fr.served(get_model(r.model)) and r.routing for r in rows)
    committed = Path(fr.INPUTS).parent / "frontier_catalogue.md"
    assert committed.read_text() == fr.summary(rows) + "\n"
