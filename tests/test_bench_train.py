"""`rbvl bench train` stays runnable: every arm trains, the figures and ratios are what the rounds measured."""

import argparse
import json
import math
import statistics

import pytest

from rbvl.bench import train as bench_train
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
    assert result["setup"]["update_every"] == 2  # min(recipe's 60, --steps): an update inside the timed span
