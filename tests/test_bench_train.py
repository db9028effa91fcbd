"""`rbvl bench train` stays runnable: every arm trains, the figures and ratios are what the rounds measured."""

import argparse
import json
import math
import statistics

import numpy as np
import pytest

from rbvl.bench import train as bench_train
from rbvl.bench._timing import median_interval, verdict
from rbvl.bench.step import tracker_step_cost
from rbvl.config import load_config
from rbvl.data import load_domains


def test_bench_manifest_loads(tmp_path):
    manifest = bench_train.write_bench_manifest(tmp_path / "shards", n_domains=3, n_train=6, n_eval=2)
    domains = load_domains(manifest)
    assert [d.n_train for d in domains.domains] == [6, 6, 6]
    rows = bench_train.load_samples(manifest)
    assert sorted(r["domain"] for r in rows) == [0] * 6 + [1] * 6 + [2] * 6
    assert all((r["image"] is not None) == (r["domain"] == 0) for r in rows)  # domain 0 asks about an image


@pytest.mark.slow  # four tiny training runs: ~30 s of CPU (73 s wall on the loaded shared machine)
def test_bench_train_smoke(tmp_path):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--steps", "2", "--warmup", "1", "--rounds", "1", "--batch", "4", "--workers", "0", "--json", str(out)]
        + ["--tracker-rounds", "2", "--tracker-block", "1"]
    )
    result = bench_train.run(args)
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert set(result["samples_per_s"]) == set(bench_train.DEFAULT_ARMS)
    for arm, rates in result["samples_per_s"].items():
        assert len(rates) == 1 and all(math.isfinite(r) and r > 0 for r in rates), (arm, rates)
        assert result["median_samples_per_s"][arm] == statistics.median(rates)
    med = result["median_samples_per_s"]
    pairs = [(a, b) for a, b, _ in bench_train.RATIOS if {a, b} <= set(bench_train.DEFAULT_ARMS)]
    assert result["ratios"] == {f"{a}/{b}": med[a] / med[b] for a, b in pairs}
    assert result["paired_ratios"] == {
        f"{a}/{b}": result["samples_per_s"][a][0] / result["samples_per_s"][b][0] for a, b in pairs
    }
    assert result["paired_intervals"] == {f"{a}/{b}": None for a, b in pairs}  # one round: no interval, no verdict
    assert len(result["tracker_in_process"]["ratios"]) == 2  # the in-process part ran, on the bench's manifest
    assert result["setup"]["update_every"] == 2  # min(recipe's 60, --steps): an update inside the timed span


def test_median_interval_covers_the_median():
    """The interval is the j-th smallest and largest ratio, for the largest j whose binomial coverage is at least 90 %,
    and over many draws from a skewed distribution it holds the true median at least that often."""
    from scipy.stats import binom

    assert median_interval([1.0, 2.0, 3.0, 4.0]) is None  # four rounds: min and max cover 87.5 %
    assert median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0, 1 - 2 / 32)
    xs = [float(x) for x in range(21)]
    low, high, coverage = median_interval(xs[::-1])
    j = int(low) + 1  # the j-th smallest
    assert coverage == pytest.approx(1 - 2 * binom.cdf(j - 1, 21, 0.5)) and coverage >= 0.9
    assert 1 - 2 * binom.cdf(j, 21, 0.5) < 0.9  # one step further in falls short
    assert high == xs[21 - j]

    rng = np.random.default_rng(0)
    true_median = 1.0  # of exp(N(0, 1))
    hits = [
        (iv := median_interval(rng.lognormal(0.0, 1.0, size=n).tolist())) is not None and iv[0] <= true_median <= iv[1]
        for n in (7, 12, 21)
        for _ in range(1000)
    ]
    assert sum(hits) / len(hits) >= 0.9


def test_verdict_reads_the_interval():
    assert verdict((0.98, 1.02, 0.93), 0.97) == "met"
    assert verdict((0.90, 0.96, 0.93), 0.97) == "not met"
    assert verdict((0.92, 1.02, 0.93), 0.97).startswith("not decided")
    assert verdict(None, 0.97) == "too few rounds to decide (5 at least: --rounds)"


@pytest.mark.parametrize("params", ["lora", "head"])  # head: the projector's rows are images (image_domain_ids)
def test_tracker_step_cost_alternates_blocks_and_tracks_only_its_side(params, tmp_path):
    """The in-process part: per round one untracked and one tracked block of the same micro-batches; the ratio is
    untracked / tracked seconds per step; gradients reach the tracker's window in the tracked blocks only."""
    manifest = bench_train.write_bench_manifest(tmp_path / "shards", n_domains=3, n_train=6, n_eval=2)
    overrides = [f"manifest={manifest}", f"output_dir={tmp_path / 'run'}", f"balance.params={params}"]
    cfg = load_config(bench_train.DEFAULT_RECIPE, overrides)
    result = tracker_step_cost(cfg, bench_train.load_samples(manifest), rounds=3, block=2, batch=6)
    steps = result["step_s"]
    assert len(steps["untracked"]) == len(steps["tracked"]) == 3
    assert result["ratios"] == [u / t for u, t in zip(steps["untracked"], steps["tracked"])]
    assert result["ratio"] == statistics.median(result["ratios"])
    assert result["interval"] is None  # three rounds are too few for a 90 % interval
    assert result["window_sq"]["tracked"] > 0 and result["window_sq"]["untracked"] == 0
    assert max(result["domains_per_batch"]) >= 2  # drawn from every domain, as rbvl's loader mixes them
