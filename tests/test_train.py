"""`rbvl train` end to end on the tiny model: the run folder, Balance moving p, exact resume, the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

from rbvl.config import load_config
from rbvl.train import train
from rbvl.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def config(tmp_path, manifest, *overrides):
    return load_config(
        "recipes/demo_tiny_rnb.yaml",
        [
            f"manifest={manifest}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=20",
            "train.batch_size=6",
            "balance.update_every=5",
            "balance.warmup_steps=0",
            "balance.lam=10",
            "eval.every=10",
            "train.log_every=5",
            "train.save_every=10",
            "data.num_workers=0",
            "logging.progress=false",
            *overrides,
        ],
    )


def test_rnb_run_folder_holds_everything(tmp_path, tiny_manifest, capsys):
    summary = train(config(tmp_path, tiny_manifest))
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "proportions.png", "eval_loss.png", "gram.png", "base_model"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir()), "TensorBoard events"
    ck = run / "checkpoint-20"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "trainer_state.pt",
        "rbvl_state.json",
    ):
        assert (ck / name).exists(), name
    assert (run / "checkpoint-10").exists()
    state = json.loads((ck / "rbvl_state.json").read_text())
    assert len(state["balance"]["schedule"]["p"]) == 1 + 4  # the initial p, then updates at steps 5, 10, 15, 20
    assert (ck / "rank-000.pt").exists()

    balance = read_metrics(run, "balance")
    assert [r["step"] for r in balance] == [5, 10, 15, 20]
    p = balance[-1]["p"]
    assert abs(sum(p) - 1) < 1e-6 and min(p) >= 0
    assert max(abs(x - 1 / 3) for x in p) > 0.02, f"p stayed uniform: {p}"
    evals = read_metrics(run, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    assert all(x is not None for x in evals[-1]["loss_per_domain"])
    assert summary["eval"]["loss"] == evals[-1]["loss"]

    # `rbvl eval` reloads the checkpoint (base + adapter) and finds the same per-domain losses
    from rbvl.evaluate import evaluate_run

    again = evaluate_run(run)
    assert again["loss_per_domain"] == pytest.approx(evals[-1]["loss_per_domain"], rel=1e-5)
    from rbvl import cli

    assert (
        cli.main(["eval", str(run), "--checkpoint", "20", "-v"]) == 0
    )  # the flag its help names; -v after the command
    assert cli.main(["eval", str(run), "--checkpoint", "7"]) == 2
    assert cli.main(["eval", str(tmp_path / "runn")]) == 2
    assert f"no run folder {tmp_path / 'runn'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rule",
    [
        ("balance.update=mirror", "balance.eta=1", "balance.gram_ema=0.5", "balance.gram=shrunk"),
        ("balance.update=mirror", "balance.gram=unbiased", "balance.pull=0.1", "balance.temperature=sqrt_m"),
        ("balance.paper=true",),
    ],
    ids=["mirror-shrunk-ema", "mirror-unbiased-pull", "paper"],
)
def test_resume_mid_window_is_exact(tmp_path, tiny_manifest, rule):
    """Checkpoint-10 falls inside a Balance window (K = 4) and inside a log window (every 4), with LoRA dropout on; the
    update carries state across windows (Ḡ of gram_ema; mirror steps from the previous p, pulled to the start); G is
    the shrunk, unbiased or plug-in one."""
    mid = ("balance.update_every=4", "train.log_every=4", "lora.lora_dropout=0.1", "data.num_workers=1", *rule)
    full = train(config(tmp_path / "a", tiny_manifest, *mid))
    # A run that stopped after checkpoint-10: same config, resumed to the end.
    run_b = tmp_path / "b" / "run"
    run_b.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "run" / "checkpoint-10", run_b / "checkpoint-10")
    resumed = train(config(tmp_path / "b", tiny_manifest, "resume=true", *mid))
    assert resumed["proportions"] == full["proportions"]
    assert resumed["eval"]["loss_per_domain"] == full["eval"]["loss_per_domain"]
    a = read_metrics(tmp_path / "a" / "run")
    b = read_metrics(run_b)
    keys = [("train", "loss"), ("train", "loss_per_domain"), ("balance", "gram"), ("balance", "p")]
    for kind, key in [*keys, ("balance", "gram_ema"), ("balance", "grad_norm"), ("balance", "gram_noise")]:
        after = [(r["step"], r.get(key)) for r in a if r["kind"] == kind and r["step"] > 10]
        assert after and after == [(r["step"], r.get(key)) for r in b if r["kind"] == kind and r["step"] > 10], (
            kind,
            key,
        )


def test_refuses_to_overwrite_a_run(tmp_path, tiny_manifest, capsys):
    cfg = config(tmp_path, tiny_manifest, "max_steps=2", "train.save_every=0", "eval.every=0", "balance.update_every=2")
    train(cfg)
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg)
    again = ("max_steps=2", "train.save_every=0", "eval.every=0", "balance.update_every=2", "resume=true")
    capsys.readouterr()
    done = train(config(tmp_path, tiny_manifest, *again))
    assert done["eval"]["loss"] > 0, "resuming a finished run evaluates and returns"
    said = capsys.readouterr().err
    assert (
        f"resumed from {tmp_path / 'run' / 'checkpoint-2'} at step 2, already at max_steps=2: nothing to train" in said
    )


def test_cli_train_stratified(tmp_path, tiny_manifest):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rbvl.cli",
            "train",
            "recipes/demo_tiny_rnb.yaml",
            "mixing.strategy=stratified",  # the baseline arm of `make demo`: one recipe, one override
            f"manifest={tiny_manifest}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=4",
            "train.batch_size=4",
            "logging.progress=false",
            "data.num_workers=1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "eval @ 4" in r.stdout + r.stderr
    assert not read_metrics(tmp_path / "run", "balance"), "stratified never updates p"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rbvl.cli",
            "train",
            "recipes/demo_tiny_rnb.yaml",
            f"manifest={tmp_path / 'nope.json'}",
            f"output_dir={tmp_path / 'r2'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "nope.json" in bad.stderr
    cli = [sys.executable, "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}"]
    untracked = subprocess.run(
        [*cli, f"output_dir={tmp_path / 'r3'}", "balance.params=xyz", "max_steps=120", "logging.progress=false"],
        capture_output=True,
        text=True,
    )  # a pattern over module names that names none: one line, as a LoRA target that names none
    assert untracked.returncode == 2 and "Traceback" not in untracked.stderr, untracked.stderr[-2000:]
    assert "rbvl: error: balance.params: pattern 'xyz' matches no nn.Linear module of this model" in untracked.stderr


def test_the_loops_window_is_the_token_mean_gradient_of_what_it_drew(tmp_path, tiny_manifest):
    """`rbvl train`'s tracker (checkpointed mid-window) against plain autograd of each domain's token-mean loss over
    the very micro-batches the stream drew: grad_accum 2, mixed batches, domains of different answer lengths."""
    import torch

    from rbvl.balance import ProportionSchedule, select_modules
    from rbvl.data import MixtureStream, load_domains
    from rbvl.data.collate import Encoder
    from rbvl.evaluate import causal_lm_token_loss
    from rbvl.mixing import initial_proportions
    from rbvl.model import apply_lora, load_model

    cfg = config(
        tmp_path, tiny_manifest, "max_steps=3", "train.save_every=2", "train.grad_accum=2", "train.batch_size=4",
        "balance.update_every=3", "balance.warmup_steps=0", "optim.lr=0.000000000001", "optim.max_grad_norm=0",
        "eval.every=0", "lora.lora_dropout=0",
    )  # fmt: skip
    train(cfg)
    window = torch.load(tmp_path / "run" / "checkpoint-2" / "rank-000.pt", weights_only=True)["tracker"]

    # the same model and the same four micro-batches, rebuilt from the config
    domains = load_domains(cfg.manifest)
    model, processor = load_model(cfg.model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = apply_lora(model, cfg.lora)
    model.train()
    stream = MixtureStream(
        domains, ProportionSchedule(3, initial=initial_proportions("rnb", domains)), batch_size=4,
        collate=Encoder(processor, max_length=cfg.data.max_length), seed=cfg.seed, grad_accum=2,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )  # fmt: skip
    batches = [b for _, b in zip(range(4), stream)]
    weights = [mod.weight for _, mod in select_modules(model, "lora")]
    for d in range(3):
        tokens = sum(int(meta.label_tokens[meta.domain_ids == d].sum()) for _, meta in batches)
        assert tokens == window["tokens"][d]
        if tokens == 0:
            continue
        loss = 0
        for inputs, meta in batches:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            per_sample = causal_lm_token_loss(model(**inputs).logits, labels).sum(1)
            loss = loss + per_sample[meta.domain_ids == d].sum()
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss / tokens, weights)])
        got = torch.cat([s[d].flatten() for s in window["sums"]]) / tokens
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-7)
