"""File-system faults and SIGTERM in `rbvl-regroup`, `rbvl gallery` (issue 20): one line naming the fault and the path,
no temporary folder left behind, the previous output usable byte for byte.

Faults are injected by monkeypatching the write that fails (as root, permissions cannot be tested for real), and once
for real: shard files opened on /dev/full fail in their buffered flush as on a full disk.

    pytest -q tests/test_hostile_fs.py
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_hostile_data import TINY_REGROUP, enospc, llava_rows, one_error_line, png, run, the_error

# ---------------------------------------------------------------------------------------------------------------------
# File-system faults: one line naming the fault and the path, no temporary folder left, the previous output usable
# ---------------------------------------------------------------------------------------------------------------------


def regroup_in_process(capsys, *args) -> tuple[int, str]:
    from data_tools.regroup import main

    capsys.readouterr()
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def output_files(out: Path) -> dict[str, bytes]:
    """The regroup output's files (what its manifest lists, and the manifest) → their bytes."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {rel: (out / rel).read_bytes() for rel in [*manifest["files"], "manifest.json"]}


def no_leftovers(out: Path) -> None:
    left = [p.name for p in out.iterdir() if p.name in (".staging", ".previous", "gallery.tmp", "gallery.old")]
    assert not left, left
    assert not list((out / ".cache").glob("records*.bin")), "the read spool is removed"


@pytest.fixture(scope="module")
def previous_output(tmp_path_factory):
    """A finished regroup output (k = 2, with a gallery) to fail on top of, and its inputs."""
    root = tmp_path_factory.mktemp("fs")
    (root / "images").mkdir()
    names = []
    for i in range(12):
        (root / "images" / f"i{i}.png").write_bytes(png(colour=(20 * i, 90, 180 - 10 * i)))
        names.append(f"images/i{i}.png")
    (root / "train.json").write_text(json.dumps(llava_rows(names + [None] * 12)))
    out = root / "shards"
    r = run("data_tools.regroup", "--input", root / "train.json", "--out", out, "--k", "2", *TINY_REGROUP)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, out


@pytest.fixture
def previous(tmp_path, previous_output):
    root, out = previous_output
    copy = tmp_path / "shards"
    shutil.copytree(out, copy, symlinks=True)
    return root, copy


def regroup_args(root: Path, out: Path) -> list:
    return ["--input", root / "train.json", "--out", out, "--k", "2", "--overwrite", *TINY_REGROUP]


def test_full_disk_while_writing_shards(monkeypatch, capsys, previous):
    import tarfile

    root, out = previous
    before = output_files(out)
    calls = {"n": 0}
    original = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise enospc()  # as a write deep inside tarfile does: no file name
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    code, err = regroup_in_process(capsys, *regroup_args(root, out))
    line = the_error(err, "rbvl-regroup")
    assert code == 1
    assert line.startswith(f"rbvl-regroup: error: no space left on device writing {out / '.staging' / 'train'}")
    assert line.endswith(".tar"), line
    no_leftovers(out)
    assert output_files(out) == before, "the previous output is untouched"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_for_real_shards_written_to_dev_full(monkeypatch, capsys, previous):
    """Every shard file is /dev/full: the writes fail in the buffered file's flush, as on a full disk."""
    import webdataset.writer

    root, out = previous
    before = output_files(out)
    original = webdataset.writer.gopen

    def gopen(url, mode="rb", **kwargs):
        return open("/dev/full", "wb") if "shard-" in str(url) else original(url, mode, **kwargs)

    monkeypatch.setattr(webdataset.writer, "gopen", gopen)
    code, err = regroup_in_process(capsys, *regroup_args(root, out))
    line = the_error(err, "rbvl-regroup")  # and no "Exception ignored" from tarfile
    assert code == 1 and line.startswith(f"rbvl-regroup: error: no space left on device writing {out / '.staging'}")
    no_leftovers(out)
    assert output_files(out) == before


