"""The package's layout: imports go one way between its subpackages, and the installed distribution
stands on its own (a wheel installed outside the checkout runs the `prophet` command and loads
the vLLM plugin's entry point without any repository folder)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "prophet_kernels"
INTEGRATION = REPO / "integration"  # installed as prophet_kernels.integration (setup.py's package_dir)


def _module(path: Path) -> str:
    """The installed module name of a source file of the package (integration/ included)."""
    if path.is_relative_to(INTEGRATION):
        return ".".join(("prophet_kernels", "integration") + path.relative_to(INTEGRATION).with_suffix("").parts)
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _sources():
    return sorted(PKG.rglob("*.py")) + sorted(INTEGRATION.rglob("*.py"))

# subpackage -> the subpackages it may import (top-level modules: provenance, native are leaves)
ALLOWED = {
    "kernels": set(),
    "planner": set(),
    "cpu": {"kernels"},  # the CPU experts: the kernels' int4 layout (kernels.int4), one definition for both
    "memory": {"kernels", "planner", "cpu"},
    "routing": {"memory", "planner", "kernels"},  # kernels: the quality harness's reference quantizers
    "benchmark": {"kernels", "memory", "cpu"},
    "integration": {"memory", "kernels", "planner", "cpu"},
}
LEAVES = {"provenance", "native"}


def _imports(path: Path) -> set[str]:
    """prophet_kernels modules imported anywhere in `path` (module level and inside functions)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    from prophet_kernels import _EXPORTS  # public names re-exported at the top: where they live

    out = {f"prophet_kernels.{_EXPORTS[n.split('.')[1]]}" if n.count(".") == 1 and n.split(".")[1] in _EXPORTS
           else n for n in out}
    return {n for n in out if n.startswith("prophet_kernels.")}


def _part(module: str) -> str:
    return module.split(".")[1]


def test_imports_go_one_way_between_subpackages():
    edges = set()
    for path in _sources():
        src = _part(_module(path)) if path.parent != PKG else None
        if src is None:  # top-level modules: cli (imports anything), provenance and native (leaves)
            stem = path.stem
            if stem in LEAVES:
                assert not {m for m in _imports(path) if _part(m) not in LEAVES}, f"{stem} must stay a leaf"
            continue
        for m in _imports(path):
            dst = _part(m)
            if dst != src and dst not in LEAVES and not m.endswith("__init__"):
                edges.add((src, dst, path.relative_to(REPO).as_posix()))
    wrong = sorted(e for e in edges if e[1] not in ALLOWED.get(e[0], set()))
    assert not wrong, f"imports against the layout (from, to, file): {wrong}"


def test_integration_lives_at_the_top_level_and_installs_under_the_package():
    """The design card's layout: integration/ at the repository's top level, nothing left of it in the
    package folder, and the import name every user and the plugin's entry point use still resolves."""
    assert (INTEGRATION / "vllm_plugin.py").is_file() and (INTEGRATION / "__init__.py").is_file()
    assert not (PKG / "integration").exists()
    import prophet_kernels.integration.vllm_plugin as plugin

    assert Path(plugin.__file__).resolve() == (INTEGRATION / "vllm_plugin.py").resolve()


def test_no_installed_module_imports_a_repository_folder():
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [n for n in names if n.split(".")[0] in ("bench", "integration", "tests", "scripts")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad} (a repository folder, not installed)"


SUBCOMMANDS = ["plan", "info", "bench", "trace", "trace train", "trace record", "trace fit-lookahead",
               "simulate", "dedup", "demo", "tiny-checkpoint"]

INSTALLED_CHECK = """
import sys
from importlib import metadata
import prophet_kernels
from prophet_kernels.cli import main

assert "{site}" in prophet_kernels.__file__, prophet_kernels.__file__
for cmd in {subcommands!r}:
    try:
        main(cmd.split() + ["--help"])
    except SystemExit as e:
        assert e.code == 0, (cmd, e.code)
(ep,) = [e for e in metadata.entry_points(group="vllm.general_plugins") if e.name == "prophet"]
register = ep.load()
assert register.__module__ == "prophet_kernels.integration.vllm_plugin", register.__module__
assert "{site}" in sys.modules[register.__module__].__file__
import prophet_kernels.routing.traces as traces
assert sorted(p.name for p in traces.DATA.glob("*.npz")), "the committed traces are not installed"
print("INSTALLED OK")
"""


def test_wheel_installed_outside_the_checkout(tmp_path):
    """Build a wheel from a copy of the repository, install it (without dependencies) into a fresh
    venv outside the checkout whose dependencies come from this environment's site-packages (a
    path entry, not its editable install of Prophet), and run there: `prophet --help`, every
    subcommand's --help, `prophet plan`, `prophet info`, and the plugin's entry point."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", "plan_out", "sim_out", "checkpoints"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("prophet_moe-*.whl")
    import zipfile

    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert top == {"prophet_kernels", "prophet_moe-0.1.0.dist-info"}, top  # no top-level integration/bench
    assert "prophet_kernels/cpu/cpu_experts.cpp" in zipfile.ZipFile(wheel).namelist()  # compiled at first use
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    Path(site, "dependencies.pth").write_text(ours + "\n")  # torch, triton, vLLM, ...: a plain path entry
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = lambda *a: subprocess.run(a, cwd=work, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run(str(venv / "bin" / "prophet"), "--help")
    assert r.returncode == 0 and "usage: prophet" in r.stdout, r.stderr
    r = run(str(venv / "bin" / "prophet"), "info")
    assert r.returncode == 0 and "Prophet plugin registered (prophet_kernels.integration.vllm_plugin:register)" \
        in r.stdout, r.stdout + r.stderr
    r = run(str(venv / "bin" / "prophet"), "plan", "--no-figures")
    assert r.returncode == 0 and (work / "plan_out" / "plan.csv").exists(), r.stderr
    r = subprocess.run([str(py), "-c", "from prophet_kernels.cpu import native; print('ISA', native.isa(), "
                        "native.library_path(native.compiler()))"], cwd=work, capture_output=True, text=True,
                       timeout=600, env=env | {"PROPHET_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0 and "ISA" in r.stdout and str(tmp_path / "cache") in r.stdout, r.stderr  # built from the wheel
    r = run(str(py), "-c", INSTALLED_CHECK.format(site=site, subcommands=SUBCOMMANDS))
    assert r.returncode == 0 and "INSTALLED OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
