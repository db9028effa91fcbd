"""`rbvl bench balance` runs end to end on the tiny demo recipe and prints its table (the numbers are the bench's)."""

import pytest

from rbvl.bench_balance import add_arguments, run

pytestmark = pytest.mark.slow


def test_bench_balance_smoke(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--recipe", "recipes/demo_tiny_rnb.yaml", "--domains", "8", "--sketch-dim", "4096", "--seq", "16",
         "--batch", "3", "--slice-domains", "3", "--rounds", "1", "--windows", "2", "--update-every", "1",
         "--json", str(tmp_path / "b.json")]
    )  # fmt: skip
    result = run(args)
    full, sliced = result["full"], result["slice"]
    assert full["sketched"]["memory_gib"] == pytest.approx(2 * 8 * 4096 * 4 / 2**30)
    assert full["exact"]["memory_gib"] > full["sketched"]["memory_gib"] > 0
    assert 0 < full["sketched"]["flops_fraction"] < 1
    assert set(sliced["step_s"]) == {"off", "exact", "sketched", "naive"} and len(sliced["p_l1"]) == 2
    assert all(0 <= e < 1 for e in sliced["gram_rel_error"])
    out = capsys.readouterr().out
    assert "naive / sketched" in out and (tmp_path / "b.json").exists()
