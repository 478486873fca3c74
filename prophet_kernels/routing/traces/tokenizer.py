"""Subword tokens for the routing-study models: a byte-level BPE (HF ``tokenizers``) trained on the
offline corpus's train split, as released models see text, not bytes.

    tokenizer      data/bpe-8192.json, committed (``python -m prophet_kernels.routing.traces.tokenizer``
                   makes it again: deterministic for the same corpus); id 0 = <|endoftext|>, which
                   separates files as byte 0 did in the byte stream
    TokenCorpus    train / heldout token streams [N] int32 (files joined by id 0, in the byte corpus's
                   order and split), ``token_bytes`` [V]: the bytes each token stands for, so held-out
                   quality stays in bits per byte (comparable with the byte models)

Files are decoded as UTF-8 with replacement (the corpus is nearly all ASCII: Python sources, roff).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DATA
from .corpus import EOS, Corpus, load_corpus

VOCAB = 8192
PATH = DATA / f"bpe-{VOCAB}.json"
EOS_TOKEN = "<|endoftext|>"


def files(stream: np.ndarray):
    """The texts of a byte stream whose files are separated by byte 0 (``Corpus.train``/``heldout``)."""
    ends = np.flatnonzero(stream == EOS)
    start = 0
    for end in ends:
        yield bytes(stream[start:end]).decode("utf-8", errors="replace")
        start = end + 1
    if start < len(stream):
        yield bytes(stream[start:]).decode("utf-8", errors="replace")


def train_tokenizer(corpus: Corpus, vocab: int = VOCAB):
    """A byte-level BPE of `vocab` tokens trained on the corpus's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(files(corpus.train), trainer)
    if tok.token_to_id(EOS_TOKEN) != EOS:
        raise AssertionError(f"{EOS_TOKEN} must be id {EOS}")
    return tok


def load_tokenizer(path: Path = PATH):
    from tokenizers import Tokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"no tokenizer at {path}: python -m prophet_kernels.routing.traces.tokenizer")
    return Tokenizer.from_file(str(path))


def token_bytes(tokenizer) -> np.ndarray:
    """[V] int: bytes each token stands for (a byte-level token's characters are one byte each; the
    file separator counts as the one byte it replaced)."""
    vocab = tokenizer.get_vocab()
    out = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for text, i in vocab.items():
        out[i] = 1 if text == EOS_TOKEN else len(text)
    return out


@dataclass
class TokenCorpus:
    train: np.ndarray  # int32 token stream, files joined by EOS
    heldout: np.ndarray
    token_bytes: np.ndarray  # [V]
    meta: dict

    @property
    def vocab(self) -> int:
        return len(self.token_bytes)

    def unigram_bits_per_byte(self) -> float:
        """Cross-entropy of the held-out tokens under the train split's token frequencies (add-one), per
        byte: the baseline a model must beat to have learned anything beyond token counts."""
        p = np.bincount(self.train, minlength=self.vocab).astype(np.float64) + 1.0
        p /= p.sum()
        return float(-np.log2(p[self.heldout]).sum() / self.token_bytes[self.heldout].sum())


def _encode(tokenizer, stream: np.ndarray) -> np.ndarray:
    out = []
    for enc in tokenizer.encode_batch(list(files(stream)), add_special_tokens=False):
        out.append(np.asarray(enc.ids, dtype=np.int32))
        out.append(np.array([EOS], dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def tokenize_corpus(corpus: Corpus | None = None, tokenizer=None, path: Path = PATH) -> TokenCorpus:
    """The corpus (default: ``load_corpus()``) as token streams (about 20 s for the whole corpus on
    2 cores)."""
    corpus = corpus if corpus is not None else load_corpus()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    train, heldout = _encode(tokenizer, corpus.train), _encode(tokenizer, corpus.heldout)
    sha = hashlib.sha1(tokenizer.to_str().encode()).hexdigest()
    meta = corpus.meta | {"tokenizer": {"kind": "byte-level BPE (HF tokenizers), trained on the train split",
                                        "vocab": tokenizer.get_vocab_size(), "sha1": sha,
                                        "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout))}}
    return TokenCorpus(train, heldout, token_bytes(tokenizer), meta)


if __name__ == "__main__":
    tok = train_tokenizer(load_corpus())
    tok.save(str(PATH))
    print(f"{tok.get_vocab_size()} tokens -> {PATH} ({PATH.stat().st_size / 2**10:.0f} KiB)")