@pytest.mark.parametrize("when", ["moving the new files in", "writing the manifest"])
def test_full_disk_while_committing_puts_the_previous_output_back(monkeypatch, capsys, previous, when):
    from rbvl.regroup import outdir

    root, out = previous
    before = output_files(out)
    original = os.replace
    state = {"new": 0}

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if ".staging" in src.parts:
            state["new"] += 1
            if when == "moving the new files in" and state["new"] == 3:
                raise enospc()
        if when == "writing the manifest" and dst == out / "manifest.json" and src.name.endswith(".tmp"):
            raise enospc()
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(outdir.os, "replace", replace)
    code, err = regroup_in_process(capsys, *regroup_args(root, out))
    line = the_error(err, "rbvl-regroup")
    assert code == 1 and "rbvl-regroup: error: no space left on device writing " + str(out) in line
    no_leftovers(out)
    assert output_files(out) == before, "every file of the previous output is back, byte for byte"
    assert not (out / "manifest.json.tmp").exists()


def test_read_only_output_folder(monkeypatch, capsys, previous):
    root, out = previous
    before = output_files(out)
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name in (".staging", ".cache"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = regroup_in_process(capsys, *regroup_args(root, out))
    assert code == 1
    assert the_error(err, "rbvl-regroup") == f"rbvl-regroup: error: read-only file system writing {out / '.staging'}"
    no_leftovers(out)
    assert output_files(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions; the monkeypatched cases cover it")
def test_read_only_output_folder_for_real(tmp_path, previous):
    root, out = previous
    before = output_files(out)
    os.chmod(out, 0o555)
    try:
        r = run("data_tools.regroup", *regroup_args(root, out))
    finally:
        os.chmod(out, 0o755)
    line = one_error_line(r, "permission denied writing")
    assert str(out) in line
    assert output_files(out) == before


@pytest.mark.parametrize("where", ["a thumbnail", "the page", "the rename"])
def test_gallery_fault_keeps_the_previous_gallery(monkeypatch, capsys, previous, where):
    from rbvl import cli

    _, out = previous
    page = (out / "gallery" / "index.html").read_bytes()
    if where == "a thumbnail":
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (_ for _ in ()).throw(enospc(fp)))
    elif where == "the page":
        original_write = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "index.html":
                raise OSError(errno.EACCES, "Permission denied", str(self))
            return original_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        original_rename = Path.rename

        def rename(self, target):
            if self.name == "gallery.tmp":
                raise OSError(errno.EROFS, "Read-only file system", str(self), None, str(target))
            return original_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    capsys.readouterr()
    code = cli.main(["gallery", str(out), "--no-plots"])
    line = the_error(capsys.readouterr().err, "rbvl")
    assert code == 2
    fault = {"a thumbnail": "no space left on device", "the page": "permission denied"}.get(where, "read-only")
    assert line.startswith(f"rbvl: error: {fault}") and str(out) in line, line
    no_leftovers(out)
    assert (out / "gallery" / "index.html").read_bytes() == page


# ---------------------------------------------------------------------------------------------------------------------
# Preemption of regroup: SIGTERM stops it like Ctrl-C, with one line; the cache makes the rerun cheap
# ---------------------------------------------------------------------------------------------------------------------


def test_sigterm_during_embedding_stops_cleanly_and_the_rerun_reuses_the_cache(monkeypatch, capsys, previous):
    import signal

    from data_tools.regroup import main
    from rbvl.regroup import pipeline

    root, out = previous
    shutil.rmtree(out / ".cache")
    before = output_files(out)
    handler = signal.getsignal(signal.SIGTERM)
    original = pipeline.embed_records

    def embed_then_sigterm(*args, **kwargs):
        result = original(*args, **kwargs)  # the cache is complete, then the scheduler's SIGTERM arrives
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(pipeline, "embed_records", embed_then_sigterm)
    code, err = regroup_in_process(capsys, *regroup_args(root, out))
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    assert "rbvl-regroup: stopped by SIGTERM; no partial output left; the embedding cache is kept" in err
    no_leftovers(out)
    assert output_files(out) == before
    assert signal.getsignal(signal.SIGTERM) == handler, "the handler is put back"

    monkeypatch.setattr(pipeline, "embed_records", original)
    assert main([*map(str, regroup_args(root, out))]) == 0
    assert "embedded 0 (cached 24)" in capsys.readouterr().out
