"""`rbvl bench NAME`: every name in the registry imports and builds its options; an unknown name is one error line."""

import importlib
import os
import subprocess
import sys

import pytest

from rbvl.bench import BENCHMARKS


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "rbvl.cli", *argv], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_builds_its_parser(name):
    module = importlib.import_module(BENCHMARKS[name][0])
    assert callable(module.add_arguments) and callable(module.run)
    assert not hasattr(module, "main")  # `rbvl bench NAME` is the one way in
    done = _cli("bench", name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: rbvl bench {name}")


def test_bench_help_lists_the_registry():
    done = _cli("bench", "--help")
    assert done.returncode == 0, done.stderr
    for name, (_, text) in BENCHMARKS.items():
        assert name in done.stdout and text.split()[0] in done.stdout


def test_unknown_benchmark_is_one_error_line():
    done = _cli("bench", "nosuch")
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("rbvl bench: error:") and "'nosuch'" in errors[0]
    assert all(name in errors[0] for name in BENCHMARKS)  # it names the choices


def test_help_imports_no_benchmark():
    """`rbvl --help` and `rbvl bench --help` read the registry only: no benchmark module, no torch."""
    code = (
        "import sys, contextlib, io\n"
        "from rbvl.cli import main\n"
        "for argv in (['--help'], ['bench', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('rbvl.bench.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
