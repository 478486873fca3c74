"""Prophet as a transformers experts implementation: tiny random-init OLMoE and Mixtral models
generate the same greedy tokens (and nearly the same logits, fp32) with their experts in Prophet's
host store and a buffer smaller than the experts as with transformers' own experts; misses and
evictions happen; the experts leave the model; bad settings are refused before anything moves."""

import pytest
import torch

from prophet_kernels.integration import demo
from prophet_kernels.integration.transformers_experts import enable_prophet

NEW_TOKENS = 16
pytestmark = pytest.mark.usefixtures("torch_path")  # conftest: ProphetMoE's PyTorch path on the CPU


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prophet-hf")
    return {f: demo.make_tiny_checkpoint(f, root / f, seed=2) for f in demo.TINY}


def _load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _generate(model, prompts):
    """Greedy tokens and the first step's logits for a batch of equal-length prompts."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist(), logits


@pytest.mark.parametrize("family", list(demo.TINY))
@pytest.mark.parametrize("buffer, policy, predictor", [(0.375, "lru", "none"), (0.5, "next-use", "gate"),
                                                      (9, "cyclic", "same")])
def test_tokens_identical_with_prophet_experts(checkpoints, family, buffer, policy, predictor):
    prompts = [p[:12] for p in demo.prompts(4, length=12)]
    ref_model = _load(checkpoints[family])
    want, want_logits = _generate(ref_model, prompts)

    model = _load(checkpoints[family])
    moe = enable_prophet(model, buffer=buffer, device="cpu", policy=policy, predictor=predictor)
    assert not [n for n, _ in model.named_parameters() if "gate_up_proj" in n or "down_proj" in n]
    assert moe.buffer.num_slots == (int(buffer * 4 * 8) if buffer <= 1 else buffer) < 4 * 8
    got, got_logits = _generate(model, prompts)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)  # summation order differs
    st = moe.stats
    assert st.misses > 0 and st.evictions > 0  # (LRU at 3/8 of the experts cycles with no hits: 4 prompts need ~7 of 8 per layer)
    if predictor != "none":
        assert st.prefetched > 0


@pytest.mark.parametrize("family", list(demo.TINY))
def test_device_mode_tokens_identical(checkpoints, family):
    """mode="device" through transformers: the same greedy tokens, misses, evictions and prefetches."""
    prompts = [p[:12] for p in demo.prompts(4, length=12)]
    want, _ = _generate(_load(checkpoints[family]), prompts)
    model = _load(checkpoints[family])
    moe = enable_prophet(model, buffer=0.375, device="cpu", predictor="same", mode="device")
    got, _ = _generate(model, prompts)
    assert got == want
    st = moe.stats
    assert st.misses > 0 and st.evictions > 0 and st.prefetched > 0 and moe.mode == "device"


def test_refused_before_the_experts_move(checkpoints, tmp_path):
    from prophet_kernels.memory.predictors import LearnedGatePredictor

    model = _load(checkpoints["olmoe"])
    before = {n: p.clone() for n, p in model.named_parameters() if "gate_up_proj" in n or "down_proj" in n}
    other = tmp_path / "other_shape.pt"  # a learned gate fitted for 2 layers, hidden 16: the model has 4, 128
    LearnedGatePredictor(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8), torch.randn(1, 2, 4, 16),
                         torch.randn(1, 2, 4), torch.randn(1, 2, 8, 4), top_k=2).save(other)
    # the last one is refused while ProphetMoE is built, after the experts moved: they are put back
    for kwargs, match in [({"buffer": 7}, "need at least 8 slots"),  # a prefill can need all 8 of a layer
                          ({"buffer": 0.0}, "fraction of the experts"),
                          ({"buffer": 2.5}, "whole number of slots"),
                          ({"policy": "fifo"}, "fifo"),
                          ({"predictor": "oracle"}, "predictor 'oracle' is not available while serving; known: "
                                                    "none, same, gate, learned-gate"),
                          ({"prefetch_depth": -1}, "prefetch_depth"),
                          ({"prefetch_budget": 0}, "prefetch_budget must be a whole number of experts >= 1"),
                          ({"predictor": "learned-gate"}, "needs predictor_path"),
                          ({"predictor": "learned-gate", "predictor_path": str(other)}, "fitted for 2 layers")]:
        with pytest.raises(ValueError, match=match):
            enable_prophet(model, device="cpu", **kwargs)
        after = {n: p for n, p in model.named_parameters() if "gate_up_proj" in n or "down_proj" in n}
        assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before), kwargs
    enable_prophet(model, buffer=8, device="cpu", max_batch_tokens=1)  # decode only: one token's 2 experts
    with pytest.raises(ValueError, match="already enabled"):
        enable_prophet(model, device="cpu")


def test_not_silu_gated_is_refused():
    import transformers

    cfg = transformers.OlmoeConfig(**demo.TINY["olmoe"], hidden_act="gelu")
    model = transformers.OlmoeForCausalLM(cfg)
    with pytest.raises(ValueError, match="SiLU-gated .* activation gelu"):
        enable_prophet(model, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu(checkpoints):
    """bf16 on CUDA: the Triton paged kernels and the copy stream, the store pinned, no expert on the
    device but the buffer; logits within bf16 rounding of transformers' own experts."""
    ids = torch.tensor([p[:12] for p in demo.prompts(4, length=12)], device="cuda")
    ref = _load(checkpoints["olmoe"]).to("cuda", torch.bfloat16)
    with torch.no_grad():
        want = ref(ids).logits[:, -1].float()
    del ref
    model = _load(checkpoints["olmoe"]).to(torch.bfloat16)
    moe = enable_prophet(model, buffer=0.375, device="cuda", predictor="gate")
    model.to("cuda")
    assert moe.store.pinned and not [n for n, _ in model.named_parameters() if "gate_up_proj" in n]
    with torch.no_grad():
        got = model(ids).logits[:, -1].float()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert moe.stats.misses > 0


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("mode", ["host", "device"])
def test_fp8_experts_equal_dequantized_model(checkpoints, family, mode):
    """expert_dtype="fp8": the experts are quantized as they move into the store (per output channel)
    and the model generates the tokens (and logits, to summation order) of transformers' own experts
    holding the same fp8 values dequantized; the slots hold fp8 bytes."""
    from prophet_kernels.kernels.fp8 import FP8, dequantize_fp8, quantize_fp8
    from prophet_kernels.memory.store import expert_modules

    prompts = [p[:12] for p in demo.prompts(4, length=12)]
    ref_model = _load(checkpoints[family])
    with torch.no_grad():
        for m in expert_modules(ref_model):
            for p in (m.gate_up_proj, m.down_proj):
                p.copy_(dequantize_fp8(*quantize_fp8(p)))
    want, want_logits = _generate(ref_model, prompts)
    model = _load(checkpoints[family])
    moe = enable_prophet(model, buffer=0.375, device="cpu", expert_dtype="fp8", mode=mode, predictor="same")
    assert moe.store.dtype == moe.buffer.w13.dtype == FP8
    got, got_logits = _generate(model, prompts)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert moe.stats.misses > 0 and moe.stats.evictions > 0


