"""Issue 20's file-system rows on real file systems: a small tmpfs that fills up, and a read-only mount.

`test_hostile_fs.py` injects the faults; here the kernel raises them. Mounting needs root (CI runs as root); where
`mount` is not allowed these tests skip.

    pytest -q tests/test_real_filesystems.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_hostile_fs
from test_hostile_data import run, the_error
from test_hostile_fs import output_files, regroup_args

from rbvl.data.synthetic import write_tiny_manifest

pytestmark = pytest.mark.slow
previous_output, previous = test_hostile_fs.previous_output, test_hostile_fs.previous  # a finished regroup output


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) → a fresh tmpfs under tmp_path; all of them are unmounted at the end."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _train(output_dir: Path, manifest: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", f"manifest={manifest}"]
    args += [f"output_dir={output_dir}", "max_steps=12", "train.save_every=4", "train.batch_size=4", "eval.every=0"]
    args += ["balance.warmup_steps=0", "balance.update_every=3", "logging.progress=false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_train_on_a_disk_that_fills_up_says_so_keeps_the_last_checkpoint_and_resumes(tmp_path, tmpfs):
    manifest = write_tiny_manifest(tmp_path / "shards")
    disk = tmpfs("disk", "size=5m")  # checkpoint-4 fits (about 3 MB), checkpoint-8 beside it does not
    r = _train(disk / "run", manifest)
    line = the_error(r.stderr, "rbvl")
    assert r.returncode == 2
    assert line.startswith("rbvl: error: cannot write checkpoint-8: no space left on device writing ")
    assert "the previous checkpoint is untouched" in line
    run_dir = disk / "run"
    assert not list(run_dir.glob(".tmp-*")), "no half-written checkpoint is left behind"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # the user frees some space
    r = _train(run_dir, manifest, "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "checkpoint-12" / "rbvl_state.json").read_text())["step"] == 12


def test_train_and_export_into_a_read_only_file_system_are_one_line(tmp_path, tmpfs):
    manifest = write_tiny_manifest(tmp_path / "shards")
    ro = tmpfs("ro", "size=1m,ro")
    r = _train(ro / "run", manifest)
    line = the_error(r.stderr, "rbvl")
    assert r.returncode == 2
    assert f"output_dir={ro / 'run'}" in line and "read-only file system" in line.lower(), line
    r = _train(tmp_path / "run", manifest, "max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    args = [
        sys.executable,
        "-m",
        "rbvl.cli",
        "export",
        str(tmp_path / "run" / "checkpoint-4"),
        "--merge",
        str(ro / "m"),
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = the_error(r.stderr, "rbvl")
    assert r.returncode == 2
    assert str(ro / "m") in line and "read-only file system" in line.lower(), line


def test_regroup_overwrite_onto_a_full_disk_names_the_file_and_keeps_the_previous_output(tmpfs, previous):
    root, out = previous
    disk = tmpfs("disk", "size=64m")
    shutil.copytree(out, disk / "shards", symlinks=True)
    used = shutil.disk_usage(disk).used  # then shrink the disk: the previous output fits, a second copy does not
    subprocess.run(["mount", "-o", f"remount,size={used * 5 // 4}", str(disk)], check=True)
    before = output_files(disk / "shards")
    r = run("data_tools.regroup", *regroup_args(root, disk / "shards"))
    line = the_error(r.stderr, "rbvl-regroup")
    assert r.returncode != 0
    assert "no space left on device" in line.lower() and str(disk / "shards") in line, line
    assert output_files(disk / "shards") == before
    assert not [p.name for p in (disk / "shards").iterdir() if p.name in (".staging", ".previous")]


def test_regroup_into_a_read_only_file_system_is_one_line(tmpfs, previous):
    root, out = previous
    ro = tmpfs("ro", "size=1m,ro")
    r = run("data_tools.regroup", "--input", root / "train.json", "--out", ro / "shards", "--k", "2",
            "--embedder", "open_clip:rbvl-tiny", "--no-progress", "--no-plots", "--num-workers", "0")  # fmt: skip
    line = the_error(r.stderr, "rbvl-regroup")
    assert "read-only file system" in line.lower() and str(ro / "shards") in line, line
