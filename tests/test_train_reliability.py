"""What a cluster does to a run: strict metrics, divergence, silent no-ops, preemption (issue 20, training side)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rbvl.config import ConfigError, load_config
from rbvl.data import DataError
from rbvl.train import train
from rbvl.train.guard import Diverged, Preempted
from rbvl.train.metrics import MetricsLogger, read_metrics


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"bare {name} in a metrics line")

    return json.loads(line, parse_constant=refuse)


def test_metrics_are_strict_json_at_any_depth(tmp_path):
    metrics = MetricsLogger(tmp_path, ["a", "b"], report_to=[])
    nan, inf = float("nan"), float("inf")
    metrics.log(
        "balance",
        3,
        gram=[[nan, 1.0], [inf, -inf]],
        loss_per_domain=torch.tensor([nan, 2.0]),
        nested={"x": (nan, 1)},
        loss=nan,
    )
    row = _strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["gram"] == [[None, 1.0], [None, None]]
    assert row["loss_per_domain"][0] is None and math.isclose(row["loss_per_domain"][1], 2.0)
    assert row["nested"] == {"x": [None, 1]} and row["loss"] is None


def _config(tmp_path, manifest, *overrides):
    return load_config(
        "recipes/demo_tiny_rnb.yaml",
        [
            f"manifest={manifest}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=12",
            "train.batch_size=4",
            "balance.update_every=3",
            "balance.warmup_steps=0",
            "eval.every=0",
            "train.log_every=1",
            "train.save_every=4",
            "data.num_workers=0",
            "logging.progress=false",
            "logging.plots=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_divergence_skips_the_step_stops_the_run_and_never_saves_nan(tmp_path, tiny_manifest):
    # (at lr=1e3 the tiny model saturates to a finite, constant loss; 1e10 breaks its forward from step 2 on)
    cfg = _config(
        tmp_path, tiny_manifest, "optim.lr=1e10", "optim.warmup_steps=0", "max_steps=30", "train.save_every=1"
    )
    with pytest.raises(Diverged, match=r"training diverged at step \d+: .* optim.lr=1e\+10 too high") as err:
        train(cfg)
    assert str(err.value).count("\n") == 0
    run = tmp_path / "run"
    for ck in run.glob("checkpoint-*"):
        saved = torch.load(ck / "trainer_state.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in saved["trainable"].values()), ck.name
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _strict(line)
    step = int(str(err.value).split("at step ")[1].split(":")[0])
    assert step < 30, "the run stopped early"
    # the 3 steps in a row were skipped (their weights stay the last finite ones, saved at steps 1 .. step - 1)
    assert max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == step - 1
    rows = map(_strict, (run / "metrics.jsonl").read_text().splitlines())
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert losses[step - 1] is None and losses[step - 2] is None and losses[1] is not None
    # the streak is part of the checkpoint: a resume from step - 1 (2 skipped in a row) stops at its next bad step
    state = json.loads((run / f"checkpoint-{step - 1}" / "rbvl_state.json").read_text())
    assert state["nonfinite_in_a_row"] == 2
    with pytest.raises(Diverged, match=rf"training diverged at step {step}: .* for 3 steps in a row"):
        train(_config(tmp_path, tiny_manifest, "optim.lr=1e10", "optim.warmup_steps=0", "max_steps=30",
                      "train.save_every=1", "resume=true"))  # fmt: skip


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send `signum` to this process when the train row of `step` is logged (mid-step, before the checkpoint)."""
    log = MetricsLogger.log

    def log_then_signal(self, kind, at, **values):
        log(self, kind, at, **values)
        if kind == "train" and at == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_step_and_the_resumed_run_equals_the_uninterrupted_one(
    tmp_path, tiny_manifest, monkeypatch, signum
):
    mid = ("lora.lora_dropout=0.1", "train.log_every=1", "train.save_every=0")
    full = train(_config(tmp_path / "a", tiny_manifest, *mid))
    before = signal.getsignal(signum)
    _signal_at(monkeypatch, 5, signum)  # step 5: inside a Balance window (K = 3)
    with pytest.raises(Preempted) as err:
        train(_config(tmp_path / "b", tiny_manifest, *mid))
    name = signal.Signals(signum).name
    assert str(err.value) == f"rbvl train: stopped by {name} at step 5; checkpoint-5 written; resume with resume=true"
    assert err.value.exit_code == 128 + signum
    run_b = tmp_path / "b" / "run"
    assert sorted(p.name for p in run_b.glob("checkpoint-*")) == ["checkpoint-5"]
    assert signal.getsignal(signum) == before, "train() puts the previous handler back"
    monkeypatch.undo()
    resumed = train(_config(tmp_path / "b", tiny_manifest, *mid, "resume=true"))
    assert resumed["eval"]["loss_per_domain"] == full["eval"]["loss_per_domain"]
    assert resumed["proportions"] == full["proportions"]
    a, b = read_metrics(tmp_path / "a" / "run", "train"), read_metrics(run_b, "train")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process", "group"])
