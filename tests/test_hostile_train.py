"""Faults of the run folder and start-time checks of `rbvl train`: full disk, read-only folder, a mixer that would
never change p, a `modules_to_save` entry that matches nothing. Each is one line, and nothing half-written stays."""

import errno
import shutil

import pytest
import torch

from rbvl.config import ConfigError, LoraConfig, ModelConfig, check_runnable, load_config
from rbvl.model import ModelError, apply_lora, load_model
from rbvl.train import checkpoint as ckpt
from rbvl.train import train
from rbvl.train.checkpoint import CheckpointError


def _config(tmp_path, manifest, *overrides):
    return load_config(
        "recipes/demo_tiny_rnb.yaml",
        [
            f"manifest={manifest}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=4",
            "train.batch_size=4",
            "balance.update_every=2",
            "balance.warmup_steps=0",
            "eval.every=0",
            "train.save_every=2",
            "logging.progress=false",
            "logging.plots=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, tiny_manifest, monkeypatch):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):  # torch's zip writer on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 93696 vs 93584")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError) as err:
        train(_config(tmp_path, tiny_manifest))
    message = str(err.value)
    assert message.startswith("cannot write checkpoint-4: no space left on device writing ") and "\n" not in message
    assert "the previous checkpoint is untouched" in message
    run = tmp_path / "run"
    assert not list(run.glob(".tmp-checkpoint-*"))  # nothing half-written stays
    assert ckpt.latest(run) == run / "checkpoint-2"  # and the previous one is still the one a resume takes


def test_a_read_only_output_dir_is_one_line(tmp_path, tiny_manifest, monkeypatch):
    def acquire(folder, what):
        raise OSError(errno.EROFS, "Read-only file system", str(folder / ".rbvl.lock"))

    monkeypatch.setattr(ckpt.runlock, "acquire", acquire)
    with pytest.raises(CheckpointError, match=r"^output_dir=.*: read-only file system writing .*\.rbvl\.lock$"):
        train(_config(tmp_path, tiny_manifest))


@pytest.mark.parametrize(
    "strategy, overrides, key",
    [
        ("odm", ["mixing.odm.update_every=5"], "mixing.odm.update_every: got 5"),
        ("odm", ["mixing.odm.warmup_steps=4"], "first change p at step 5"),
        ("dga", ["mixing.dga.update_every=9"], "mixing.dga.update_every: got 9"),
        ("doremi", ["mixing.doremi.update_every=9", "mixing.reference=x"], "mixing.doremi.update_every: got 9"),
        ("aioli", ["mixing.aioli.lp_steps=8"], "mixing.aioli.lp_steps: got 8"),
    ],
)
def test_a_peer_mixer_that_would_never_change_p_is_refused(tmp_path, strategy, overrides, key):
    cfg = _config(tmp_path, "m.json", f"mixing.strategy={strategy}", *overrides)
    with pytest.raises(ConfigError, match="would be a static mixture") as err:
        check_runnable(cfg)
    assert key in str(err.value) and "max_steps=4" in str(err.value)
    check_runnable(_config(tmp_path, "m.json", f"mixing.strategy={strategy}", *overrides, "max_steps=12"))


def test_modules_to_save_that_match_nothing_are_an_error():
    model, _ = load_model(ModelConfig(name="tiny-llava"))
    with pytest.raises(ModelError, match="lora.modules_to_save: 'merger' matches no module of this model"):
        apply_lora(model, LoraConfig(modules_to_save=["merger"]))
