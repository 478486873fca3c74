"""The CPU experts' native library (``cpu_experts.cpp``): compiled at first use, loaded through ctypes.

Built with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) and ``-march=native``,
as Triton builds its launcher stubs at first use (a machine that runs Triton has a compiler), into a
cache folder (``$PROPHET_CACHE_DIR``, else ``$XDG_CACHE_HOME/prophet``, else ``~/.cache/prophet``)
under a name that hashes the source, the flags, the compiler and the CPU's feature flags: a shared
home folder never hands one CPU's build to another. Concurrent builds (several ranks starting at once)
each write a temporary file and rename it into place. The library links no libtorch and no Python:
it loads beside any torch. ctypes releases the GIL for the length of every call into it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_experts.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-uninitialized"]
ABI_VERSION = 4
ISA_BITS = {"avx512f": 1, "avx512_bf16": 2, "f16c": 4}


class NativeBuildError(RuntimeError):
    """The CPU experts' native library could not be built or loaded on this machine."""


def cache_dir() -> Path:
    root = os.environ.get("PROPHET_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "prophet"


def compiler() -> str | None:
    """The C++ compiler the build uses: ``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux: /proc/cpuinfo), part of the build's name (-march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()
    return cache_dir() / f"prophet_cpu_experts-{key[:16]}.so"


def build() -> Path:
    """The library's path, compiled now unless the cache has it. NativeBuildError naming the cause."""
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++): the CPU experts' native library "
                               "is compiled at first use")
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise NativeBuildError(f"compiling {SOURCE.name} with {cxx} failed:\n{r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build's file is replaced by an identical one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    """The loaded library (built first if needed); NativeBuildError if that fails."""
    path = build()
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"loading {path} failed: {e}") from None
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    so.prophet_cpu_abi_version.restype = ctypes.c_int
    so.prophet_cpu_isa.restype = ctypes.c_int
    so.prophet_cpu_pool_create.restype = p
    so.prophet_cpu_pool_create.argtypes = [ctypes.c_int, i64, p, ctypes.c_int]
    so.prophet_cpu_pool_destroy.restype = None
    so.prophet_cpu_pool_destroy.argtypes = [p]
    so.prophet_cpu_submit.restype = ctypes.c_int
    so.prophet_cpu_submit.argtypes = [p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [p] * 8
    so.prophet_cpu_submit_q4.restype = ctypes.c_int
    so.prophet_cpu_submit_q4.argtypes = [p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, i64,
                                         ctypes.c_int] + [p] * 13
    so.prophet_cpu_join.restype = f64
    so.prophet_cpu_join.argtypes = [p]
    so.prophet_cpu_read.restype = f64
    so.prophet_cpu_read.argtypes = [p, p, i64, ctypes.POINTER(f64)]
    if so.prophet_cpu_abi_version() != ABI_VERSION:
        raise NativeBuildError(f"{path} has ABI {so.prophet_cpu_abi_version()}, expected {ABI_VERSION}")
    return so


def is_available() -> bool:
    """Whether the library builds and loads here (builds it on the first call)."""
    try:
        lib()
        return True
    except NativeBuildError:
        return False


def isa() -> list[str]:
    """The instruction sets the build uses (avx512f, avx512_bf16, f16c; [] for the portable code)."""
    bits = lib().prophet_cpu_isa()
    return [name for name, bit in ISA_BITS.items() if bits & bit]
