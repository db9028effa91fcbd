"""The demo data: deterministic, well-formed, correct answers, held-out eval images, the designed mixtures, the CLI."""

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data_tools.make_demo import EVAL_MIX, TRAIN_MIX, apportion, make_demo

CLI = [sys.executable, "-m", "data_tools.make_demo"]


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root):
    return {split: json.loads((root / f"{split}.json").read_text()) for split in ("train", "eval")}


def expected_answer(record, digit):
    """The answer recomputed from the sklearn label (or, for text_math, from the question's own numbers)."""
    first = record["conversations"][0]["value"]
    domain = record["domain"]
    if domain == "digit_name":
        return str(digit)
    if domain == "parity":
        return "odd" if digit % 2 else "even"
    if domain == "compare":
        k = int(first.rstrip("?").split()[-1])
        return "yes" if digit > k else "no"
    if domain == "arithmetic":
        (k,) = map(int, re.findall(r"\d+", first))
        plus = " plus " in first
        return f"The digit is {digit}, and {digit} {'+' if plus else '*'} {k} = {digit + k if plus else digit * k}."
    a, op, b = first.removeprefix("Solve: ").removeprefix("What is ").removeprefix("Compute ").split()[:3]
    b = int(b.rstrip("?.="))
    return f"{a} {op} {b} = {int(a) + b if op == '+' else int(a) * b}."


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    stats = make_demo(root, n_train=400, n_eval=100)
    return root, stats, load(root)


def test_same_seed_same_bytes_and_the_cli_matches(demo, tmp_path):
    root, _, _ = demo
    help_ = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "load_digits" in help_.stdout and "--eval-fraction" in help_.stdout
    run = subprocess.run([*CLI, str(tmp_path / "cli"), "--n-train", "400", "--n-eval", "100"], capture_output=True)
    assert run.returncode == 0, run.stderr
    assert files(tmp_path / "cli") == files(root)
    make_demo(tmp_path / "other", seed=1, n_train=400, n_eval=100)
    assert files(tmp_path / "other")["train.json"] != files(root)["train.json"]


def test_records_are_well_formed_and_answers_correct(demo):
    root, _, splits = demo
    target = load_digits().target
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids)) == 500
    for rows in splits.values():
        for r in rows:
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) in (2, 4)
            assert all(t["value"] for t in turns)
            text = "".join(t["value"] for t in turns)
            has_image = "image" in r
            assert text.count("<image>") == int(has_image) and turns[0]["value"].startswith("<image>\n") == has_image
            assert has_image == (r["domain"] != "text_math")
            if not has_image:
                assert turns[1]["value"] == expected_answer(r, None)
                continue
            index = int(r["image"].removeprefix("images/digit_").removesuffix(".png"))
            digit = int(target[index])
            assert turns[1]["value"] == expected_answer(r, digit), r
            if len(turns) == 4:
                assert r["domain"] == "digit_name" and turns[3]["value"] == ("odd" if digit % 2 else "even")
    assert any(len(r["conversations"]) == 4 for r in splits["train"]), "some records are multi-turn"


def test_images_exist_are_held_out_and_rarely_reused(demo):
    root, stats, splits = demo
    used = {split: Counter(r["image"] for r in rows if "image" in r) for split, rows in splits.items()}
    assert not used["train"].keys() & used["eval"].keys(), "eval images are held out from train"
    for counts in used.values():
        assert max(counts.values()) - min(counts.values()) <= 1  # dealt in shuffled passes
        for path in counts:
            with Image.open(root / path) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
    assert len(list((root / "images").glob("digit_*.png"))) == 1797
    scans = load_digits().images
    for i in (0, 7, 1796):  # the pixels are the scan's: ink 0..16 → white..black, each pixel a 4×4 block
        with Image.open(root / "images" / f"digit_{i:04d}.png") as im:
            pixels = np.asarray(im)
        assert (pixels == pixels[..., :1]).all()
        assert np.array_equal(pixels[::4, ::4, 0], np.round(255 - scans[i] * 255 / 16).astype(np.uint8))
        assert np.array_equal(pixels[..., 0], np.kron(pixels[::4, ::4, 0], np.ones((4, 4), np.uint8)))
    assert stats["images"] == {"train": 1617, "eval": 180}


def test_train_imbalanced_eval_balanced(demo):
    root, stats, splits = demo
    counts = {split: dict(Counter(r["domain"] for r in rows)) for split, rows in splits.items()}
    assert counts == stats["records"] == json.loads((root / "stats.json").read_text())["records"]
    assert counts["train"] == {d: round(400 * share) for d, share in TRAIN_MIX.items()}
    assert set(counts["eval"].values()) == {20}
    assert max(counts["train"].values()) >= 4 * min(counts["train"].values())


def test_apportion_adds_up():
    for n in (1, 7, 13, 250, 2001):
        assert sum(apportion(n, TRAIN_MIX).values()) == n
        eval_counts = apportion(n, EVAL_MIX).values()
        assert sum(eval_counts) == n and max(eval_counts) - min(eval_counts) <= 1


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = [*CLI, str(out), "--n-train", "20", "--n-eval", "5"]
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode != 0 and "not empty" in refused.stderr and refused.stderr.count("\n") == 1
    assert (out / "keep.txt").exists() and not (out / "train.json").exists()
    assert subprocess.run([*run, "--overwrite"], capture_output=True).returncode == 0
    assert not (out / "keep.txt").exists() and (out / "stats.json").exists()
    bad = subprocess.run([*CLI, str(tmp_path / "e"), "--eval-fraction", "1.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "eval_fraction" in bad.stderr and bad.stderr.count("\n") == 1
