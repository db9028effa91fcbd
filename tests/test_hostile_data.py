"""Hostile data, degenerate clusterings and damaged checkpoints (issue 20, the data side; file-system faults and
SIGTERM in test_hostile_fs.py).

Each case asserts what the user sees (one line naming the problem, no traceback) and that nothing is lost: every
input record is in a shard or in rejects.jsonl with its reason, and a previous output stays usable.

    pytest -q tests/test_hostile_data.py
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_hostile_inputs import _run

TINY_REGROUP = ["--embedder", "open_clip:rbvl-tiny", "--no-progress", "--no-plots", "--num-workers", "0"]


def run(module: str, *args, timeout: int = 180) -> subprocess.CompletedProcess:
    return _run(module, args, timeout)


def one_error_line(r: subprocess.CompletedProcess, text: str) -> str:
    """Exactly one `: error:` line, containing `text`; no traceback; a non-zero exit."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, r.stderr[-3000:]
    assert text in errors[0], errors[0]
    assert r.returncode != 0
    return errors[0]


def png(size=(24, 24), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def llava_rows(images: list[str | None], prefix: str = "r") -> list[dict]:
    rows = []
    for i, image in enumerate(images):
        q = ("<image>\n" if image else "") + f"Question {i}: what is {i} + 1?"
        row = {"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]}
        if image:
            row["image"] = image
        rows.append(row)
    return rows


def rejects_of(out: Path) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def counts_add_up(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "eval"):
        c = manifest["counts"][split]
        assert c["in"] == c["written"] + c["rejected"], c
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Images: paths that escape the image root, slivers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def escaping_data(tmp_path):
    """train.json beside images/: good images, three paths out of the root (.., absolute, symlink), two slivers."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(colour=(1, 2, 3)))
    names = []
    for i in range(16):
        (root / "images" / f"ok{i}.png").write_bytes(png(colour=(15 * i, 100, 200 - 10 * i)))
        names.append(f"images/ok{i}.png")
    (root / "images" / "link.png").symlink_to(outside / "secret.png")
    (root / "images" / "sliver.png").write_bytes(png(size=(1, 100_000)))
    (root / "images" / "wide.png").write_bytes(png(size=(2_000, 20)))  # 100:1
    (root / "images" / "long.png").write_bytes(png(size=(40, 1_000)))  # 25:1, within the bound
    special = ["../outside/secret.png", str(outside / "secret.png"), "images/link.png"]
    special += ["images/sliver.png", "images/wide.png", "images/long.png"]
    (root / "train.json").write_text(json.dumps(llava_rows(names + special + [None] * 4)))
    (root / "eval.json").write_text(json.dumps(llava_rows(["images/ok0.png", "images/sliver.png", None], "e")))
    return root


def test_image_outside_root_and_slivers_are_rejected_with_their_reasons(tmp_path, escaping_data):
    root = escaping_data
    out = tmp_path / "shards"
    args = ["--input", root / "train.json", "--eval", root / "eval.json", "--k", "2", *TINY_REGROUP]
    r = run("data_tools.regroup", *args, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = counts_add_up(out)
    assert manifest["counts"]["train"] == {"in": 26, "written": 21, "rejected": 5}
    rejects = rejects_of(out)
    assert rejects == {
        "r16": "image_outside_root",  # ../outside/secret.png
        "r17": "image_outside_root",  # an absolute path
        "r18": "image_outside_root",  # a symlink inside the root that points out
        "r19": "image_aspect",  # 1 x 100000
        "r20": "image_aspect",  # 2000 x 20
        "e1": "image_aspect",
    }
    lines = (out / "rejects.jsonl").read_text()
    assert "../outside/secret.png resolves to" in lines and "aspect ratio beyond 50:1" in lines
    assert "warning: 3 records rejected as image_outside_root" in r.stderr and "--allow-outside-root" in r.stderr

    out2 = tmp_path / "shards_allowed"
    r = run("data_tools.regroup", *args, "--out", out2, "--allow-outside-root")
    assert r.returncode == 0, r.stderr[-3000:]
    counts_add_up(out2)
    assert set(rejects_of(out2).values()) == {"image_aspect"}
    assert "image_outside_root" not in r.stderr


def test_reader_rejects_escapes_unless_allowed(tmp_path, escaping_data):
    from rbvl.records import ReadOptions, Reject, read_records

    path = str(escaping_data / "train.json")
    got = {x.id: x.reason for x in read_records(path) if isinstance(x, Reject)}
    assert got == {"r16": "image_outside_root", "r17": "image_outside_root", "r18": "image_outside_root"}
    assert not [x for x in read_records(path, ReadOptions(allow_outside_root=True)) if isinstance(x, Reject)]


def test_for_shard_rejects_a_sliver_before_decoding():
    from rbvl.records import images

    with pytest.raises(images.ImageRejected) as e:
        images.for_shard(png(size=(1, 100_000)), "png")
    assert e.value.reason == "image_aspect" and "1 x 100000 px" in str(e.value)
    assert images.for_shard(png(size=(50, 1)), "png").ext == "png"  # exactly the bound is kept
    assert images.untagged(images.tagged(e.value)) == ("image_aspect", str(e.value))
    assert images.untagged("OSError: broken") == ("unreadable_image", "OSError: broken")


def test_collate_drops_a_sliver_before_the_processor_resizes_it():
    from rbvl.data.collate import Encoder
    from rbvl.model import tiny

    _, processor = tiny.llava()
    conv = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A sliver."}]
    samples = [
        {"id": "ok", "conversation": conv, "image": Image.new("RGB", (24, 24))},
        {"id": "sliver", "conversation": conv, "image": Image.new("RGB", (1, 100_000))},
    ]
    seen = []  # the image sizes the processor was given (unguarded, it resized the sliver to 32 x 3.2M px)
    image_processor = processor.image_processor
    original = type(image_processor).__call__

    def spy(self, images, *args, **kwargs):
        seen.extend(im.size for group in images for im in (group if isinstance(group, list) else [group]))
        return original(self, images, *args, **kwargs)

    type(image_processor).__call__ = spy
    try:
        batch, info = Encoder(processor, max_length=128)(samples, [0, 1])
    finally:
        type(image_processor).__call__ = original
    assert info["dropped"] == 1 and batch["pixel_values"].shape[0] == 1
    assert info["domain_ids"].tolist() == [0]
    assert seen == [(24, 24)]


# ---------------------------------------------------------------------------------------------------------------------
# Degenerate clustering: fewer distinct points than k
# ---------------------------------------------------------------------------------------------------------------------


def test_fewer_distinct_points_than_k_is_one_line_and_no_manifest(tmp_path):
    rows = [
        {"id": f"same{i}", "conversations": [{"from": "human", "value": "Same?"}, {"from": "gpt", "value": "Yes."}]}
        for i in range(40)
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    out = tmp_path / "shards"
    r = run("data_tools.regroup", "--input", tmp_path / "train.json", "--out", out, "--k", "3", *TINY_REGROUP)
    line = one_error_line(r, "k=3 needs at least 3 distinct embeddings, but the 40 usable train records have only 1")
    assert "use --k 1 (one domain)" in line
    assert not (out / "manifest.json").exists() and not (out / ".staging").exists()


def test_distinct_points_checked_for_every_k_of_a_sweep():
    import numpy as np

    from rbvl.regroup import cluster as C
    from rbvl.regroup.errors import RegroupError

    rng = np.random.default_rng(0)
    two = rng.normal(size=(2, 8)).astype(np.float32)
    x = np.repeat(two, 20, axis=0) + rng.normal(scale=1e-8, size=(40, 8)).astype(np.float32)  # last-bit noise
    assert C.count_distinct(x) == 2 and C.count_distinct(rng.normal(size=(500, 8)), stop=16) == 16
    with pytest.raises(RegroupError, match=r"k=3 needs at least 3 distinct .* have only 2 .*; use --k 1,2$"):
        C.cluster(x, [1, 2, 3], progress=False)
    with pytest.raises(RegroupError, match=r"use --k 2 or less$"):
        C.cluster(x, [4], progress=False)
    fit = C.cluster(x, [2], progress=False)
    assert sorted(np.bincount(fit.labels).tolist()) == [20, 20]


# ---------------------------------------------------------------------------------------------------------------------
# Shared by the fault cases (here and in test_hostile_fs.py)
# ---------------------------------------------------------------------------------------------------------------------


def enospc(path=None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", *([str(path)] if path else []))


def the_error(err: str, prog: str) -> str:
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Export: a damaged adapter file, a full disk
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_export import fake_checkpoint

    ckpt = tmp_path_factory.mktemp("run") / "checkpoint-7"
    fake_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize("how", ["cut in half", "zero bytes", "garbage header"])
def test_export_of_a_damaged_adapter_is_one_line(tmp_path, checkpoint, how):
    ckpt = tmp_path / "checkpoint-7"
    shutil.copytree(checkpoint, ckpt)
    adapter = ckpt / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(
        {"cut in half": data[: len(data) // 2], "zero bytes": b"", "garbage header": os.urandom(64)}[how]
    )
    r = run("rbvl.cli", "export", ckpt, "--merge", tmp_path / "merged")
    line = one_error_line(r, f"rbvl: error: {adapter}: damaged or truncated adapter file")
    assert "SafetensorError" not in r.stderr.replace(line, "")
    assert not (tmp_path / "merged").exists()


def test_export_on_a_full_disk_leaves_nothing(monkeypatch, capsys, tmp_path, checkpoint):
    from transformers import PreTrainedModel

    from rbvl import cli

    def save_pretrained(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise enospc()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    out = tmp_path / "merged"
    capsys.readouterr()
    code = cli.main(["export", str(checkpoint), "--merge", str(out)])
    line = the_error(capsys.readouterr().err, "rbvl")
    assert code == 2
    assert line == f"rbvl: error: --merge {out}: no space left on device writing {tmp_path / '.merged.tmp-export'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no partial or temporary folder"
