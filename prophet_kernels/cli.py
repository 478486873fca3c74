"""The ``prophet`` command line.

    prophet info             versions, device, which kernel path runs here, native library
    prophet bench [ARGS]     the MoE kernel benchmark (bench/bench_moe.py; small CPU run without a GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _info() -> int:
    import torch
    import triton

    from . import __version__, native
    from .kernels import use_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (no GPU)"
    print(f"prophet {__version__}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device: {name}")
    print(f"kernel path: {'Triton' if use_triton(dev) else 'PyTorch reference (no GPU, no TRITON_INTERPRET=1)'}")
    print(f"native library: {'loaded' if native.is_available() else 'not built (optional)'}")
    return 0


def _bench(args: list[str]) -> int:
    # bench_moe.main picks the Triton interpreter without a GPU before any kernel module loads
    # (the package loads its kernels lazily, see __init__).
    if not (REPO / "bench" / "bench_moe.py").exists():
        print("prophet bench needs the source checkout (bench/ is not installed)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from bench.bench_moe import main as bench_main

    bench_main(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prophet", description="Prophet: MoE serving from a paged expert buffer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, kernel path, native library")
    sub.add_parser("bench", help="MoE kernel benchmark (pass bench_moe.py options after it)", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "info":
        return _info()
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
