"""Train small models with OLMoE's and Mixtral's routing shapes on the offline corpus (bytes).

The point is real routing, not a good language model: the router of a trained MoE sees real
token statistics (and learns them under OLMoE's load-balancing loss), which a random or
synthetic routing does not. Expert count, top-k, layer count and the routing function are the
real models'; width is small so that training fits the 2-core development machine.

Seeded and reproducible on one machine (torch's CPU kernels are deterministic for these ops
with a fixed thread count); a GPU run is faster and close but not bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpus import EOS, Corpus, load_corpus


@dataclass(frozen=True)
class RoutingShape:
    name: str
    mimics: str  # the planner catalogue's model whose routing shape this is
    family: str  # transformers model type
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    heads: int
    norm_topk_prob: bool
    extra: dict = field(default_factory=dict)

    def config(self, seq_len: int):
        common = dict(vocab_size=256, hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.num_layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.heads, num_experts_per_tok=self.top_k,
                      max_position_embeddings=seq_len, router_aux_loss_coef=0.01, output_router_logits=True,
                      pad_token_id=EOS, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False)
        if self.family == "olmoe":
            from transformers import OlmoeConfig
            cfg = OlmoeConfig(num_experts=self.num_experts, norm_topk_prob=self.norm_topk_prob, **common, **self.extra)
        else:
            from transformers import MixtralConfig
            cfg = MixtralConfig(num_local_experts=self.num_experts, **common, **self.extra)
        cfg._experts_implementation = "grouped_mm"
        return cfg


SHAPES = {
    # OLMoE-1B-7B: 16 layers, 64 experts, top-8, softmax top-k without renormalisation
    "olmoe": RoutingShape("olmoe", "OLMoE-1B-7B", "olmoe", 16, 64, 8, 64, 32, 4, False),
    # Mixtral-8x7B: 32 layers, 8 experts, top-2, renormalised
    "mixtral": RoutingShape("mixtral", "Mixtral-8x7B", "mixtral", 32, 8, 2, 48, 64, 4, True),
}


def get_shape(name: str) -> RoutingShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown routing shape {name!r}; known: {', '.join(SHAPES)}") from None


def model_class(shape: RoutingShape):
    import transformers
    return transformers.OlmoeForCausalLM if shape.family == "olmoe" else transformers.MixtralForCausalLM


def heldout_windows(corpus: Corpus, num: int, seq_len: int, seed: int = 1234) -> np.ndarray:
    """`num` windows of seq_len bytes from the held-out split, at seeded random offsets."""
    return _windows(corpus.heldout, num, seq_len, seed)


def train_windows(corpus: Corpus, num: int, seq_len: int, seed: int = 4321) -> np.ndarray:
    """`num` windows of seq_len bytes from the train split, at seeded random offsets."""
    return _windows(corpus.train, num, seq_len, seed)


def _windows(data: np.ndarray, num: int, seq_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(data) - seq_len, size=num, replace=False))
    return np.stack([data[s:s + seq_len] for s in starts]).astype(np.int64)


@torch.no_grad()
def evaluate(model, windows: np.ndarray, batch: int = 16) -> float:
    """Mean next-byte cross-entropy (bits/byte) over windows, language-model loss only."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        x = torch.from_numpy(windows[i:i + batch])
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum")
        total, n = total + loss.item(), n + x[:, 1:].numel()
    model.train()
    return total / n / math.log(2)


def train(shape_name: str, out_dir: Path, steps: int = 1200, batch: int = 8, seq_len: int = 256,
          lr: float = 3e-3, seed: int = 0, threads: int | None = None, progress: bool = True,
          corpus: Corpus | None = None, eval_windows: int = 64) -> dict:
    """Train and save a checkpoint (safetensors + config) and train_log.json under out_dir."""
    from tqdm import tqdm

    shape = get_shape(shape_name)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    corpus = corpus if corpus is not None else load_corpus()
    model = model_class(shape)(shape.config(seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    evalset = heldout_windows(corpus, eval_windows, seq_len)
    log = {"shape": shape.__dict__ | {"extra": dict(shape.extra)}, "steps": steps, "batch": batch,
           "seq_len": seq_len, "lr": lr, "seed": seed, "corpus": corpus.meta,
           "unigram_bits_per_byte": corpus.unigram_bits_per_byte(), "curve": []}
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {shape.name}", disable=not progress)
    for step in bar:
        starts = rng.integers(0, len(corpus.train) - seq_len, size=batch)
        x = torch.from_numpy(np.stack([corpus.train[s:s + seq_len] for s in starts]).astype(np.int64))
        out = model(input_ids=x, labels=x)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"training {shape.name} diverged at step {step} (loss {out.loss.item()}); "
                                     f"try a smaller --lr than {lr}")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")
        if (step + 1) % max(1, steps // 6) == 0 or step == steps - 1:
            log["curve"].append({"step": step + 1, "heldout_bits_per_byte": evaluate(model, evalset),
                                 "train_loss": out.loss.item(), "aux_loss": out.aux_loss.item()})
    log["heldout_bits_per_byte"] = log["curve"][-1]["heldout_bits_per_byte"]
    log["train_seconds"] = time.time() - t0
    log["torch"] = torch.__version__
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log