def test_cli_sigterm_finishes_the_step_writes_a_checkpoint_and_says_so(tmp_path, tiny_manifest, to):
    """`to`: SIGTERM to the training process alone (kill PID), or to every process of the run, its DataLoader
    workers too, as SLURM's srun and Kubernetes send it."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}"]
    args += [f"output_dir={run}", "max_steps=2000", "train.batch_size=4", "train.log_every=1", "data.num_workers=2"]
    args += ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "eval.every=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not read_metrics(run, "train") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, errs = proc.communicate(timeout=240)
    lines = errs.strip().splitlines()
    assert proc.returncode == 143, errs[-2000:]
    step = read_metrics(run, "train")[-1]["step"]
    assert (
        lines[-1]
        == f"rbvl train: stopped by SIGTERM at step {step}; checkpoint-{step} written; resume with resume=true"
    )
    assert (run / f"checkpoint-{step}" / "trainer_state.pt").exists()
    assert not list(run.glob(".tmp-*"))


IMAGE_ONLY = ("mixing.strategy=manual", "mixing.weights={cluster_000: 1}")  # the tiny set's image domain alone


@pytest.mark.slow
def test_cli_every_sample_dropped_stops_with_the_length_it_needs(tmp_path, tiny_manifest):
    """Image-only data with data.max_length=16 (the image tokens end at 19) used to redraw forever, silently."""
    args = [sys.executable, "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}"]
    args += [f"output_dir={tmp_path / 'run'}", "max_steps=5", "data.max_length=16", "data.num_workers=1", *IMAGE_ONLY]
    r = subprocess.run([*args, "logging.progress=false"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # (a worker's traceback is cut down to its message)
    assert last.startswith("rbvl: error: none of the first 8 samples of cluster_000 (train), cluster_000 (eval)"), (
        r.stderr[-2000:]
    )
    assert "image tokens 19 > data.max_length 16 and the answers start after data.max_length 16" in last
    assert "set data.max_length >= 35" in last  # keeps the image and the first answer token
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_every_answer_cut_off_stops_instead_of_training_on_no_labels(tmp_path, tiny_manifest):
    cfg = _config(tmp_path, tiny_manifest, "data.max_length=30", "max_steps=40", *IMAGE_ONLY)
    with pytest.raises(DataError, match=r"answers start after data.max_length 30 .*set data.max_length >= 35"):
        train(cfg)


def test_balance_that_would_never_update_is_refused_at_validate_and_train(tmp_path, capsys):
    """The demo recipe (warmup 60, update_every 60) with max_steps=60 used to train as stratified, silently."""
    from rbvl.cli import main

    assert main(["validate", "--config-only", "recipes/demo_tiny_rnb.yaml", "max_steps=60"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("rbvl: error: balance.update_every: got 60, with balance.warmup_steps=60 the first update")
    assert "set balance.warmup_steps=0 and balance.update_every <= 60 (or max_steps >= 120)" in err
    with pytest.raises(ConfigError, match="Balance would never run; set balance.update_every <= 15"):
        train(
            load_config(
                "recipes/demo_tiny_rnb.yaml", ["max_steps=20", "balance.warmup_steps=5", "balance.update_every=16"]
            )
        )
    assert (
        main(["validate", "--config-only", "recipes/demo_tiny_rnb.yaml", "max_steps=120"]) == 0
    )  # the first update at step 120
    assert (
        main(["validate", "--config-only", "recipes/demo_tiny_rnb.yaml", "max_steps=60", "mixing.strategy=stratified"])
        == 0
    )


SIGNAL_HOOK = """
import os, signal
from rbvl.train import metrics

