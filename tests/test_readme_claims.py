"""What the README names exists: every file and folder, every flag of the commands it shows, every recipe key it
sets; and every command answers --version (issue 22: docs and help that disagree with the tool)."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rbvl.config import ConfigError, load_config

README = Path("README.md").read_text()
REPO_DIRS = ("recipes", "docs", "experiments", "scripts", "rbvl", "data_tools", "tests", "examples")


def _code_commands() -> list[str]:
    """Shell commands in the README's ```bash blocks, continuation lines joined, comments dropped."""
    blocks, current, language = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "console"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def test_every_file_and_folder_the_readme_names_exists():
    named = set(re.findall(rf"(?<![\w/.])((?:{'|'.join(REPO_DIRS)})/[\w./*-]*[\w*/])", README))
    made = {line.split()[-1] for line in _code_commands() if line.startswith("python -m data_tools.")}  # outputs
    inside_made = {path for path in named for out in made if path.startswith(out.rstrip("/") + "/")}  # OUT/model
    missing = [path for path in sorted(named - made - inside_made) if not glob.glob(path.rstrip("/"))]
    assert not missing, f"the README names paths that do not exist: {missing}"


def _parser_flags(command: str) -> set[str]:
    if command == "rbvl-regroup":
        from data_tools.regroup import build_parser

        parser = build_parser()
    else:
        from rbvl.cli import build_parser

        parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_flag_the_readme_gives_a_command_exists():
    checked = 0
    for line in _code_commands():
        words = line.split()
        if not words or words[0] not in ("rbvl", "rbvl-regroup") or (words[0] == "rbvl" and len(words) < 2):
            continue
        command = "rbvl-regroup" if words[0] == "rbvl-regroup" else words[1]
        if command in ("bench",):  # each benchmark parses its own options: checked below
            continue
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        unknown = flags - _parser_flags(command)
        assert not unknown, f"README: `{line}` uses {sorted(unknown)}, which `{command}` does not take"
        checked += len(flags)
    assert checked >= 5, "the README shows commands with flags"


def test_every_recipe_key_the_readme_sets_exists():
    checked = 0
    for line in _code_commands():
        words = line.split()
        if len(words) < 3 or words[:2] not in (["rbvl", "train"], ["rbvl", "validate"]):
            continue
        for word in words[2:]:
            key, sep, value = word.partition("=")
            if not sep or word.startswith("-") or key in ("manifest", "output_dir"):
                continue
            try:
                load_config("recipes/demo_tiny_rnb.yaml", [word])
            except ConfigError as e:
                assert "unknown key" not in str(e).lower(), (
                    f"README: `{line}` sets {key}, which is not a recipe key: {e}"
                )
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize(
    "command", ["train", "validate", "eval", "compare", "export", "gallery", "experiment", "bench"]
)
def test_every_command_takes_version(command, capsys):
    from rbvl import __version__
    from rbvl.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rbvl {__version__}"


def test_regroup_takes_version():
    from rbvl import __version__

    r = subprocess.run([sys.executable, "-m", "data_tools.regroup", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"rbvl-regroup (rbvl {__version__})"


def test_docs_experiments_documents_every_key_and_its_example_loads(tmp_path):
    import dataclasses

    from rbvl.experiment.spec import (
        CellSpec,
        ControlSpec,
        DataSpec,
        ExperimentSpec,
        OracleSpec,
        SweepSpec,
        load_experiment,
    )

    page = Path("docs/experiments.md").read_text()
    classes = ((ExperimentSpec, ""), (DataSpec, "data."), (SweepSpec, "k_sweep."), (CellSpec, "cells[]."),
               (OracleSpec, "oracle."), (ControlSpec, "control."))  # fmt: skip
    for cls, prefix in classes:
        for f in dataclasses.fields(cls):
            if cls is ExperimentSpec and f.name in ("data", "k_sweep"):
                continue
            assert f"| `{prefix}{f.name}` |" in page, f"docs/experiments.md does not document {prefix}{f.name}"
    example = re.search(r"## A minimal file\n\n```yaml\n(.*?)```", page, flags=re.S).group(1)
    (tmp_path / "tiny.yaml").write_text(example)
    spec, cells = load_experiment(tmp_path / "tiny.yaml")
    assert spec.headline_seeds == [0] and len(cells) == 2
