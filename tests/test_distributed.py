"""torchrun with 2 gloo ranks on the CPU: the tracker's all-reduce, and `rbvl train` under DDP."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rbvl.train.metrics import read_metrics

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_synced_domain_grads_equal_one_process_over_the_same_samples(tmp_path):
    r = torchrun(str(HERE / "dist_tracker_worker.py"), str(tmp_path / "ddp.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(HERE / "dist_tracker_worker.py"), str(tmp_path / "one.pt"), "single"],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    torch.testing.assert_close(ddp["counts"], one["counts"])
    torch.testing.assert_close(ddp["all_ranks"][0], ddp["all_ranks"][1], rtol=0, atol=0)  # every rank agrees
    torch.testing.assert_close(ddp["grads"], one["grads"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp["gram"], one["gram"], rtol=1e-4, atol=1e-9)  # the unbiased diagonal included


def test_rbvl_train_on_two_ranks(tmp_path, tiny_manifest):
    run = tmp_path / "run"
    r = torchrun(
        "-m",
        "rbvl.cli",
        "train",
        "recipes/demo_tiny_rnb.yaml",
        f"manifest={tiny_manifest}",
        f"output_dir={run}",
        "max_steps=12",
        "train.batch_size=4",
        "balance.update_every=4",
        "balance.warmup_steps=0",
        "balance.lam=10",
        "eval.every=0",
        "data.num_workers=1",
        "logging.progress=false",
        "train.save_every=6",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    balance = read_metrics(run, "balance")
    assert [row["step"] for row in balance] == [4, 8, 12]
    assert all(row["p_rank_spread"] == 0.0 for row in balance), "every rank must hold the same p"
    assert max(abs(x - 1 / 3) for x in balance[-1]["p"]) > 0.01
    assert (run / "checkpoint-12" / "rbvl_state.json").exists()
    assert read_metrics(run, "eval")


RULES = {  # every estimator and update rule that keeps state across a checkpoint, on the all-reduced window
    "replace-shrunk-ema": ("balance.gram_ema=0.5", "balance.gram=shrunk"),  # Ḡ, and both diagonals of the window
    "paper": ("balance.paper=true",),  # the plug-in G and replace: nothing but the window itself
    "mirror-unbiased-pull": (
        "balance.update=mirror",
        "balance.gram=unbiased",
        "balance.pull=0.1",
        "balance.temperature=sqrt_m",
    ),  # p_prev and the micro-batch sums  # fmt: skip
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_two_ranks_resume_mid_window_exactly(tmp_path, tiny_manifest, rule):
    """Checkpoint at step 6 inside a Balance window (K = 4), LoRA dropout on: the resumed run is the same run."""

    def run_to(out, *extra):
        r = torchrun(
            "-m",
            "rbvl.cli",
            "train",
            "recipes/demo_tiny_rnb.yaml",
            f"manifest={tiny_manifest}",
            f"output_dir={out}",
            "max_steps=12",
            "train.batch_size=4",
            "balance.update_every=4",
            "balance.warmup_steps=0",
            "balance.lam=10",
            "eval.every=0",
            "train.log_every=4",
            "data.num_workers=1",
            "lora.lora_dropout=0.1",
            *RULES[rule],
            "logging.progress=false",
            "logging.plots=false",
            "train.save_every=6",
            *extra,
        )
        assert r.returncode == 0, r.stderr[-3000:]

    run_to(tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    assert (tmp_path / "b" / "checkpoint-6" / "rank-001.pt").exists()
    run_to(tmp_path / "b", "resume=true")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    keys = [("balance", "p"), ("balance", "gram"), ("balance", "gram_ema"), ("balance", "grad_norm")]
    for kind, key in [*keys, ("train", "loss_per_domain"), ("eval", "loss_per_domain")]:
        after = [(r["step"], r.get(key)) for r in a if r["kind"] == kind and r["step"] > 6]
        assert after and after == [(r["step"], r.get(key)) for r in b if r["kind"] == kind and r["step"] > 6], (
            kind,
            key,
        )
