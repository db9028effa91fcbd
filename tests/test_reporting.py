"""What a LLaMA-Factory / TRL user expects of a run's bookkeeping (issue 22): `logging.report_to` (TensorBoard, wandb
offline, MLflow to a local file store) and `train.save_total_limit` (the newest N and the best eval checkpoint)."""

import json

import pytest

from rbvl.config import ConfigError, load_config
from rbvl.train import train
from rbvl.train.checkpoint import RBVL_STATE, prune
from rbvl.train.metrics import MetricsLogger, read_metrics


def _config(tmp_path, manifest, *overrides):
    return load_config(
        "recipes/demo_tiny_rnb.yaml",
        [f"manifest={manifest}", f"output_dir={tmp_path / 'run'}", "max_steps=6", "train.batch_size=4",
         "balance.update_every=3", "balance.warmup_steps=0", "train.log_every=2", "data.num_workers=0",
         "logging.progress=false", "logging.plots=false", *overrides],
    )  # fmt: skip


def test_report_to_is_checked_and_the_old_tensorboard_switch_still_works(tmp_path):
    with pytest.raises(ConfigError, match=r"logging.report_to: .*expected a list of tensorboard, wandb, mlflow"):
        load_config("recipes/demo_tiny_rnb.yaml", ["logging.report_to=[tensorbord]"])
    from rbvl.train.metrics import report_to

    assert report_to(load_config("recipes/demo_tiny_rnb.yaml", []).logging) == ["tensorboard"]
    cfg = load_config("recipes/demo_tiny_rnb.yaml", ["logging.report_to=[tensorboard,mlflow]", "logging.tensorboard=false"])  # fmt: skip
    assert report_to(cfg.logging) == ["mlflow"]
    assert report_to(load_config("recipes/demo_tiny_rnb.yaml", ["logging.report_to=none"]).logging) == []


@pytest.mark.slow
def test_a_run_reports_to_wandb_offline_and_mlflow_and_resumes_the_same_runs(tmp_path, tiny_manifest, monkeypatch):
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = "logging.report_to=[tensorboard,wandb,mlflow]"
    train(_config(tmp_path, tiny_manifest, report, "max_steps=4", "train.save_every=2"))
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote its offline run"
    mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
    run_id = (run / ".mlflow-run-id").read_text()
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [r["step"] for r in read_metrics(run, "train")]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in read_metrics(run, "train")])
    per_domain = client.get_metric_history(run_id, "eval/loss_per_domain/cluster_000")
    assert len(per_domain) == 1 and per_domain[0].step == 4
    assert client.get_run(run_id).data.params["lora.r"] == str(load_config("recipes/demo_tiny_rnb.yaml", []).lora.r)
    train(_config(tmp_path, tiny_manifest, report, "max_steps=6", "train.save_every=2", "resume=true"))
    assert (run / ".mlflow-run-id").read_text() == run_id, "the resumed run continues the same MLflow run"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [2, 4, 6]
    assert len(list((run / "wandb").glob("offline-run-*"))) >= 1
    assert wandb is not None


def test_a_backend_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delitem(__import__("sys").modules, "wandb", raising=False)
    from rbvl.train.report import ReportError

    with pytest.raises(ReportError, match=r"^logging.report_to names wandb, which is not installed: pip install wandb"):
        MetricsLogger(tmp_path, ["a"], report_to=["wandb"])


def _checkpoint(run, step, eval_loss):
    (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / f"checkpoint-{step}" / RBVL_STATE).write_text(json.dumps({"step": step, "eval_loss": eval_loss}))


