"""`rbvl experiment`: a 2-cell, 1-seed, few-step grid end to end (report folder, resume skips finished cells), the
original-label manifest writer, and the statistics against slow references."""

import json
import math
import warnings

import numpy as np
import pytest
import yaml
from conftest import write_tiny_manifest

from rbvl.experiment import (
    Cell,
    correlation,
    expand,
    load_experiment,
    paired,
    run_experiment,
    token_weighted,
    write_label_manifest,
)

FAST = [
    "max_steps=2",
    "balance.update_every=1",  # an update inside the run (a window longer than the run is refused)
    "balance.warmup_steps=0",
    "train.batch_size=4",
    "train.log_every=1",
    "data.num_workers=0",
    "data.max_length=64",
    "eval.max_samples=2",
    "eval.batch_size=4",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.plots=false",
    "logging.tensorboard=false",
]


def experiment_file(tmp_path, **extra) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": "ci",
        "out": str(tmp_path / "out"),
        "recipe": "recipes/demo_tiny_rnb.yaml",
        "overrides": FAST,
        "seeds": [0],
        "headline_seeds": [0],
        "data": {
            "k": 3,
            "original": str(write_tiny_manifest(tmp_path / "orig", n_train=8, n_eval=2)),
            "regrouped": {"3": str(write_tiny_manifest(tmp_path / "regr", n_train=8, n_eval=2, seed=1))},
        },
        "cells": [
            {"domains": "original", "strategy": "stratified"},
            {"domains": "regrouped", "strategy": "stratified"},
        ],
        **extra,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_two_cell_grid_end_to_end(tmp_path, monkeypatch):
    path = experiment_file(tmp_path)
    report = run_experiment(path, progress=False)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["cell"] for r in rows} == {"original/stratified/seed0", "regrouped-k3/stratified/seed0"}
    for r in rows:
        assert r["config"]["max_steps"] == 2 and r["config"]["seed"] == 0
        assert len(r["eval"]["loss_per_domain"]) == 3 and math.isfinite(r["eval_loss_all"])
        assert r["eval_loss_all"] == pytest.approx(token_weighted(r["eval"]))
        assert r["wall_s"] > 0
        assert r["train_flops"] > 0 and r["machine"]["cpus"] >= 1  # the report's FLOPs shares and machine line
    text = report.read_text()
    assert "regrouped-k3/stratified (baseline)" in text and "original/stratified" in text
    assert "one seed: no noise estimate" in text  # one seed: the report says it cannot judge noise
    assert (out / "eval_loss.png").stat().st_size > 0 and (out / "summary.json").exists()

    # a second call runs nothing: every cell is in results.jsonl
    import rbvl.train

    monkeypatch.setattr(rbvl.train, "train", lambda cfg: pytest.fail("a finished cell ran again"))
    run_experiment(path, progress=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_expand_adds_headline_seeds_and_doremi_reference(tmp_path):
    path = experiment_file(
        tmp_path,
        seeds=[0, 1],
        headline_seeds=[0, 1, 2],
        cells=[{"domains": "regrouped", "strategy": "rnb"}, {"domains": "regrouped", "strategy": "doremi"}],
        k_sweep={"ks": [2, 3], "strategy": "rnb", "seeds": [0]},
    )
    spec, cells = load_experiment(path)
    grid = expand(spec, cells)
    ids = [c.id for c in grid]
    assert ids.count("regrouped-k3/rnb/seed2") == 1  # headline gets the extra seed, the sweep reuses k=3
    assert "regrouped-k2/rnb/seed0" in ids
    # DoReMi's references (stratified, same seed) exist and run before it
    for s in (0, 1):
        assert ids.index(f"regrouped-k3/stratified/seed{s}") < ids.index(f"regrouped-k3/doremi/seed{s}")


def test_unknown_key_names_it(tmp_path):
    from rbvl.config import ConfigError

    path = experiment_file(tmp_path, cells=[{"domains": "regrouped", "stratgy": "rnb"}])
    with pytest.raises(ConfigError, match="cells\\[0\\].stratgy"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="role: 'dev' is not development or held-out"):
        load_experiment(experiment_file(tmp_path, role="dev"))


def test_every_cell_is_checked_before_any_run_and_int_keys_are_read(tmp_path, capsys):
    """A typo in a later cell's strategy or overrides passed --plan and stopped the grid after the earlier cells
    had trained; `regrouped: {4: path}` (YAML reads 4 as an int) was ignored and regrouping then failed."""
    from rbvl.config import ConfigError

    bad_strategy = [{"domains": "original", "strategy": "stratified"}, {"domains": "regrouped", "strategy": "rbn"}]
    bad_override = [{"domains": "regrouped", "strategy": "rnb", "overrides": ["max_step=10"]}]
    for cells, message in ((bad_strategy, r"cell regrouped-k3/rbn: mixing.strategy: 'rbn' is not one of"),
                           (bad_override, r"cell regrouped-k3/rnb: unknown key 'max_step'")):  # fmt: skip
        path = experiment_file(tmp_path, cells=cells)
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match=message):
                run_experiment(path, dry_run=dry_run, progress=False)
        assert not (tmp_path / "out" / "runs").exists(), "no cell ran"
    path = experiment_file(tmp_path)
    tree = yaml.safe_load(open(path))
    tree["data"]["regrouped"] = {3: tree["data"]["regrouped"]["3"]}
    open(path, "w").write(yaml.safe_dump(tree))
    spec, _ = load_experiment(path)
    assert spec.data.regrouped == {"3": tree["data"]["regrouped"][3]}
    with pytest.raises(ConfigError, match=r"unknown key 'seed' \(did you mean 'seeds'\?\)"):
        load_experiment(experiment_file(tmp_path, seed=[0]))


