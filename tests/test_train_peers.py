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


def test_doremi_refuses_a_reference_of_another_model_or_other_domains(tmp_path, tiny_manifest):
    """A reference run of another model (or another tiny model's seed) trained on: its adapter went onto this run's
    base with PEFT's missing-keys warning only, the excess loss was ~1e-7 and p stayed uniform."""
    import json
    from pathlib import Path

    from rbvl.config import ConfigError
    from rbvl.config.engine import dump_config
    from rbvl.mixing.context import reference_config

    recipe = "recipes/demo_tiny_rnb.yaml"
    cfg = load_config(recipe, [f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'run'}", "seed=3"])
    checkpoint = tmp_path / "ref" / "checkpoint-2"
    checkpoint.mkdir(parents=True)

    def reference(*overrides):
        dump_config(load_config(recipe, [f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'ref'}", *overrides]),
                    checkpoint / "config.yaml")  # fmt: skip
        return reference_config(checkpoint, cfg)

    assert reference("seed=5").seed == 5, "the reference's own base: a tiny model is built from its seed"
    with pytest.raises(ConfigError, match=r"trained model.name=tiny-qwen2-vl, this run tiny-llava: .*same model"):
        reference("model.name=tiny-qwen2-vl")
    other = json.loads(Path(tiny_manifest).read_text())
    for c in other["clusters"]:
        c["name"] = f"other_{c['name']}"
    (Path(tiny_manifest).parent / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"trained on domains \['other_.*must see the same domains"):
        reference(f"manifest={Path(tiny_manifest).parent / 'other.json'}")


def test_doremi_reference_of_a_full_fine_tune_is_its_trained_model(tmp_path, tiny_manifest):
    """lora.enabled=false: the reference checkpoint holds the trained model, not an adapter; it was replaced by the
    untrained base, and the excess loss measured against a model that never trained."""
    import torch

    from rbvl.config.engine import dump_config
    from rbvl.mixing.context import load_reference
    from rbvl.model import load_model
    from rbvl.train.checkpoint import STATE

    recipe = "recipes/demo_tiny_rnb.yaml"
    ref_cfg = load_config(recipe, [f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'ref'}", "lora.enabled=false"])
    trained, processor = load_model(ref_cfg.model, seed=ref_cfg.seed)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    checkpoint = tmp_path / "ref" / "checkpoint-2"
    trained.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    dump_config(ref_cfg, checkpoint / "config.yaml")
    (checkpoint / STATE).write_bytes(b"")
    cfg = load_config(recipe, [f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'run'}", "mixing.strategy=doremi",
                               f"mixing.reference={tmp_path / 'ref'}"])  # fmt: skip
    reference = load_reference(str(tmp_path / "ref"), cfg, "cpu")
    for (name, got), want in zip(reference.named_parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
