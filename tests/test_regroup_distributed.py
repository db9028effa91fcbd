"""`rbvl-regroup` under torchrun: two processes embed half each; rank 0 clusters; the clusters equal one process's."""

import json
import subprocess
import sys

import pytest
import webdataset as wds

from data_tools.make_demo import make_demo

pytestmark = pytest.mark.slow


def membership(out):
    manifest = json.loads((out / "manifest.json").read_text())
    groups = {}
    for c in manifest["clusters"]:
        for split in ("train", "eval"):
            for shard in c[f"{split}_shards"]:
                for s in wds.WebDataset(str(out / shard), shardshuffle=False, empty_check=False):
                    groups.setdefault(c["id"], set()).add(json.loads(s["json"])["id"])
    return manifest, {frozenset(ids) for ids in groups.values()}


def test_two_processes_give_the_same_clusters(tmp_path):
    make_demo(tmp_path / "data", n_train=300, n_eval=40)
    args = [
        "--input",
        str(tmp_path / "data" / "train.json"),
        "--eval",
        str(tmp_path / "data" / "eval.json"),
        "--embedder",
        "open_clip:rbvl-tiny",
        "--k",
        "3,5",
        "--no-progress",
        "--no-plots",
        "--num-workers",
        "1",
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "data_tools.regroup",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / ".cache" / "part-001-of-002").is_dir(), "rank 1 embedded its own part"
    one = subprocess.run(
        [sys.executable, "-m", "data_tools.regroup", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    m2, groups2 = membership(tmp_path / "two")
    m1, groups1 = membership(tmp_path / "one")
    assert m1["k"] == m2["k"] and groups1 == groups2
    assert m2["counts"] == m1["counts"]
    embedded = [line for out in (two.stdout, one.stdout) for line in out.splitlines() if "embedded" in line]
    assert embedded[0].split(";")[0] == embedded[1].split(";")[0], "the summary counts every rank's share"
    assert m2["eval_distribution"] == pytest.approx(m1["eval_distribution"])