def test_label_manifest_groups_by_label(tmp_path):
    from PIL import Image

    from rbvl.data import load_domains
    from rbvl.regroup import RegroupOptions

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [
        {
            "id": f"r{i}",
            "image": "a.png" if i % 2 else None,
            "domain": ["alpha", "beta", "gamma"][i % 3],
            "conversations": [
                {"from": "human", "value": ("<image>\n" if i % 2 else "") + f"question {i}"},
                {"from": "gpt", "value": f"answer {i}"},
            ],
        }
        for i in range(12)
    ]
    evals = [dict(r, id=f"e{r['id']}") for r in rows[:6]] + [dict(rows[0], id="e-unknown", domain="delta")]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    opts = RegroupOptions(
        input=[str(tmp_path / "train.json")], eval=[str(tmp_path / "eval.json")], out=str(tmp_path / "shards")
    )
    manifest = write_label_manifest(opts)
    assert [c["name"] for c in manifest["clusters"]] == ["alpha", "beta", "gamma"]
    assert [c["n_train"] for c in manifest["clusters"]] == [4, 4, 4]
    assert manifest["counts"]["eval"] == {"in": 7, "written": 6, "rejected": 1}  # delta has no train records
    rejects = [json.loads(x) for x in (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["id"] == "e-unknown" and "delta" in rejects[0]["detail"]
    domains = load_domains(tmp_path / "shards" / "manifest.json")
    assert domains.names == ["alpha", "beta", "gamma"] and domains.eval_distribution == pytest.approx([2 / 6] * 3)


def test_paired_interval_against_reference():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.1, 5)
    cell = base - 0.05 + rng.normal(0, 0.01, 5)
    p = paired(cell.tolist(), base.tolist())
    d = cell - base
    sem = d.std(ddof=1) / math.sqrt(5)
    t975_4 = 2.7764451051977987  # Student t, 4 degrees of freedom, 97.5% quantile (tables)
    assert p["mean"] == pytest.approx(d.mean())
    assert p["low"] == pytest.approx(d.mean() - t975_4 * sem) and p["high"] == pytest.approx(d.mean() + t975_4 * sem)
    assert p["verdict"] == "lower (better) beyond noise"
    noisy = paired([1.0, 1.2, 0.9], [1.1, 1.0, 1.0])
    assert noisy["verdict"] == "within noise"


def test_correlation_and_token_weighting():
    c = correlation([1, 2, 3, 4], [2.0, 4.1, 5.9, 8.2])
    assert c["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [2.0, 4.1, 5.9, 8.2])[0, 1])
    assert correlation([1, 2], [3, 4])["pearson"] is None
    ev = {"loss_per_domain": [1.0, None, 3.0], "tokens_per_domain": [10, 0, 30]}
    assert token_weighted(ev) == pytest.approx((10 + 90) / 40)


def test_cell_names():
    c = Cell("regrouped", 4, "rnb", 2, [], label="lam5")
    assert c.id == "regrouped-k4/rnb+lam5/seed2" and "/" not in c.dirname


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("experiments/*.yaml")))
def test_experiment_files_load_and_every_cell_validates(path):
    from rbvl.config import load_config

    spec, cells = load_experiment(path)
    grid = expand(spec, cells)
    assert len({c.id for c in grid}) == len(grid)
    for cell in grid:
        overrides = [*spec.overrides, *spec.strategy_overrides.get(cell.strategy, []), *cell.overrides]
        extra = ["mixing.reference=x"] if cell.strategy == "doremi" else []
        load_config(spec.recipe, [*overrides, f"mixing.strategy={cell.strategy}", *extra])


