"""Routing traces: format, offline corpus, small routing-shape models, recorder, dedup analysis.

Committed traces live in ``traces/data/`` as ``{shape}-{split}.npz`` (shape: olmoe, mixtral;
split: heldout with weights and gate lookahead, train with expert ids only). ``load_trace``
takes such a name ("olmoe-heldout") or a path.
"""

from __future__ import annotations

from pathlib import Path

from .format import Trace

DATA = Path(__file__).parent / "data"


def load_trace(name_or_path) -> Trace:
    p = Path(name_or_path)
    if p.suffix == ".npz" or p.exists():
        return Trace.load(p)
    path = DATA / f"{name_or_path}.npz"
    if not path.exists():
        known = sorted(q.stem for q in DATA.glob("*.npz"))
        raise ValueError(f"no trace named {name_or_path!r}; known: {', '.join(known) or 'none'} (or give a path)")
    return Trace.load(path)


__all__ = ["Trace", "load_trace", "DATA"]
