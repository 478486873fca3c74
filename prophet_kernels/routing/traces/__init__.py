"""Routing traces: format, offline corpus, small routing-shape models, recorder, dedup analysis,
real routing of released models.

Committed traces live in ``traces/data/``: ``{shape}-{split}.npz`` recorded from the routing-study
models (shape: olmoe, mixtral, qwen3; split: heldout with weights and gate lookahead, train with
expert ids only) and ``flame-moe-290m.npz``, real routing of a released model (``real.py``; its
provenance in ``data/DATA_README.md``). ``load_trace`` takes such a name ("olmoe-heldout") or a path,
optionally followed by a slice of its sequences: "flame-moe-290m[16:]" (the last 16 windows).
"""

from __future__ import annotations

import re
from pathlib import Path

from .format import Trace

DATA = Path(__file__).parent / "data"
_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def known_traces() -> list[str]:
    return sorted(q.stem for q in DATA.glob("*.npz"))


def load_trace(name_or_path) -> Trace:
    m = _SLICE.match(str(name_or_path))
    if m:
        tr = load_trace(m["name"])
        cut = slice(int(m["start"]) if m["start"] else None, int(m["stop"]) if m["stop"] else None)
        return tr.select(cut)
    p = Path(name_or_path)
    if p.suffix == ".npz" or p.exists():
        return Trace.load(p)
    path = DATA / f"{name_or_path}.npz"
    if not path.exists():
        raise ValueError(f"no trace named {name_or_path!r}; known: {', '.join(known_traces()) or 'none'} "
                         "(or give a path; NAME[a:b] selects sequences a..b-1)")
    return Trace.load(path)


__all__ = ["Trace", "load_trace", "known_traces", "DATA"]
