"""`rbvl validate` says whether this machine has what the run needs, offline and without torch (issue 22): the
manifest reads and its shards exist; model.name is a tiny model (did-you-mean), a save_pretrained folder, or a hub id
in the local Hugging Face cache."""

import subprocess
import sys
from pathlib import Path

import pytest

from rbvl.config import load_config
from rbvl.config.resolve import TINY_MODELS, model_problem, offline_problems

ROOT = Path(__file__).parents[1]
PROBE = """
import sys
from rbvl.cli import main
code = main(sys.argv[1:])
print("exit", code, "torch imported:", "torch" in sys.modules)
"""


def _validate(*args):
    r = subprocess.run([sys.executable, "-c", PROBE, "validate", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return r.stdout.strip().splitlines()[-1], r.stderr.strip()


def test_a_run_this_machine_can_start_is_ok_and_torch_free(tiny_manifest, tmp_path):
    last, err = _validate("recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}")
    assert last == "exit 0 torch imported: False", err
    # an output_dir that already holds a run: rbvl train would refuse it without resume=true, so validate says so
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.pt").write_bytes(b"")
    last, err = _validate("recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'run'}")
    assert last == "exit 2 torch imported: False" and "already holds a run; pass resume=true" in err, err
    last, err = _validate(
        "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'run'}", "resume=true"
    )
    assert last == "exit 0 torch imported: False", err


def test_what_the_machine_lacks_is_one_line_each_without_torch(tmp_path, tiny_manifest):
    missing = "rbvl-test/not-cached-anywhere"
    last, err = _validate("recipes/demo_tiny_rnb.yaml", f"manifest={tmp_path / 'nope.json'}", f"model.name={missing}")
    assert last == "exit 2 torch imported: False"
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, err
    err = errors[0]
    assert f"manifest={tmp_path / 'nope.json'}: manifest not found" in err
    assert f"model.name={missing}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in err
    # a tiny model's name mistyped is a config error, caught with the values (--config-only too)
    last, err = _validate("--config-only", "recipes/demo_tiny_rnb.yaml", "model.name=tiny-lava")
    assert last == "exit 2 torch imported: False"
    assert "model.name: got 'tiny-lava', no such tiny model; did you mean tiny-llava?" in err
    shard = next(Path(tiny_manifest).parent.rglob("*.tar"))
    shard.unlink()
    cfg = load_config("recipes/demo_tiny_rnb.yaml", [f"manifest={tiny_manifest}"])
    (problem,) = offline_problems(cfg)
    assert "shards are missing" in problem and shard.name in problem


def test_model_names(tmp_path, monkeypatch):
    assert all(model_problem(name) is None for name in TINY_MODELS)
    assert "did you mean tiny-qwen2-vl?" in model_problem("tiny-qwen2vl")
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in model_problem(str(tmp_path / "empty"))
    assert "no such folder" in model_problem(str(tmp_path / "smolm2"))
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert "a file, not a save_pretrained folder (a GGUF file: convert" in model_problem(
        str(tmp_path / "model.Q4_1.gguf")
    )
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert model_problem(str(tmp_path / "empty")) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert "not in the local Hugging Face cache" in model_problem("llava-hf/llava-1.5-7b-hf")
    snapshot = tmp_path / "cache" / "models--llava-hf--llava-1.5-7b-hf"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc")
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "config.json").write_text("{}")
    assert model_problem("llava-hf/llava-1.5-7b-hf") is None, "a cached model resolves offline"


def test_the_tiny_list_matches_the_family_table():
    from rbvl.model.families import TINY_FAMILIES

    assert set(TINY_FAMILIES) == set(TINY_MODELS)


@pytest.mark.parametrize("flag", ["--config-only"])
def test_config_only_skips_the_machine_checks(flag):
    last, err = _validate(flag, "recipes/llava15_7b_lora_rnb.yaml")
    assert last == "exit 0 torch imported: False", err


def test_the_recipes_module_names_follow_another_model_unless_given(caplog):
    recipe = "recipes/demo_tiny_rnb.yaml"  # modules_to_save: [multi_modal_projector, vision_tower, ...] for tiny-llava
    assert load_config(recipe, []).lora.modules_to_save[0] == "multi_modal_projector"
    with caplog.at_level("WARNING"):
        cfg = load_config(recipe, ["model.name=tiny-qwen2-vl"])
    assert cfg.lora.modules_to_save is None and cfg.lora.target_modules is None, "the new family's defaults"
    assert "model.name=tiny-qwen2-vl: lora.modules_to_save follows its family, not the recipe's ['multi_modal_projector'" in caplog.text  # fmt: skip
    kept = load_config(recipe, ["model.name=tiny-qwen2-vl", "lora.modules_to_save=[merger]"])
    assert kept.lora.modules_to_save == ["merger"], "set on the command line: kept"
    same = load_config(recipe, ["model.name=tiny-llava"])
    assert same.lora.modules_to_save == load_config(recipe, []).lora.modules_to_save, "the recipe's own model"
    seven_b = "recipes/llava15_7b_lora_rnb.yaml"  # a model of the recipe's family: its modules are this one's too
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiny = load_config(seven_b, ["model.name=tiny-llava"])
    assert tiny.lora.target_modules == load_config(seven_b, []).lora.target_modules and "follows" not in caplog.text
