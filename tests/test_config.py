"""Config: defaults ← YAML ← key=value, and one clear line for every mistake."""

import subprocess
import sys
from pathlib import Path

import pytest

from rbvl.config import ConfigError, RunConfig, describe, dump_config, load_config, read_yaml

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "max_steps: 50\nbalance:\n  lam: 2.0\n  update_every: 5\n")
    cfg = load_config(path, ["balance.lam=4", "lora.r=16", "mixing.strategy=stratified"])
    assert cfg.max_steps == 50  # from YAML
    assert cfg.balance.update_every == 5  # from YAML
    assert cfg.balance.lam == 4.0 and isinstance(cfg.balance.lam, float)  # override wins, int coerced to float
    assert cfg.lora.r == 16
    assert cfg.mixing.strategy == "stratified"
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched default


def test_override_values_are_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "lora.target_modules=[q_proj, v_proj]",
            "resume=true",
            "mixing.strategy=manual",
            "mixing.weights={cluster_000: 2, cluster_001: 1}",
        ],
    )
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.resume is True
    assert cfg.mixing.weights == {"cluster_000": 2.0, "cluster_001": 1.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["balance.lamda=3"], "unknown key 'balance.lamda' (did you mean 'balance.lam'?)"),
        (["max_step=3"], "unknown key 'max_step' (did you mean 'max_steps'?)"),
        (["lora.r=eight"], "lora.r: expected int, got 'eight'"),
        (["resume=maybe"], "resume: expected bool"),
        (
            ["mixing.strategy=rbn"],
            "mixing.strategy: 'rbn' is not one of stratified, natural, manual, rnb, odm, dga, doremi, aioli (did you mean 'rnb'?)",
        ),
        (["balance.update_every=0"], "balance.update_every must be positive"),
        (["max_steps"], "is not key=value"),
        (["train.precision=fp8"], "train.precision"),
    ],
)
def test_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a section"):
        load_config(write(tmp_path, "balance: 3\n"))
    with pytest.raises(ConfigError, match="unknown key 'balance.lr'"):
        load_config(write(tmp_path, "balance:\n  lr: 3\n"))


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["balance.lam=5", "mixing.weights={a: 1}", "mixing.strategy=manual"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_field_is_documented_or_self_explanatory():
    rows = describe()
    keys = [r[0] for r in rows]
    assert "balance.lam" in keys and "manifest" in keys and "output_dir" in keys
    docs = dict((r[0], r[3]) for r in rows)
    assert "λ" in docs["balance.lam"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe):
    load_config(recipe)
    assert recipe.read_text().startswith("#"), "a recipe opens with a comment saying what it trains and how to run it"


def test_there_are_recipes():
    names = {r.name for r in RECIPES}
    assert {"demo_tiny_rnb.yaml", "demo_tiny_stratified.yaml"} <= names


def test_cli_validate_one_clear_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "rbvl.cli", *args], capture_output=True, text=True)

    ok = run("validate", *map(str, RECIPES))  # `rbvl validate recipes/*.yaml`
    assert ok.returncode == 0 and ok.stdout.count(": ok") == len(RECIPES)
    for args, text in [
        (("validate", str(tmp_path / "nope.yaml")), "recipe not found"),
        (("validate", str(RECIPES[0]), "balance.lamda=1"), "did you mean 'balance.lam'"),
        (("validate", str(RECIPES[0]), "max_steps=ten"), "max_steps: expected int"),
    ]:
        r = run(*args)
        assert r.returncode != 0
        assert r.stderr.strip().count("\n") == 0, r.stderr
        assert text in r.stderr
