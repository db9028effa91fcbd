"""The peer mixers inside `rbvl train`: each moves p through the same stream as R&B, logs it, and resumes exactly."""

import shutil

import pytest

from rbvl.config import load_config
from rbvl.train import train
from rbvl.train.metrics import read_metrics

pytestmark = pytest.mark.slow

PEER_SETTINGS = {
    "odm": [],
    "dga": ["mixing.dga.batch_size=2", "mixing.dga.update_every=2"],
    "aioli": [
        "mixing.aioli.update_steps=4",
        "mixing.aioli.lp_rounds=1",
        "mixing.aioli.lp_steps=1",
        "eval.max_samples=4",
    ],
    "doremi": [],
}


def config(out, manifest, strategy, *extra):
    return load_config(
        "recipes/demo_tiny_rnb.yaml",
        [
            f"manifest={manifest}",
            f"output_dir={out}",
            f"mixing.strategy={strategy}",
            "max_steps=8",
            "train.batch_size=4",
            "train.log_every=4",
            "train.save_every=4",
            "eval.every=0",
            "data.num_workers=0",
            "logging.progress=false",
            "logging.plots=false",
            "lora.lora_dropout=0.1",
            *PEER_SETTINGS[strategy],
            *extra,
        ],
    )


@pytest.mark.parametrize("strategy", list(PEER_SETTINGS))
def test_peer_moves_p_and_resumes_exactly(tmp_path, tiny_manifest, strategy):
    extra = []
    if strategy == "doremi":  # a finished reference run (DoReMi's reference model)
        ref = tmp_path / "reference"
        train(load_config("recipes/demo_tiny_rnb.yaml", [
            f"manifest={tiny_manifest}", f"output_dir={ref}", "mixing.strategy=stratified", "max_steps=2",
            "train.batch_size=4", "logging.progress=false", "logging.plots=false", "eval.every=0",
        ]))  # fmt: skip
        extra = [f"mixing.reference={ref}"]
    full = train(config(tmp_path / "a", tiny_manifest, strategy, *extra))
    mixing = read_metrics(tmp_path / "a", "mixing")
    assert mixing, f"{strategy} never published a p"
    assert any(max(abs(x - 1 / 3) for x in row["p"]) > 1e-4 for row in mixing), "p moved"
    assert full["cost"] is not None and "flops" in full["cost"]

    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    resumed = train(config(tmp_path / "b", tiny_manifest, strategy, "resume=true", *extra))
    assert resumed["proportions"] == full["proportions"]
    a = [(r["step"], r["loss_per_domain"]) for r in read_metrics(tmp_path / "a", "train") if r["step"] > 4]
    b = [(r["step"], r["loss_per_domain"]) for r in read_metrics(tmp_path / "b", "train") if r["step"] > 4]
    assert a == b
