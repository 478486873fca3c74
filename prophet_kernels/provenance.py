"""Where a result came from: the commit (PROPHET_COMMIT overrides, e.g. on the GPU machine, which
gets the tree without .git) and the UTC time. Used by traces, simulation rows and bench/."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    if os.environ.get("PROPHET_COMMIT"):
        return os.environ["PROPHET_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
