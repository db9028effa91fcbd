"""The demo data: deterministic, well-formed, correct answers, held-out eval images, the designed mixtures."""

import json
import subprocess
import sys

from PIL import Image
from sklearn.datasets import load_digits

from data_tools.make_demo import TRAIN_MIX, make_demo


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_correct(tmp_path):
    stats = make_demo(tmp_path / "a", n_train=400, n_eval=100)
    make_demo(tmp_path / "b", n_train=400, n_eval=100)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    target = load_digits().target
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    evals = json.loads((tmp_path / "a" / "eval.json").read_text())
    ids = [r["id"] for r in train + evals]
    assert len(ids) == len(set(ids)) == 500
    images = {"train": set(), "eval": set()}
    for split, rows in (("train", train), ("eval", evals)):
        for r in rows:
            first = r["conversations"][0]["value"]
            assert first.count("<image>") == (1 if "image" in r else 0)
            assert first.startswith("<image>\n") == ("image" in r)
            answer = r["conversations"][1]["value"]
            if "image" in r:
                images[split].add(r["image"])
                digit = int(target[int(r["image"].split("_")[1].split(".")[0])])
                im = Image.open(tmp_path / "a" / r["image"])
                assert im.size == (32, 32) and im.mode == "RGB"
                if r["domain"] == "digit_name":
                    assert answer == str(digit)
                elif r["domain"] == "parity":
                    assert answer == ("odd" if digit % 2 else "even")
                elif r["domain"] == "arithmetic":
                    assert answer.startswith(f"The digit is {digit}, and {digit} ")
                    lhs, rhs = answer.split(", and ")[1].rstrip(".").split(" = ")
                    assert eval(lhs) == int(rhs)  # noqa: S307 - our own "a + b" strings
                elif r["domain"] == "compare":
                    k = int(first.rstrip("?").split()[-1])
                    assert answer == ("yes" if digit > k else "no")
            else:
                assert r["domain"] == "text_math"
                lhs, rhs = answer.rstrip(".").split(" = ")
                assert eval(lhs) == int(rhs)  # noqa: S307
    assert not images["train"] & images["eval"], "eval images are held out"
    assert stats["train"]["digit_name"] == 160 and stats["train"]["compare"] == 32  # the imbalanced train mix
    assert set(stats["eval"].values()) == {20}  # balanced eval
    assert set(stats["train"]) == set(TRAIN_MIX)
    assert any(len(r["conversations"]) == 4 for r in train), "some records are multi-turn"


def test_cli(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "data_tools.make_demo", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "digit" in help_.stdout
    run = [sys.executable, "-m", "data_tools.make_demo", str(tmp_path / "d"), "--n-train", "50", "--n-eval", "10"]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and again.stderr.count("\n") == 1
    assert subprocess.run(run + ["--overwrite"], capture_output=True, text=True).returncode == 0
