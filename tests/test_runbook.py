"""The GPU runbook (bench/gpu_session.sh) is run first on a lent machine, where a typo costs minutes
of a 15-minute lease. Every Python command in every stage is checked here on the CPU: each script's
own argument parser accepts the stage's arguments, bench_vllm's configurations are ones the plugin
would take, and each pytest selection exists and selects tests."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "bench" / "gpu_session.sh"


def runbook_commands(text: str) -> list[tuple[str, list[str]]]:
    """(stage, argv after the interpreter) for each ``$PY ...`` command of the runbook, with
    ``${NAME:-default}`` read as its default, ``$OUT`` as a folder name and the ``sanitize`` helper's
    calls expanded into the bench_prefetch command it runs."""
    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    sanitize = re.search(r"compute-sanitizer .*? (\$PY [^>]*?)>", text).group(1)
    commands, stage = [], None
    for line in text.splitlines():
        label = re.match(r"\s*([a-z0-9][a-z0-9-]*)\)", line)
        if label:
            stage = label.group(1)
        if stage is None:
            continue
        call = re.match(r"\s*sanitize \S+ \d+ (.*)", line)
        if call:
            line = sanitize.replace('"$@"', call.group(1))
        for cmd in re.findall(r"\$PY (.*?)(?=\s\d?>|\s\||$)", line):
            argv = [a.replace("$OUT", "/tmp/prophet_gpu") for a in shlex.split(cmd)]
            commands.append((stage, argv))
    return commands


COMMANDS = runbook_commands(RUNBOOK.read_text())
SCRIPTS = [(s, a) for s, a in COMMANDS if a[0] != "-c" and a[:2] != ["-m", "pytest"]]
PYTESTS = [(s, a[2:]) for s, a in COMMANDS if a[:2] == ["-m", "pytest"]]


def test_the_runbook_is_read():
    stages = {s for s, _ in COMMANDS}
    assert {"kernels", "prefetch", "device", "fp8", "fp8-a8", "vllm", "cpu-misses", "cpu-misses-vllm", "stream", "int4"} <= stages
    assert len(SCRIPTS) >= 15 and len(PYTESTS) >= 4
    # the sanitizer's command was expanded with its stage's arguments
    assert any(a[:2] == ["bench/bench_prefetch.py", "--small"] and "--only" in a for s, a in SCRIPTS if s == "device")


class _Parsed(Exception):
    pass


def _module_of(argv: list[str]) -> tuple[str, list[str]]:
    if argv[0] == "-m":
        return argv[1], argv[2:]
    assert argv[0].endswith(".py"), argv
    assert (ROOT / argv[0]).is_file(), f"the runbook runs {argv[0]}, which does not exist"
    return argv[0][:-3].replace("/", "."), argv[1:]


@pytest.mark.parametrize("stage,argv", SCRIPTS, ids=[f"{s}:{' '.join(a)[:60]}" for s, a in SCRIPTS])
def test_each_script_takes_its_arguments(stage, argv, monkeypatch):
    """The script's own parser accepts the arguments (it stops right after parsing)."""
    name, args = _module_of(argv)
    module = importlib.import_module(name)
    parsed = []
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, a=None, namespace=None):
        parsed.append(real(self, a, namespace))
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(argparse.ArgumentParser, "exit", lambda self, status=0, message=None: pytest.fail(
        f"{stage}: {' '.join(argv)}: {message}"))
    with pytest.raises(_Parsed):
        module.main(args)
    ns = parsed[0]
    if name == "bench.bench_vllm":  # every configuration is one the plugin takes
        for config in ns.configs:
            module.parse_config(config)


def test_bench_vllm_refuses_a_bad_configuration_before_any_engine(capsys):
    from bench import bench_vllm

    for bad, why in [("prophet-device:0.5:samee", "predictor 'samee'"), ("prophet:0.5:same:read-through", "device-mode"),
                     ("prophet:half", "not a number"), ("offlaod", "unknown")]:
        with pytest.raises(SystemExit):
            bench_vllm.main(["--configs", "off", bad])
        assert why in capsys.readouterr().err


@pytest.mark.parametrize("stage,args", PYTESTS, ids=[s for s, _ in PYTESTS])
def test_each_pytest_selection_selects_tests(stage, args):
    """The files exist and the -k expression selects tests in each of them, so that a renamed test
    cannot leave a stage testing nothing."""
    files = [a for a in args if a.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), files
    keep = [a for a in args if a not in ("-x", "-q")]
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *keep],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{stage}: pytest {' '.join(args)}:\n{p.stdout[-2000:]}"
    for f in files:
        assert any(line.startswith(f + "::") for line in p.stdout.splitlines()), \
            f"{stage}: pytest {' '.join(args)} selects nothing in {f}"
