"""`train.parallel: fsdp` (FSDP2) on 2 gloo ranks: the tracker on a sharded model, ranks with and without images, and
`rbvl train` against the same run under DDP, resumed mid-window, exported."""

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


def test_tracker_on_a_sharded_model_equals_ddp_with_images_on_one_rank_only(tmp_path):
    """Rank 0's micro-batch has images, rank 1's is text only. Under FSDP rank 1 runs the vision tower on a dummy
    image (else rank 0 waits in the tower's all-gather: the timeout bounds that); the synced per-domain gradients, G and
    the weights after one AdamW step equal DDP's on the same batches."""
    out = {}
    for mode in ("fsdp", "ddp"):
        r = torchrun(str(HERE / "dist_fsdp_worker.py"), str(tmp_path / f"{mode}.pt"), mode, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = torch.load(tmp_path / f"{mode}.pt")
    fsdp, ddp = out["fsdp"], out["ddp"]
    assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]
    assert fsdp["dummy_runs"] == [0, 1], "the text-only rank must run the vision tower on the dummy image"
    torch.testing.assert_close(fsdp["tokens"], ddp["tokens"], rtol=0, atol=0)
    assert ddp["grads"].abs().max() > 0.1
    torch.testing.assert_close(fsdp["grads"], ddp["grads"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fsdp["gram"], ddp["gram"], rtol=1e-5, atol=1e-9)
    assert fsdp["after"].keys() == ddp["after"].keys()
    for name in ddp["after"]:
        torch.testing.assert_close(fsdp["after"][name], ddp["after"][name], rtol=1e-5, atol=1e-7, msg=name)


ARGS = (
    "max_steps=12",
    "train.batch_size=4",
    "balance.update_every=4",
    "balance.warmup_steps=0",
    "balance.lam=10",
    "balance.gram_ema=0.5",  # state the update carries across windows
    "eval.every=6",
    "train.log_every=4",
    "data.num_workers=0",
    "lora.lora_dropout=0.1",
    "logging.progress=false",
    "logging.plots=false",
    "train.save_every=6",
)


def train(manifest, out, *extra):
    r = torchrun(
        "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", f"manifest={manifest}", f"output_dir={out}", *ARGS, *extra
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo recipe (vision tower and projector trained, so both sit in FSDP groups with gradients) for 12 steps
    on 2 ranks, under FSDP and under DDP."""
    from rbvl.data.synthetic import write_tiny_manifest

    root = tmp_path_factory.mktemp("fsdp")
    manifest = write_tiny_manifest(root / "shards")
    return {
        "manifest": manifest,
        "fsdp": train(manifest, root / "fsdp", "train.parallel=fsdp"),
        "ddp": train(manifest, root / "ddp", "train.parallel=ddp"),
    }


def test_fsdp_trains_lora_and_holds_ddp_s_p_on_both_ranks(runs):
    fsdp, ddp = read_metrics(runs["fsdp"], "balance"), read_metrics(runs["ddp"], "balance")
    assert [r["step"] for r in fsdp] == [4, 8, 12]
    assert all(r["p_rank_spread"] == 0.0 for r in fsdp), "every rank must hold the same p"
    assert max(abs(x - 1 / 3) for x in fsdp[-1]["p"]) > 0.01, "p must move"
    for a, b in zip(fsdp, ddp, strict=True):
        assert a["p"] == pytest.approx(b["p"], abs=1e-6)
    for kind in ("train", "eval"):
        a, b = read_metrics(runs["fsdp"], kind), read_metrics(runs["ddp"], kind)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b, strict=True):
            la, lb = ra["loss_per_domain"], rb["loss_per_domain"]  # None: no token of that domain since the last row
            assert [x is None for x in la] == [x is None for x in lb], (kind, ra["step"])
            assert [x for x in la if x is not None] == pytest.approx([x for x in lb if x is not None], rel=1e-5)
    saved = torch.load(runs["fsdp"] / "checkpoint-12" / "trainer_state.pt", weights_only=True)["trainable"]
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero: it must have trained"
    assert not any(type(v).__name__ == "DTensor" for v in saved.values()), "checkpoints hold whole tensors"


def test_fsdp_resumes_mid_window_to_the_same_run_and_exports(runs, tmp_path):
    """Checkpoint at step 6 inside a Balance window (K = 4), LoRA dropout on: the resumed run is the same run; the
    final checkpoint exports to a standalone model."""
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(runs["fsdp"] / "checkpoint-6", b / "checkpoint-6")
    train(runs["manifest"], b, "train.parallel=fsdp", "resume=true")
    a_rows, b_rows = read_metrics(runs["fsdp"]), read_metrics(b)
    keys = [("balance", "p"), ("balance", "gram"), ("balance", "gram_ema"), ("train", "loss_per_domain")]
    for kind, key in [*keys, ("eval", "loss_per_domain")]:
        after = [(r["step"], r[key]) for r in a_rows if r["kind"] == kind and r["step"] > 6]
        assert after and after == [(r["step"], r[key]) for r in b_rows if r["kind"] == kind and r["step"] > 6], (kind, key)  # fmt: skip

    from transformers import AutoModelForImageTextToText

    from rbvl.model.export import export_merged

    out = export_merged(b / "checkpoint-12", tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
