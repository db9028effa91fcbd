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
        (["lr=1e-3"], "unknown key 'lr' (did you mean 'optim.lr'?)"),
        (["lora.r=eight"], "lora.r: expected int, got 'eight'"),
        (["resume=maybe"], "resume: got 'maybe', expected true, false or force"),
        (
            ["mixing.strategy=rbn"],
            "mixing.strategy: 'rbn' is not one of stratified, natural, manual, rnb, odm, dga, doremi, aioli (did you mean 'rnb'?)",
        ),
        (["balance.update_every=0"], "balance.update_every: got 0, expected an int >= 1"),
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


def test_a_mistake_in_the_recipe_file_names_the_file_one_on_the_command_line_does_not(tmp_path):
    recipe = write(tmp_path, "balance:\n  update_evey: 3\n")
    for overrides in ([], ["max_steps=5"]):
        with pytest.raises(ConfigError) as e:
            load_config(recipe, overrides)
        assert str(e.value).startswith(f"{recipe}: unknown key 'balance.update_evey' (did you mean")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "max_steps: 5\n"), ["balance.lamda=3"])
    assert str(e.value).startswith("unknown key 'balance.lamda'")


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["balance.lam=5", "mixing.weights={a: 1}", "mixing.strategy=manual"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_field_is_documented():
    rows = describe()
    keys = [r[0] for r in rows]
    assert "balance.lam" in keys and "manifest" in keys and "output_dir" in keys
    docs = dict((r[0], r[3]) for r in rows)
    assert "λ" in docs["balance.lam"]
    assert not [k for k, doc in docs.items() if not doc], "every key has an attribute docstring"
    assert "train.compile" not in keys  # removed: it was never used


# Every value a user can mistype, with the line it must give (key, value, what is allowed).
BAD_VALUES = [
    ("train.batch_size=0", "train.batch_size: got 0, expected an int >= 1"),
    ("train.grad_accum=0", "train.grad_accum: got 0, expected an int >= 1"),
    ("data.overlong=typo", "data.overlong: 'typo' is not one of truncate, drop"),
    ("balance.lam=-1", "balance.lam: got -1.0, expected a number >= 0"),
    ("train.log_every=0", "train.log_every: got 0, expected an int >= 1"),
    ("optim.lr=-0.001", "optim.lr: got -0.001, expected a number > 0"),
    ("data.max_length=0", "data.max_length: got 0, expected an int >= 2"),
    ("data.num_workers=-1", "data.num_workers: got -1, expected an int >= 0"),
    ("data.prefetch_factor=0", "data.prefetch_factor: got 0, expected an int >= 1"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer: got -5"),
    ("max_steps=0", "max_steps: got 0, expected an int >= 1"),
    ("max_steps=2.5", "max_steps: expected int, got 2.5"),
    ("seed=-1", "seed: got -1, expected an int >= 0"),
    ("output_dir=''", "output_dir: got ''"),
    ("model.dtype=fp32", "model.dtype: 'fp32' is not one of float32, bfloat16, float16"),
    ("model.attn_implementation=flash", "model.attn_implementation: got 'flash'"),
    ("lora.r=0", "lora.r: got 0, expected an int >= 1"),
    ("lora.lora_alpha=0", "lora.lora_alpha: got 0"),
    ("lora.lora_dropout=1", "lora.lora_dropout: got 1.0, expected a number in [0, 1)"),
    ("lora.target_modules=(q_proj", "lora.target_modules: got '(q_proj', not a valid regex"),
    ("lora.target_modules=[]", "lora.target_modules: got [], expected at least one module name"),
    ("mixing.strategy=manual", "mixing.weights: got {}, expected at least one domain with a positive weight"),
    ("mixing.weights={a: -1}", "mixing.weights: got {'a': -1.0}, expected non-negative weights"),
    ("balance.update_every=-3", "balance.update_every: got -3"),
    ("balance.warmup_steps=-1", "balance.warmup_steps: got -1"),
    ("balance.floor=1", "balance.floor: got 1.0, expected a number in [0, 1)"),
    ("balance.smoothing=1", "balance.smoothing: got 1.0, expected a number in [0, 1)"),
    ("balance.lam=inf", "balance.lam: got 'inf', expected a finite number"),
    ("optim.lr=0", "optim.lr: got 0.0, expected a number > 0"),
    ("optim.lr=.nan", "optim.lr: got nan, expected a finite number"),
    ("optim.lr=nan", "optim.lr: got 'nan', expected a finite number"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: got -0.1"),
    ("optim.betas=[0.9]", "optim.betas: got [0.9], expected two numbers in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: got [0.9, 1.0]"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: got -1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: got 2.0, expected a number in [0, 1]"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm: got -1.0"),
    ("optim.fused=sometimes", "optim.fused: expected bool"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
    ("train.save_every=-1", "train.save_every: got -1"),
    ("train.device=gpu", "train.device: got 'gpu', expected auto, cpu, mps, cuda or cuda:N"),
    ("eval.every=-1", "eval.every: got -1"),
    ("eval.batch_size=0", "eval.batch_size: got 0"),
    ("eval.max_samples=-1", "eval.max_samples: got -1"),
    ("logging.plots=maybe", "logging.plots: expected bool"),
    ("resume=2", "resume: got '2', expected true, false or force"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_every_number_field_has_a_range():
    import dataclasses

    from rbvl.config import _hints, allowed_text

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint in (int, float):
                yield f"{prefix}{f.name}", allowed_text(f, hint)

    for key, text in walk(RunConfig):
        assert any(op in text for op in (">", "<", "[", "(")), f"{key} has no range: {text}"


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optim.lr=1e-3", "optim.lr", 1e-3),
        ("optim.lr=1E-3", "optim.lr", 1e-3),
        ("optim.lr=.5", "optim.lr", 0.5),
        ("optim.lr=5", "optim.lr", 5.0),
        ("optim.lr=+2.5e-4", "optim.lr", 2.5e-4),
        ("max_steps=1_000", "max_steps", 1000),
        ("max_steps=1e3", "max_steps", 1000),
        ("max_steps=20.0", "max_steps", 20),
        ("max_steps=0x10", "max_steps", 16),
        ("resume=yes", "resume", True),
        ("resume=No", "resume", False),
        ("resume=1", "resume", True),
        ("resume=0", "resume", False),
        ("resume=on", "resume", True),
        ("output_dir=2024", "output_dir", "2024"),
    ],
)
def test_numbers_and_bools_in_every_notation(override, key, value):
    cfg = load_config(None, [override])
    got = cfg
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


def test_checked_when_built_in_python_too():
    from rbvl.config import TrainConfig

    with pytest.raises(ConfigError, match="train.batch_size: got 0"):
        TrainConfig(batch_size=0)
    assert TrainConfig(batch_size="4").batch_size == 4


def test_removed_key_of_an_old_run_is_ignored(tmp_path, caplog):
    cfg = load_config(write(tmp_path, "train:\n  compile: false\n  batch_size: 3\n"))
    assert cfg.train.batch_size == 3 and not hasattr(cfg.train, "compile")
    assert "train.compile" in caplog.text


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe):
    load_config(recipe)
    assert recipe.read_text().startswith("#"), "a recipe opens with a comment saying what it trains and how to run it"


def test_there_are_recipes():
    names = {r.name for r in RECIPES}
    assert "demo_tiny_rnb.yaml" in names


# `python -m rbvl.cli ARGS` in a fresh interpreter, which then says whether torch was imported along the way.
NO_TORCH_PROBE = """
import runpy, sys
sys.argv = ["rbvl", *sys.argv[1:]]
try:
    runpy.run_module("rbvl.cli", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "args",
    [[], ["validate", "--config-only", "recipes/demo_tiny_rnb.yaml"], ["validate", "--help-config", "x"], ["--help"]],
)
def test_config_and_validate_never_import_torch(args):
    """`rbvl validate` and `--help` stay instant: neither the config package nor the CLI's path to it imports torch."""
    root = Path(__file__).parents[1]
    code = "import sys, rbvl.config; print('torch imported:', 'torch' in sys.modules)" if not args else NO_TORCH_PROBE
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("torch imported: False"), r.stdout[-500:]


def test_cli_validate_one_clear_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "rbvl.cli", *args], capture_output=True, text=True)

    ok = run("validate", "--config-only", *map(str, RECIPES))  # `rbvl validate --config-only recipes/*.yaml`
    assert ok.returncode == 0 and ok.stdout.count(": ok") == len(RECIPES)
    for args, text in [
        (("validate", str(tmp_path / "nope.yaml")), "recipe not found"),
        (("validate", str(RECIPES[0]), "balance.lamda=1"), "did you mean 'balance.lam'"),
        (("validate", str(RECIPES[0]), "max_steps=ten"), "max_steps: expected int"),
        (("validate", str(RECIPES[0]), "train.batch_size=0"), "train.batch_size: got 0"),
        (("train", str(RECIPES[0]), "train.batch_size=0"), "train.batch_size: got 0"),  # train and validate agree
        (("validate", str(RECIPES[0]), "model.name=tiny-lava"), "did you mean tiny-llava?"),
        (("train",), "give a recipe"),
    ]:
        r = run(*args)
        assert r.returncode != 0
        assert r.stderr.strip().count("\n") == 0, r.stderr
        assert text in r.stderr


def test_parallel_keys_give_one_line():
    from rbvl.config import check_runnable

    assert load_config(None, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    assert load_config(None, []).train.parallel == "ddp"
    with pytest.raises(ConfigError, match=r"^train.parallel: 'zero3' is not one of ddp, fsdp") as e:
        load_config(None, ["train.parallel=zero3"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.fsdp_cpu_offload: got true with train.parallel=ddp"):
        load_config(None, ["train.fsdp_cpu_offload=true"])
    with pytest.raises(ConfigError, match="train.fsdp_cpu_offload: got true with train.device=cpu, expected a GPU"):
        load_config(None, ["train.parallel=fsdp", "train.fsdp_cpu_offload=true", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.fsdp_precision: 'fp8' is not one of auto, bf16, fp32"):
        load_config(None, ["train.fsdp_precision=fp8"])
    cfg = load_config(None, ["train.parallel=fsdp", "mixing.strategy=dga", "max_steps=10", "balance.update_every=5"])
    with pytest.raises(ConfigError, match="mixing.strategy: got dga with train.parallel=fsdp, expected rnb, odm"):
        check_runnable(cfg)


def test_overrides_after_an_option_count_and_a_recipe_key_given_as_a_flag_is_pointed_out(capsys):
    from rbvl.cli import main

    assert main(["validate", "recipes/demo_tiny_rnb.yaml", "--config-only", "max_steps=200", "optim.lr=1e-3"]) == 0
    assert main(["validate", "recipes/demo_tiny_rnb.yaml", "--config-only", "lr=1e-3"]) == 2
    assert "unknown key 'lr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["validate", "--config-only", "recipes/demo_tiny_rnb.yaml", "--max_steps", "3"])
    assert e.value.code == 2
    assert (
        "unrecognized arguments: --max_steps 3 (recipe keys go as key=value: max_steps=...)" in capsys.readouterr().err
    )