@pytest.mark.parametrize("family", list(demo.TINY))
def test_cpu_misses_tokens_identical(checkpoints, family):
    """miss: cpu through transformers (issue 42): the same greedy tokens and logits within 1e-4, with
    misses computed on the CPU (a decode step's) and copied (the prompts' forward)."""
    prompts = [p[:12] for p in demo.prompts(4, length=12)]
    want, want_logits = _generate(_load(checkpoints[family]), prompts)
    model = _load(checkpoints[family])
    moe = enable_prophet(model, buffer=0.25, device="cpu", miss="cpu", cpu_threads=1, cpu_gbps=10.0, cpu_gflops=3.0,
                         pcie_gbps=1.0)
    got, got_logits = _generate(model, prompts)
    moe.close()
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    st = moe.stats
    assert st.cpu_experts > 0 and st.demand_copies > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_shared_experts_families(tmp_path, family):
    """Qwen2-MoE and DeepSeek-V2 through transformers: the shared experts stay the model's, Prophet's
    routed experts (misses waiting, and on the CPU) give the same greedy tokens."""
    path = demo.make_tiny_checkpoint(family, tmp_path / family, seed=2)
    prompts = [p[:12] for p in demo.prompts(4, length=12)]
    want, want_logits = _generate(_load(path), prompts)
    for kw in (dict(buffer=0.375), dict(buffer=0.25, miss="cpu", cpu_threads=1, cpu_gbps=10.0, cpu_gflops=3.0,
                                        pcie_gbps=1.0)):
        model = _load(path)
        moe = enable_prophet(model, device="cpu", **kw)
        got, got_logits = _generate(model, prompts)
        moe.close()
        assert got == want
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        assert moe.stats.misses > 0 and (moe.stats.cpu_experts > 0) == ("miss" in kw)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_streaming_tokens_identical(checkpoints, family):
    """miss: stream through transformers (issue 43): the ring alone (buffer 0) and a half buffer give
    the same greedy tokens; every layer's non-resident experts copied the same number of times."""
    prompts = [p[:12] for p in demo.prompts(8, length=12)]
    want, want_logits = _generate(_load(checkpoints[family]), prompts)
    for buffer in (0, 0.5):
        model = _load(checkpoints[family])
        moe = enable_prophet(model, buffer=buffer, device="cpu", miss="stream")
        moe.reset_stats()  # (the start-up copies of each ring part's first layer)
        got, got_logits = _generate(model, prompts)
        assert got == want
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        sch = moe.schedule
        counts = {s.streamed // (sch.num_experts - r) for s, r in zip(moe.stats.layers, sch.resident)
                  if r < sch.num_experts}
        assert len(counts) == 1 and counts.pop() > 0