@pytest.mark.slow
def test_interrupted_cell_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A cell stopped after its step-2 checkpoint resumes from it and ends where an uninterrupted run ends."""
    import rbvl.train.checkpoint as ckpt

    cells = [{"domains": "regrouped", "strategy": "rnb"}]
    extra = {"overrides": [*FAST, "max_steps=4", "train.save_every=2", "balance.update_every=1",
                           "balance.warmup_steps=1"], "cells": cells}  # fmt: skip
    whole = run_experiment(experiment_file(tmp_path / "a", **extra), progress=False).parent
    path = experiment_file(tmp_path / "b", **extra)
    real_save = ckpt.save

    def save_then_stop(run_dir, state):
        saved = real_save(run_dir, state)
        if state.step == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, right after the checkpoint
        return saved

    monkeypatch.setattr(ckpt, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(path, progress=False)
    out = tmp_path / "b" / "out"
    assert not (out / "results.jsonl").exists()  # nothing is reported for an unfinished cell
    monkeypatch.setattr(ckpt, "save", real_save)
    run_experiment(path, progress=False)
    (a,) = [json.loads(x) for x in (whole / "results.jsonl").read_text().splitlines()]
    (b,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert b["resumed"] and not a["resumed"]
    assert b["eval"]["loss_per_domain"] == pytest.approx(a["eval"]["loss_per_domain"], abs=1e-6)
    assert b["train_tokens"] == a["train_tokens"] > 0  # the run's token count survives the resume


def _imports_of(path, package: str) -> set[str]:
    """Every rbvl module a file imports, at module level or inside functions (`from rbvl.x import y` counts y when
    it is a module of the package)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rbvl")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is the package's own folder, `..` its parent
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.startswith("rbvl"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_experiment_package_has_no_import_cycle():
    """spec ← report ← readme, and run → (spec, report, readme): no cycle, counting imports inside functions."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "rbvl" / "experiment"
    modules = {"rbvl.experiment" + ("" if f.stem == "__init__" else f".{f.stem}"): f for f in sorted(root.glob("*.py"))}
    graph = {m: sorted(_imports_of(f, "rbvl.experiment") & set(modules) - {m}) for m, f in modules.items()}
    assert {"rbvl.experiment.spec", "rbvl.experiment.run", "rbvl.experiment.report"} <= set(graph)

    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            cycle = on_path[on_path.index(m) :] + [m]
            pytest.fail(f"import cycle: {' → '.join(cycle)} (graph: {graph})")
        if m in done:
            return
        on_path.append(m)
        for n in graph[m]:
            visit(n)
        on_path.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert graph["rbvl.experiment.spec"] == []  # the spec imports no other part of the package


# ---------------------------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------------------------


def test_oracle_search_finds_a_known_best_mixture():
    """A loss bowl with its minimum at a known mixture: the grid hits its nearest point; above grid_max_m the
    Dirichlet draws + refinement land nearer to it than uniform or any first-round draw."""
    from rbvl.experiment.oracle import first_round, search
    from rbvl.experiment.spec import OracleSpec

    target3 = np.array([0.5, 0.5, 0.0])
    best, tried = search(["a", "b", "c"], OracleSpec(grid_step=0.25), lambda j, p: float(((p - target3) ** 2).sum()))
    assert np.allclose(best, target3) and len(tried) == 15  # C(4 + 2, 2) points of the 0.25 grid

    target = np.array([0.02, 0.3, 0.3, 0.2, 0.1, 0.05, 0.03])
    spec = OracleSpec(candidates=12, refine=6)
    calls = []
    best, tried = search(list("abcdefg"), spec, lambda j, p: calls.append(j) or float(((p - target) ** 2).sum()))
    assert calls == list(range(1 + 12 + 6)) and len(tried) == 19
    first = first_round(7, spec)
    assert np.allclose(first[0], 1 / 7) and all(abs(p.sum() - 1) < 1e-9 and (p >= 0).all() for p, _ in tried)
    dist = ((best - target) ** 2).sum()
    assert dist <= min(((p - target) ** 2).sum() for p in first)  # refinement never loses the best
    assert dist < ((first[0] - target) ** 2).sum() / 2

    # the natural mixture (train shares) is tried last, after every earlier index, and wins when it is the best
    rows = np.array([2, 60, 60, 40, 20, 10, 8])
    calls = []
    best, tried = search(
        list("abcdefg"), spec, lambda j, p: calls.append(j) or float(((p - rows / 200) ** 2).sum()), rows
    )
    assert (
        calls == list(range(1 + 12 + 6 + 1)) and np.allclose(best, rows / 200) and np.allclose(tried[-1][0], rows / 200)
    )


def test_headroom_and_captured_share_by_hand():
    from rbvl.experiment.oracle import headroom

    strat = {0: 1.00, 1: 1.10, 2: 0.90, 3: 1.05}
    best = {0: 0.80, 1: 0.92, 2: 0.70, 3: 0.85}  # 0.20, 0.18, 0.20, 0.20 below stratified
    half = {0: 0.90, 1: 1.01, 2: 0.80, 3: 0.95}  # 0.10, 0.09, 0.10, 0.10: half of it
    none = {0: 1.00, 1: 1.10, 2: 0.91}
    out = headroom(strat, best, {"half": half, "none": none}, paired)
    assert out["headroom"]["mean"] == pytest.approx(0.195) and not out["within_noise"]  # stratified − oracle
    assert out["headroom"]["n"] == 4
    assert out["share"]["half"]["share"] == pytest.approx(0.39 / 0.78)
    assert out["share"]["half"]["low"] <= 0.5 <= out["share"]["half"]["high"]
    assert out["share"]["none"]["n"] == 3 and out["share"]["none"]["share"] == pytest.approx(-0.01 / 0.58)
    noisy = headroom({0: 1.0, 1: 1.0}, {0: 0.9, 1: 1.1}, {}, paired)
    assert noisy["within_noise"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no all-NaN quantile warning
        flat = headroom({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}, {"same": {0: 1.0, 1: 0.9}}, paired)
    assert flat["share"]["same"] == {"n": 2, "share": None, "low": None, "high": None}  # no headroom: no share, no NaN


def test_mixture_section_by_hand_with_a_clean_control(tmp_path):
    from rbvl.experiment.mixture import mixture_lines, mixture_summary
    from rbvl.experiment.report import fmt
    from rbvl.experiment.spec import ControlSpec, ExperimentSpec, append_result

    names = ["a", "noise", "z"]

    def row(group, seed, p_mean, l1, order=names):
        mix = {"updates": 3, "p_mean": p_mean, "p_final": p_mean, "p_l1_median": l1}
        return {"group": group, "seed": seed, "domain_names": order, "mixture": mix}

    control = tmp_path / "control"
    control.mkdir()
    for r in [
        row("original/rnb", 0, [0.3, 0.4, 0.3], 0.1),
        row("original/rnb", 1, [0.2, 0.2, 0.6], 0.3, ["z", "noise", "a"]),
    ]:
        append_result(control, r)  # the second control run lists its domains in another order
    spec = ExperimentSpec(recipe="r.yaml", control=ControlSpec(out=str(control), domain="noise"))
    main = {
        "original/rnb": [row("original/rnb", 0, [0.5, 0.1, 0.4], 0.2), row("original/rnb", 1, [0.6, 0.2, 0.2], 0.4),
                         row("original/rnb", 2, [0.4, 0.15, 0.45], 1.0)],
        "original/stratified": [{"group": "original/stratified", "seed": 0, "domain_names": names, "mixture": None}],
    }  # fmt: skip
    out = mixture_summary(spec, main)
    assert set(out["groups"]) == {"original/rnb"}  # a static mixture logs no p
    rnb = out["groups"]["original/rnb"]
    assert rnb["p_mean"] == pytest.approx([0.5, 0.15, 0.35]) and rnb["p_l1_median"] == pytest.approx(0.4)
    assert rnb["p_domain"] == pytest.approx(0.15) and rnb["p_domain_control"] == pytest.approx(0.3)
    assert rnb["ratio"] == pytest.approx(0.5) and rnb["control_n"] == 2
    text = "\n".join(mixture_lines(out, fmt))
    assert "| original/rnb | 3 | 0.500 | 0.150 | 0.350 | 0.400 |" in text
    assert "| original/rnb | 0.150 | 0.300 (n=2) | 0.50 |" in text
    alone = mixture_summary(ExperimentSpec(recipe="r.yaml", control=ControlSpec(domain="noise")), main)
    assert "p_domain_control" not in alone["groups"]["original/rnb"]  # no control folder: p on noise, no ratio
    assert "against the clean control" not in "\n".join(mixture_lines(alone, fmt))
    # cells on other domains (a k's clusters) get their own table, with their own columns
    main["regrouped-k2/rnb"] = [row("regrouped-k2/rnb", 0, [0.7, 0.3], 0.05, ["cluster_000", "cluster_001"])]
    text = "\n".join(mixture_lines(mixture_summary(spec, main), fmt))
    assert "| cell | n | cluster_000 | cluster_001 | median L1 change of p per update |" in text
    assert "| regrouped-k2/rnb | 1 | 0.700 | 0.300 | 0.050 |" in text
    assert "| original/rnb | 3 | 0.500 | 0.150 | 0.350 | 0.400 |" in text


@pytest.mark.slow
def test_oracle_runs_in_the_grid_resumes_and_reports_headroom(tmp_path, monkeypatch):
    cells = [{"domains": "original", "strategy": "stratified"}, {"domains": "original", "strategy": "rnb"}]
    path = experiment_file(tmp_path, cells=cells, seeds=[0, 1], headline_seeds=[0, 1],
                           oracle={"domains": "original", "grid_step": 0.5, "search_seeds": [7]})  # fmt: skip
    report = run_experiment(path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["label"].startswith("oracle-search")]
    # the 0.5 grid on 3 domains, then the natural mixture; on its own seed
    assert len(search) == 7 and {r["seed"] for r in search} == {7}
    weights = [r["config"]["mixing"]["weights"] for r in search]
    assert all(r["config"]["mixing"]["strategy"] == "manual" for r in search) and len({str(w) for w in weights}) == 7
    best = min(search, key=lambda r: r["eval_loss_all"])["config"]["mixing"]["weights"]
    final = [r for r in rows if r["label"] == "oracle"]
    assert sorted(r["seed"] for r in final) == [0, 1] and all(r["config"]["mixing"]["weights"] == best for r in final)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "original/rnb" in summary["oracle"]["share"] and summary["oracle"]["headroom"]["n"] == 2
    assert not any("oracle-search" in g for g in summary["groups"])  # the search is not a row of the tables
    rnb = [r["mixture"] for r in rows if r["group"] == "original/rnb"]
    assert all(m["updates"] >= 1 and sum(m["p_mean"]) == pytest.approx(1.0) for m in rnb)  # where p went, per run
    assert all(r["mixture"] is None for r in rows if r["strategy"] in ("stratified", "manual"))
    assert summary["mixture"]["groups"]["original/rnb"]["n"] == 2
    text = report.read_text()
    assert "## Headroom" in text and "original/manual+oracle" in text

    import rbvl.train

    monkeypatch.setattr(rbvl.train, "train", lambda cfg: pytest.fail("a finished run ran again"))
    run_experiment(path, progress=False)  # the search resumes from results.jsonl: nothing to train
    monkeypatch.undo()

    # oracle runs of an older winner (a search that had fewer candidates then) are redone with today's, not kept
    results = tmp_path / "out" / "results.jsonl"
    old = {name: 1.0 if name == min(best, key=best.get) else 0.0 for name in best}  # not the winner
    edited = [json.loads(x) for x in results.read_text().splitlines()]
    for r in edited:
        if r["label"] == "oracle":
            r["config"]["mixing"]["weights"] = old
    results.write_text("".join(json.dumps(r) + "\n" for r in edited))
    run_experiment(path, progress=False)
    final = [json.loads(x) for x in results.read_text().splitlines()]
    final = [r for r in final if r["label"] == "oracle"]
    assert sorted(r["seed"] for r in final) == [0, 1] and all(r["config"]["mixing"]["weights"] == best for r in final)
