"""The optional native library: the package works without it; it builds with CMake where nvcc
is present; on a GPU its copy kernel moves pinned-host regions into device slots exactly."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prophet_kernels import native

REPO = Path(__file__).resolve().parents[1]
has_toolchain = shutil.which("cmake") and shutil.which("nvcc")


def _reset(monkeypatch, lib):
    monkeypatch.setenv("PROPHET_NATIVE_LIB", str(lib))
    monkeypatch.setattr(native, "_REPO", Path("/nonexistent"))
    native._lib.cache_clear()


def test_package_works_without_native(monkeypatch, tmp_path):
    _reset(monkeypatch, tmp_path / "missing.so")
    assert not native.is_available()
    with pytest.raises(RuntimeError, match="not built"):
        native.abi_version()
    native._lib.cache_clear()


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory):
    if not has_toolchain:
        pytest.skip("cmake/nvcc not installed")
    build = tmp_path_factory.mktemp("build")
    arch = "90" if not torch.cuda.is_available() else "".join(map(str, torch.cuda.get_device_capability()))
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={arch}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / "libprophet_native.so"
    assert lib.exists()
    return lib


def test_native_builds(built_lib):
    assert built_lib.stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_copy_slots_from_pinned_host(built_lib, monkeypatch):
    _reset(monkeypatch, built_lib)
    assert native.is_available() and native.abi_version() == 1
    sizes = [12345, 4096, 1 << 20, 7]  # unaligned tail, aligned, large, tiny
    host = [torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory() for n in sizes]
    dev = [torch.full((n + 3,), 0xAB, dtype=torch.uint8, device="cuda") for n in sizes]
    dst_off = [0, 0, 0, 3]  # last region misaligned: byte path
    src = torch.tensor([h.data_ptr() for h in host], dtype=torch.int64, device="cuda")
    dst = torch.tensor([d.data_ptr() + o for d, o in zip(dev, dst_off)], dtype=torch.int64, device="cuda")
    nb = torch.tensor(sizes, dtype=torch.int64, device="cuda")
    native.copy_slots(src, dst, nb)
    torch.cuda.synchronize()
    for h, d, o, n in zip(host, dev, dst_off, sizes):
        assert torch.equal(d[o:o + n].cpu(), h)
        assert torch.all(d[o + n:].cpu() == 0xAB) and torch.all(d[:o].cpu() == 0xAB)
    native._lib.cache_clear()