_log = metrics.MetricsLogger.log


def _log_then_signal(self, kind, step, **values):
    _log(self, kind, step, **values)
    if kind == "train" and step == {step} and os.environ.get("RANK", "0") == "{rank}":
        os.kill(os.getpid(), signal.SIGTERM)


metrics.MetricsLogger.log = _log_then_signal
"""


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_when_one_gets_sigterm_and_resume_exactly(tmp_path, tiny_manifest):
    """Only rank 1 gets SIGTERM (at step 5): the flag's all-reduce stops both ranks at step 5, each writes its part."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGNAL_HOOK.format(step=5, rank=1))

    def torchrun(out, *extra, env=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rbvl.cli"]
        cmd += ["train", "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}", f"output_dir={out}"]
        cmd += ["max_steps=8", "train.batch_size=4", "balance.update_every=3", "balance.warmup_steps=0"]
        cmd += ["eval.every=0", "train.log_every=1", "data.num_workers=0", "logging.progress=false"]
        cmd += ["logging.plots=false", "logging.tensorboard=false", "lora.lora_dropout=0.1", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    full = torchrun(tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", ""), os.getcwd()])
    stopped = torchrun(tmp_path / "b", env={**os.environ, "PYTHONPATH": path})
    assert stopped.returncode != 0
    line = "rbvl train: stopped by SIGTERM at step 5; checkpoint-5 written; resume with resume=true"
    assert stopped.stderr.count(line) == 1, stopped.stderr[-3000:]  # said once, by rank 0, for both ranks
    ck = tmp_path / "b" / "checkpoint-5"
    assert (ck / "rank-000.pt").exists() and (ck / "rank-001.pt").exists() and (ck / "trainer_state.pt").exists()
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-5"]
    resumed = torchrun(tmp_path / "b", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for kind, key in (("balance", "p"), ("train", "loss_per_domain"), ("eval", "loss_per_domain")):
        rows_a = [(r["step"], r[key]) for r in a if r["kind"] == kind]
        assert rows_a and rows_a == [(r["step"], r[key]) for r in b if r["kind"] == kind], (kind, key)

    # a folder another live run holds: every rank stops for rank 0's reason (rank 1 once said "already holds a run")
    from rbvl.runtime import runlock

    runlock.acquire(tmp_path / "a", "a test")
    try:
        locked = torchrun(tmp_path / "a")
    finally:
        runlock.release(tmp_path / "a")
    errors = [line for line in locked.stderr.splitlines() if line.startswith("rbvl: error:")]
    assert locked.returncode != 0 and len(errors) == 2, locked.stderr[-3000:]
    assert all("is in use by another run" in line for line in errors), errors


@pytest.mark.slow
def test_resume_checks_what_it_resumes(tmp_path, tiny_manifest):
    from rbvl.data.synthetic import write_tiny_manifest
    from rbvl.train.checkpoint import CheckpointError

    base = ("max_steps=2", "balance.update_every=2", "train.save_every=2")
    train(_config(tmp_path, tiny_manifest, *base))
    run = tmp_path / "run"
    first_config = (run / "config.yaml").read_text()
    longer = ("max_steps=4", "train.save_every=2", "resume=true")
    with pytest.raises(CheckpointError, match=r"written by another run: balance.update_every 2 → 1; .*resume=force"):
        train(_config(tmp_path, tiny_manifest, *longer, "balance.update_every=1"))
    with pytest.raises(CheckpointError) as e:  # the stream resumes per loader worker: force is not offered
        train(_config(tmp_path, tiny_manifest, *longer, "balance.update_every=2", "data.num_workers=1"))
    assert "data.num_workers 0 → 1; resume with the same settings (data.num_workers cannot change" in str(e.value)
    assert "resume=force" not in str(e.value)
    other = write_tiny_manifest(tmp_path / "other", n_train=30)  # another regroup output, the same k
    with pytest.raises(CheckpointError, match=r"another run: manifest=.*other.* \(other content\); .*resume=force"):
        train(_config(tmp_path, other, *longer, "balance.update_every=2"))
    one = write_tiny_manifest(tmp_path / "one", n_domains=1)
    with pytest.raises(CheckpointError, match=r"was trained on 3 domains, manifest=.* has 1: resume with the manifest"):
        train(_config(tmp_path, one, "max_steps=4", "balance.update_every=2", "resume=force"))
    assert (run / "config.yaml").read_text() == first_config, "the first run's config.yaml is kept"
    assert not list(run.glob("config-resume-*")), "a refused resume leaves no config of its own"

    train(_config(tmp_path, tiny_manifest, *longer, "balance.update_every=1", "resume=force"))
    assert (run / "checkpoint-4").exists()
    assert "update_every: 1" in (run / "config-resume-2.yaml").read_text()
    assert (run / "config.yaml").read_text() == first_config

    # a checkpoint written before fingerprints (no key in rbvl_state.json) still resumes
    state_file = run / "checkpoint-4" / "rbvl_state.json"
    state = json.loads(state_file.read_text())
    assert state["fingerprint"]["keys"]["balance.update_every"] == 1
    del state["fingerprint"]
    state_file.write_text(json.dumps(state))
    train(_config(tmp_path, tiny_manifest, "max_steps=5", "balance.update_every=2", "resume=true"))


def test_a_key_newer_than_the_checkpoint_counts_at_its_default(tmp_path, tiny_manifest):
    """A checkpoint from an rbvl without `balance.pull` resumes when pull keeps its default, and says why not else."""
    from rbvl.train.checkpoint import CheckpointError, check_same_run, fingerprint

    saved = {"fingerprint": fingerprint(_config(tmp_path, tiny_manifest))}
    del saved["fingerprint"]["keys"]["balance.pull"]
    check_same_run(tmp_path, saved, _config(tmp_path, tiny_manifest, "balance.pull=0"), 3)
    with pytest.raises(CheckpointError, match=r"balance.pull \(new since this checkpoint; default 0.0\) → 0.3"):
        check_same_run(tmp_path, saved, _config(tmp_path, tiny_manifest, "balance.pull=0.3"), 3)
    with pytest.raises(CheckpointError, match=r"written by another run: balance.eta 0.5 → 0.7"):
        check_same_run(tmp_path, saved, _config(tmp_path, tiny_manifest, "balance.eta=0.7"), 3)


def test_cli_shows_divergence_and_preemption_as_one_line(monkeypatch, capsys):
    import rbvl.train as train_package
    from rbvl import cli

    for error, code, line in (
        (Diverged("training diverged at step 8: ..."), 2, "rbvl: error: training diverged at step 8: ..."),
        (Preempted(signal.SIGTERM, 7, "checkpoint-7"), 143, "rbvl train: stopped by SIGTERM at step 7; checkpoint-7"),
        (Preempted(signal.SIGINT, 7, "checkpoint-7"), 130, "rbvl train: stopped by SIGINT at step 7; checkpoint-7"),
    ):

        def fail(cfg, error=error):
            raise error

        monkeypatch.setattr(train_package, "train", fail)
        assert cli.main(["train", "recipes/demo_tiny_rnb.yaml", "manifest=nowhere.json"]) == code
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err
        monkeypatch.setenv("RANK", "1")  # under torchrun: a stop is every rank's, and rank 0 says it
        assert cli.main(["train", "recipes/demo_tiny_rnb.yaml", "manifest=nowhere.json"]) == code
        assert capsys.readouterr().err == ("" if code != 2 else err)
        monkeypatch.delenv("RANK")


def test_a_second_signal_stops_at_once_and_says_no_checkpoint_was_written():
    """The second SIGTERM ended the run silently (exit 143 and nothing else): the user could not tell that this
    step has no checkpoint, and what resume=true would continue from."""
    script = (
        "import os, signal, time\n"
        "from rbvl.train.guard import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert stop.signum == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not stopped')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)  # the signal's own end: 143 in a shell
    assert "rbvl train: stopped at once by a second SIGTERM: no checkpoint of this step was written" in r.stderr
    assert "not stopped" not in r.stdout
