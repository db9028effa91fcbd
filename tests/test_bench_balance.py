"""`rbvl bench balance` runs end to end on the tiny demo recipe and prints its table (the numbers are the bench's)."""

import re
import subprocess
from pathlib import Path

import pytest

from rbvl.bench.balance import add_arguments, run

pytestmark = pytest.mark.slow


def test_bench_balance_smoke(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--recipe", "recipes/demo_tiny_rnb.yaml", "--domains", "8", "--sketch-dim", "4096", "--seq", "16",
         "--batch", "3", "--slice-domains", "3", "--rounds", "1", "--windows", "2", "--update-every", "1",
         "--no-peers", "--json", str(tmp_path / "b.json")]
    )  # fmt: skip
    result = run(args)
    full, sliced = result["full"], result["slice"]
    assert full["sketched"]["memory_gib"] == pytest.approx(2 * 8 * 4096 * 4 / 2**30)
    assert full["exact"]["memory_gib"] > full["sketched"]["memory_gib"] > 0
    assert 0 < full["sketched"]["flops_fraction"] < 1
    assert set(sliced["step_s"]) == {"off", "exact", "sketched", "naive", "linears"} and len(sliced["p_l1"]) == 2
    assert all(0 <= e < 1 for e in sliced["gram_rel_error"])
    out = capsys.readouterr().out
    assert "naive / sketched" in out and (tmp_path / "b.json").exists()


def test_bench_balance_peers_side_by_side(capsys):
    """Part 3 trains each strategy for real and reads every mixer's counted work the same way."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--recipe", "recipes/demo_tiny_rnb.yaml", "--domains", "4", "--slice-layers", "0", "--peer-steps", "3",
         "--peer-warmup", "1", "--peer-rounds", "1", "--peer-strategies", "rnb,dga,doremi"]
    )  # fmt: skip
    rows = run(args)["peers"]["strategies"]
    assert list(rows) == ["stratified", "rnb", "dga", "doremi"]  # stratified added: the overheads are against it
    assert rows["stratified"]["wall_overhead"] == 0 and rows["stratified"]["extra_flops_share"] == 0
    # R&B: no extra pass, only the tracker's FLOPs
    assert rows["rnb"]["extra_forward_share"] == 0 and 0 < rows["rnb"]["extra_flops_share"] < 0.01
    # DoReMi: the reference model reads every training token once more, forward only: 1/3 of training's FLOPs
    assert rows["doremi"]["extra_forward_share"] == pytest.approx(1.0)
    assert rows["doremi"]["extra_backward_share"] == 0
    assert rows["doremi"]["extra_flops_share"] == pytest.approx(1 / 3)
    # DGA: m + 1 held-out batches forward and backward every step
    assert rows["dga"]["extra_backward_share"] == rows["dga"]["extra_forward_share"] > 0.5
    assert rows["dga"]["extra_flops_share"] == pytest.approx(rows["dga"]["extra_forward_share"])
    out = capsys.readouterr().out
    assert "Peers, measured alike" in out and "doremi" in out


@pytest.mark.parametrize(
    "option, message",
    [
        (["--peer-strategies", "odm,fooo"], "--peer-strategies: unknown fooo"),
        (["--peer-steps", "0"], "must be at least 1"),
        (["--peer-manifest", "no/such/manifest.json"], "no such file"),
    ],
)
def test_bench_balance_peer_options_checked_before_any_part_runs(option, message, monkeypatch):
    import argparse

    import rbvl.bench.balance as bench

    monkeypatch.setattr(bench, "full_model_costs", lambda *a: pytest.fail("part 1 ran before the options were checked"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        run(parser.parse_args(["--recipe", "recipes/demo_tiny_rnb.yaml", *option]))


def test_bench_balance_dispatch_counts(tmp_path, capsys, monkeypatch):
    """--dispatch: operations per micro-batch against the untracked one (the compile check is stubbed: dynamo is slow)."""
    import argparse

    from rbvl.bench import dispatch

    monkeypatch.setattr(dispatch, "compile_check", lambda: {"layers": 1, "tracked_linears": 14, "breaks_off": 0,
                                                            "breaks_tracked": 0, "graphs_off": 1, "graphs_tracked": 1,
                                                            "compiles_off": True, "compiles_tracked": True})  # fmt: skip
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--dispatch", "--dispatch-layers", "1", "--dispatch-domains", "4,16",
                              "--json", str(tmp_path / "d.json")])  # fmt: skip
    result = run(args)
    assert result["tracked_linears"] == 14 and result["untracked"] > 0
    counts = result["counts"]
    assert set(counts) == {
        f"{mode}/{order}/{k}" for mode in ("exact", "sketched") for order, k in
        (("sorted", 4), ("sorted", 16), ("interleaved", 4), ("interleaved", 16))
    }  # fmt: skip
    assert max(counts.values()) / result["untracked"] < 1.15  # the goal, here at 14 tracked linears
    for mode in ("exact", "sketched"):  # O(1) in the domains present: 4 or 16 domains, the same operations (give or
        # take a stray profiler record; one operation more per tracked linear and extra domain would be 168)
        assert abs(counts[f"{mode}/sorted/16"] - counts[f"{mode}/sorted/4"]) <= 0.005 * result["untracked"]
    assert "graphs" in capsys.readouterr().out and (tmp_path / "d.json").exists()


def test_gpu_check_script_parses_and_fits_its_time():
    """scripts/gpu_check.sh (run by hand on CUDA, never in CI): valid bash, and its parts' timeouts within 8 minutes."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    limits = [int(s) for s in re.findall(r"^part \w+ (\d+) ", script.read_text(), flags=re.M)]
    assert len(limits) == 4 and sum(limits) <= 8 * 60
