"""An offline text corpus for training the routing models: files that ship with every machine.

    python   the CPython standard library sources (*.py under sysconfig's stdlib, no site-packages)
    man      Debian's English manual pages (/usr/share/man/man1..man8, roff source, gunzipped)

Split by file, not by byte: a file goes to held-out when the first byte of sha1(its relative path)
is < 26 (about 10%), so the split never changes when files are added elsewhere. Tokens are bytes
(vocabulary 256; byte 0, which text files do not contain, separates files and is the eos/pad id).
"""

from __future__ import annotations

import gzip
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELDOUT_BELOW = 26  # of 256: the held-out share of files
EOS = 0


def _python_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append((f"python/{rel}", p))
    return out


def _man_files(root: Path = Path("/usr/share/man")) -> list[tuple[str, Path]]:
    out = []
    for section in sorted(root.glob("man[1-8]")):
        for p in sorted(section.iterdir()):
            if p.is_file() and not p.is_symlink():
                out.append((f"man/{p.relative_to(root).as_posix()}", p))
    return out


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return b""
    return data.replace(b"\0", b"")


def is_heldout(name: str) -> bool:
    return hashlib.sha1(name.encode()).digest()[0] < HELDOUT_BELOW


@dataclass
class Corpus:
    train: np.ndarray  # uint8 byte stream, files separated by EOS
    heldout: np.ndarray
    meta: dict

    def unigram_bits_per_byte(self) -> float:
        """Cross-entropy of the held-out bytes under the train split's byte frequencies (add-one)."""
        p = np.bincount(self.train, minlength=256).astype(np.float64) + 1.0
        p /= p.sum()
        return float(-np.log2(p[self.heldout]).mean())


def load_corpus(sources=("python", "man"), max_bytes_per_source: int = 48 << 20) -> Corpus:
    """Read the corpus (each source capped at max_bytes_per_source, files in sorted order)."""
    finders = {"python": _python_files, "man": _man_files}
    parts = {"train": [], "heldout": []}
    meta = {"sources": {}, "split": f"file-level, held-out iff sha1(name)[0] < {HELDOUT_BELOW}/256"}
    digest = hashlib.sha1()
    for src in sources:
        if src not in finders:
            raise ValueError(f"unknown corpus source {src!r}; known: {', '.join(finders)}")
        files = finders[src]()
        used, nbytes, nfiles = 0, {"train": 0, "heldout": 0}, {"train": 0, "heldout": 0}
        for name, path in files:
            if used >= max_bytes_per_source:
                break
            data = _read(path)
            if not data:
                continue
            split = "heldout" if is_heldout(name) else "train"
            parts[split].append(np.frombuffer(data + bytes([EOS]), dtype=np.uint8))
            used += len(data)
            nbytes[split] += len(data)
            nfiles[split] += 1
            digest.update(name.encode())
            digest.update(hashlib.sha1(data).digest())
        if not used:
            raise RuntimeError(f"corpus source {src!r} found no files on this machine")
        meta["sources"][src] = {"files": nfiles, "bytes": nbytes}
    meta["sha1"] = digest.hexdigest()
    return Corpus(np.concatenate(parts["train"]), np.concatenate(parts["heldout"]), meta)
