"""README "Results": every block is what the committed results.jsonl gives, never numbers typed by hand."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from rbvl.experiment import blocks_in, readme_block, update_readme

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("experiments/out/digits", "experiments/out/easyvqa", "experiments/out/reasoning")


def test_readme_results_blocks_match_committed_results():
    text = (ROOT / "README.md").read_text()
    found = blocks_in(text)
    assert set(SETTINGS) <= set(found), f"README lacks results blocks for {sorted(set(SETTINGS) - set(found))}"
    for rel in found:
        assert (ROOT / rel / "results.jsonl").is_file(), f"{rel}/results.jsonl is not committed"
        block = readme_block(ROOT / rel, ROOT)
        assert block in text, (
            f"README's results block for {rel} is not what {rel}/results.jsonl gives; regenerate it with "
            f"`rbvl experiment experiments/{Path(rel).name}.yaml --report-only --readme README.md`"
        )
        for image in ("eval_loss.png", "k_sweep.png"):
            if f"{rel}/{image}" in block:
                assert (ROOT / rel / image).stat().st_size > 0


def _row(group_domains, k, strategy, seed, loss, wall, flops=None):
    where = "original" if group_domains == "original" else f"regrouped-k{k}"
    return {
        "cell": f"{where}/{strategy}/seed{seed}",
        "group": f"{where}/{strategy}",
        "domains": group_domains,
        "k": k,
        "strategy": strategy,
        "label": "",
        "seed": seed,
        "sweep": False,
        "silhouette": {2: 0.30, 3: 0.20, 4: 0.25}.get(k),
        "eval_loss_all": loss,
        "eval_loss_q": loss + 0.01,
        "eval": {"loss": loss + 0.01, "loss_per_domain": [loss - 0.1, loss + 0.1], "tokens_per_domain": [10, 10]},
        "wall_s": wall,
        "cost": None if flops is None else {"forward_tokens": 0, "backward_tokens": 0, "flops": flops},
        "train_flops": 1e9,
        "machine": {"machine": "x86_64", "cpus": 2, "torch": "2.x"},
        "finished": "2026-11-24T10:00:00Z",
    }


def test_update_readme_writes_the_block_from_results(tmp_path):
    import json

    out = tmp_path / "experiments" / "out" / "toy"
    out.mkdir(parents=True)
    spec = {"name": "toy", "recipe": "recipes/demo_tiny_rnb.yaml", "data": {"k": 3}, "k_sweep": {"ks": [2, 3, 4]}}
    (out / "experiment.yaml").write_text(yaml.safe_dump(spec))
    base = [0.50, 0.52, 0.48]
    rnb = [0.45, 0.48, 0.44]
    rows = [_row("regrouped", 3, "stratified", s, x, 10.0) for s, x in enumerate(base)]
    rows += [_row("regrouped", 3, "rnb", s, x, 11.0, flops=1e6) for s, x in enumerate(rnb)]
    rows += [_row("original", None, "stratified", s, 0.6, 10.0) for s in range(3)]
    rows += [_row("regrouped", k, "rnb", s, 0.4 + 0.01 * k, 11.0, flops=1e6) for k in (2, 4) for s in range(3)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    readme = tmp_path / "README.md"
    with pytest.raises(ValueError, match="no results block for experiments/out/toy"):
        readme.write_text("# x\n")
        update_readme(readme, out)
    readme.write_text("# x\n<!-- results:experiments/out/toy -->\nold\n<!-- /results:experiments/out/toy -->\ntail\n")
    update_readme(readme, out)
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n") and blocks_in(text) == ["experiments/out/toy"]
    table = [line for line in text.splitlines() if line.startswith("| regrouped-k3/")]
    assert table[0].startswith("| regrouped-k3/stratified | 3 | 0.5000 ± 0.0200 | baseline |")
    d = np.subtract(rnb, base)  # paired by seed, by hand
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert (
        f"| {d.mean():.4f} [{d.mean() - half:.4f}, {d.mean() + half:.4f}] | lower (better) beyond noise |" in table[1]
    )
    assert "0.100%" in table[1]  # extra FLOPs / training FLOPs
    assert "k = 2, 3, 4" in text and "Pearson r" in text
    update_readme(readme, out)
    assert readme.read_text() == text  # same results, same block


def test_a_readme_without_the_block_fails_before_any_run(tmp_path, capsys):
    from rbvl.cli import main

    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({"name": "toy", "recipe": "recipes/demo_tiny_rnb.yaml", "data": {"k": 3}}))
    (tmp_path / "README.md").write_text("# x\n")
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out), "--readme", str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rbvl: error: --readme") and "no results block for out" in err[-1]
    assert not out.exists()  # nothing ran