def test_save_total_limit_keeps_the_newest_and_the_best(tmp_path):
    for step, loss in [(2, 3.0), (4, 1.5), (6, None), (8, 2.0), (10, None)]:
        _checkpoint(tmp_path, step, loss)
    gone = prune(tmp_path, 2)
    assert sorted(p.name for p in gone) == ["checkpoint-2", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    assert prune(tmp_path, 2) == [], "nothing more to remove"


@pytest.mark.slow
def test_a_run_with_save_total_limit_keeps_what_it_says(tmp_path, tiny_manifest):
    cfg = _config(tmp_path, tiny_manifest, "train.save_every=1", "train.save_total_limit=2", "eval.every=3",
                  "logging.report_to=none")  # fmt: skip
    train(cfg)
    run = tmp_path / "run"
    kept = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    evals = {r["step"]: r["loss"] for r in read_metrics(run, "eval")}
    best = min(evals, key=evals.get)
    assert kept == sorted({5, 6, best}), (kept, evals)
    assert not (run / "tensorboard").exists(), "report_to=none writes no event files"


def _finished_run(path, manifest, losses, mixture):
    from rbvl.config import dump_config

    path.mkdir(parents=True)
    dump_config(load_config("recipes/demo_tiny_rnb.yaml", [f"manifest={manifest}"]), path / "config.yaml")
    MetricsLogger(path, [], report_to=[]).log("eval", 10, loss=mixture, loss_per_domain=losses)


def test_compare_lines_up_runs_over_different_domains_and_explains_its_marks(tmp_path):
    from rbvl.data.synthetic import write_tiny_manifest
    from rbvl.evaluate import compare_runs

    three = write_tiny_manifest(tmp_path / "k3", n_domains=3)
    two = write_tiny_manifest(tmp_path / "k2", n_domains=2)
    _finished_run(tmp_path / "a", three, [1.0, 2.0, 3.0], 2.0)
    _finished_run(tmp_path / "b", two, [0.5, None], 0.5)
    log = MetricsLogger(tmp_path / "a", [], report_to=[])
    for step, change in ((3, 0.9), (6, 0.3), (9, 0.1)):
        log.log("balance", step, p=[0.4, 0.3, 0.3], p_l1_change=change)
    table = compare_runs([str(tmp_path / "a"), str(tmp_path / "b")]).splitlines()
    cells = {line.split()[0]: line.split()[1:] for line in table[1:4]}
    assert cells == {"cluster_000": ["1.0000", "0.5000*"], "cluster_001": ["2.0000", "-"], "cluster_002": ["3.0000", "-"]}  # fmt: skip
    assert table[4].split()[-2:] == ["2.0000", "0.5000*"]
    assert table[5].split()[-2:] == ["0.300", "-"], "run a: median of its updates' L1 changes; run b: no update"
    assert table[6].startswith("* the lowest eval loss in its row; - the run has no such domain")
    assert table[7].startswith("p stability: median L1 change of p per update")
    assert table[-1] == "the runs read different manifests: each mixture loss weighs its own eval set by its own q"
    with pytest.raises(FileNotFoundError, match="nope: no such run folder"):
        compare_runs([str(tmp_path / "a"), str(tmp_path / "nope")])


@pytest.mark.slow
def test_truncation_shows_in_the_summary_and_at_the_end_of_rbvl_train(tmp_path, tiny_manifest, capsys):
    from rbvl import cli

    code = cli.main(["train", "recipes/demo_tiny_rnb.yaml", f"manifest={tiny_manifest}", f"output_dir={tmp_path / 'run'}",
                     "max_steps=4", "train.batch_size=4", "balance.update_every=2", "balance.warmup_steps=0",
                     "data.num_workers=0", "data.max_length=36", "logging.progress=false", "logging.plots=false",
                     "logging.report_to=none", "train.log_every=2"])  # fmt: skip
    assert code == 0
    rows = read_metrics(tmp_path / "run", "train")
    truncated = sum(r["truncated"] for r in rows)
    assert truncated > 0, "data.max_length=36 cuts the longer answers"
    captured = capsys.readouterr()
    err = captured.err
    assert f"rbvl train: of 16 samples drawn (this rank), {truncated} were truncated to data.max_length=36" in err
    (final,) = read_metrics(tmp_path / "run", "eval")  # the eval set is cut by the same max_length, and says so
    assert final["truncated"] > 0 and final["dropped"] == 0
    assert f"({final['truncated']} truncated to data.max_length)" in captured.out + err


def test_experiment_says_its_plan_before_it_runs_and_plan_runs_nothing(tmp_path, capsys):
    from rbvl import cli

    (tmp_path / "x.yaml").write_text(
        "name: tiny\nrecipe: recipes/demo_tiny_rnb.yaml\nseeds: [0]\ndata: {k: 3}\nk_sweep: {ks: [2]}\n"
    )
    out = tmp_path / "out"
    assert cli.main(["experiment", str(tmp_path / "x.yaml"), "--out", str(out), "--plan"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    # 9 default cells at seed 0, the headline and baseline at 5 seeds, and a k sweep at k = 2: 9 + 2·4 + 1 runs
    assert lines[0] == "experiment tiny: 10 groups, 18 runs (18 to run, 0 already in results.jsonl)"
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "seeds 0,1,2,3,4  (headline/baseline: + headline_seeds)" in rows["regrouped-k3/rnb"]
    assert "also DoReMi's reference" in rows["regrouped-k3/stratified"]
    assert rows["regrouped-k2/rnb"].endswith("seeds 0  (k_sweep)")
    assert not out.exists(), "--plan writes nothing"


@pytest.mark.slow
def test_eval_generate_writes_what_the_model_answers_per_domain(tmp_path, tiny_manifest):
    from rbvl.data import load_domains
    from rbvl.data.shards import decode, read_shard

    cfg = _config(tmp_path, tiny_manifest, "max_steps=2", "balance.update_every=2", "eval.every=1", "eval.generate=2", "eval.max_new_tokens=5",
                  "logging.report_to=[tensorboard]")  # fmt: skip
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    domains = load_domains(tiny_manifest)
    assert [(r["step"], r["domain"]) for r in rows] == [(s, n) for s in (1, 2) for n in domains.names for _ in range(2)]
    for row in rows[:6]:
        d = domains.names.index(row["domain"])
        raw = next(s for s in map(decode, read_shard(domains.domains[d].eval_shards[0])) if s["id"] == row["id"])
        question, answer = raw["conversation"][0]["content"], raw["conversation"][1]["content"]
        assert row["reference"].strip() == answer.strip(), "the reference is the sample's first answer"
        assert question.replace("<image>", "").strip() in row["prompt"], (
            "the prompt is the question, cut before the answer"
        )
        assert answer.strip() not in row["prompt"].replace(question, "")
        assert isinstance(row["output"], str)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert f"samples/{domains.names[0]}/text_summary" in events.Tags()["tensors"]


def test_plots_show_what_there_is_and_write_no_empty_picture(tmp_path):
    from rbvl.train.plots import plot_run

    names = ["a", "b", "c"]
    log = MetricsLogger(tmp_path, names, report_to=[])
    log.log("train", 2, loss=2.0, loss_per_domain=[2.1, 1.9, None])
    log.log("train", 4, loss=1.5, loss_per_domain=[1.6, 1.4, 1.5])
    log.log("eval", 4, loss=None, loss_per_domain=[None, None, None])  # no eval set: nothing to draw
    assert sorted(p.name for p in plot_run(tmp_path, names)) == ["train_loss.png"]
    gram = [[4.0, 1.0, -2.0], [1.0, 1.0, 0.0], [-2.0, 0.0, -0.1]]  # a de-biased diagonal may dip below 0
    for step in (3, 6, 9, 12, 15):
        log.log("balance", step, p=[0.5, 0.3, 0.2], p_before=[1 / 3] * 3, gram=gram, applies_from_step=step + 1)
    log.log("eval", 15, loss=1.2, loss_per_domain=[1.1, 1.3, 1.2])
    written = sorted(p.name for p in plot_run(tmp_path, names))
    assert written == ["eval_loss.png", "gram.png", "proportions.png", "train_loss.png"]
    assert all((tmp_path / name).stat().st_size > 5_000 for name in written)


def test_per_domain_values_reach_the_reporters_when_some_domain_has_none(tmp_path):
    """With many domains and small batches, some domain is missing from most train rows: the others still reach
    TensorBoard (and wandb, MLflow), one line per domain, and a domain without a value is left out, not zero."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = ["a", "b", "c"]
    log = MetricsLogger(tmp_path, names, report_to=["tensorboard"])
    log.log("train", 2, loss=2.0, loss_per_domain=[2.1, None, 1.9], alignment=[0.5, None, -0.25])
    log.log("train", 4, loss=1.5, loss_per_domain=[None, None, None])
    log.close()
    seen = {}
    for run in sorted((tmp_path / "tensorboard").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(run.parent)).Reload()
        for tag in events.Tags()["scalars"]:
            seen[f"{run.parent.name}:{tag}"] = [(e.step, e.value) for e in events.Scalars(tag)]
    per_domain = {k: v for k, v in seen.items() if "loss_per_domain" in k}
    assert per_domain == {
        "train_loss_per_domain_a:train/loss_per_domain": [(2, pytest.approx(2.1))],
        "train_loss_per_domain_c:train/loss_per_domain": [(2, pytest.approx(1.9))],
    }
    assert [v for k, v in seen.items() if "alignment_c" in k] == [[(2, -0.25)]]
