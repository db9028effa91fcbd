"""The README's results blocks: one per experiment, generated from its results.jsonl and experiment.yaml alone.

    rbvl experiment experiments/digits.yaml --report-only --readme README.md   # rewrites that experiment's block

A block sits between two marker lines that name the experiment's folder relative to the README
(`<!-- results:experiments/out/digits -->` ... `<!-- /results:experiments/out/digits -->`); `update_readme`
replaces what lies between them and nothing else, so the README's numbers are never typed by hand
(tests/test_readme_results.py checks each block against the committed results).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rbvl.config import ConfigError
from rbvl.experiment.regime import regime
from rbvl.experiment.report import METRIC, fmt, resolve_group, summarise_experiment
from rbvl.experiment.spec import ExperimentSpec, load_experiment, read_results

BLOCK_BEGIN = "<!-- results:{path} -->"
BLOCK_END = "<!-- /results:{path} -->"


def readme_block(out: Path, readme_dir: Path) -> str:
    """The README's results block for the experiment in `out`, from its results.jsonl and experiment.yaml alone.

    Main table (the cells at the experiment's k; mean ± std over seeds, the paired difference against the baseline
    with its 95% interval and verdict, wall clock, extra FLOPs), the k sweep's correlations, the plots.
    """
    out = Path(out)
    spec, _ = load_experiment(out / "experiment.yaml")
    rows = read_results(out)
    if not rows:
        raise ValueError(f"{out / 'results.jsonl'}: no finished runs to report")
    summary, base_key, head_key = summarise_experiment(spec, rows)
    rel = Path(os.path.relpath(out, readme_dir)).as_posix()
    machine = rows[0].get("machine") or {}
    days = sorted({r["finished"][:10] for r in rows if r.get("finished")})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else "?"
    source = out.parent.parent / f"{out.name}.yaml"  # experiments/out/NAME was written by experiments/NAME.yaml
    if not source.is_file():  # or by experiments/NA_ME.yaml (file names take underscores, experiment names dashes)
        source = out.parent.parent / f"{out.name.replace('-', '_')}.yaml"
    if not source.is_file():
        source = out / "experiment.yaml"  # the copy the run left (its `out` is this folder): it runs as well
    command = f"rbvl experiment {Path(os.path.relpath(source, readme_dir)).as_posix()}"
    role = {"development": " (development setting: defaults were chosen here)",
            "held-out": " (held-out setting: nothing was tuned here)"}.get(spec.role, "")  # fmt: skip
    oracle = summary.get("oracle") or {}
    shares = {} if oracle.get("within_noise") else oracle.get("share", {})  # a share of noise says nothing
    mixture = (summary.get("mixture") or {}).get("groups", {})
    lines = [
        BLOCK_BEGIN.format(path=rel),
        f"**{spec.name}**{role}: `{command}`, {len(rows)} runs; "
        f"{machine.get('cpus', '?')} CPUs ({machine.get('machine', '?')}), torch {machine.get('torch', '?')}, "
        f"run {when}. Full report: [{rel}/report.md]({rel}/report.md).",
        "",
        *([f"Regime: {regime(rows[0])}", ""] if regime(rows[0]) else []),
        f"| cell | seeds | eval loss (all tokens) | Δ vs {base_key} [95% CI] | verdict | share of headroom [95% CI] | "
        "p change per update | wall s | extra FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    k_main = f"regrouped-k{spec.data.k}/"
    order = [g for g in summary["groups"] if g.startswith("original/") or g.startswith(k_main)]
    order.sort(key=lambda g: (g != base_key, g != head_key, not g.startswith("original/"), g))
    for g in order:
        s, c = summary["groups"][g][METRIC], summary["cost"][g]
        p = summary["paired"].get(g)
        delta = (
            "baseline"
            if g == base_key
            else "–"
            if p is None
            else f"{fmt(p['mean'])} [{fmt(p['low'])}, {fmt(p['high'])}]"
        )
        verdict = "" if g == base_key or p is None else p["verdict"]
        share = c["extra_flops_share"]
        room = shares.get(g)
        room = "–" if room is None else f"{fmt(room['share'], 2)} [{fmt(room['low'], 2)}, {fmt(room['high'], 2)}]"
        l1 = fmt((mixture.get(g) or {}).get("p_l1_median"), 2)
        lines.append(
            f"| {g}{' (headline)' if g == head_key else ''} | {s['n']} | {fmt(s['mean'])} ± {fmt(s['std'])} | "
            f"{delta} | {verdict} | {room} | {l1} | {fmt(c['wall_s'], 1)} | "
            f"{'–' if share is None else f'{100 * share:.3f}%'} |"
        )
    lines += ["", _reading(summary, spec, base_key, head_key)]
    lines += _headroom_sentence(summary.get("oracle"), mixture, spec.control.domain)
    sweep = summary["k_sweep"]
    if sweep:
        ks = ", ".join(sweep["by_k"])
        c = sweep["loss_vs_silhouette"]
        corr = (
            "too few points for a correlation"
            if c["pearson"] is None
            else f"Pearson r = {c['pearson']:.3f} (p = {c['pearson_p']:.3g}), Spearman ρ = {c['spearman']:.3f}"
        )
        lines += ["", f"k sweep ({sweep['strategy']} at k = {ks}): eval loss against silhouette: {corr}."]
    plots = [name for name in ("eval_loss.png", "k_sweep.png") if (out / name).exists()]
    if plots:
        lines += ["", " ".join(f"![{spec.name} {Path(n).stem}]({rel}/{n})" for n in plots)]
    lines.append(BLOCK_END.format(path=rel))
    return "\n".join(lines)


def blocks_in(readme: str) -> list[str]:
    """The experiment folders (relative to the README) whose results blocks the README holds."""
    return re.findall(r"<!-- results:(\S+) -->", readme)


def check_readme(readme: Path, out: Path) -> tuple[str, str, str]:
    """(the README's text, the two marker lines of `out`'s results block); a ConfigError (one line) when the file or
    the block is not there. `rbvl experiment --readme` asks before it trains, so the mistake costs no run."""
    readme = Path(readme)
    if not readme.is_file():
        raise ConfigError(f"--readme {readme}: no such file")
    text = readme.read_text()
    rel = Path(os.path.relpath(out, readme.parent)).as_posix()
    begin, end = BLOCK_BEGIN.format(path=rel), BLOCK_END.format(path=rel)
    if begin not in text or end not in text:
        raise ConfigError(f"--readme {readme}: no results block for {rel}; add the lines `{begin}` and `{end}` where it goes")  # fmt: skip
    return text, begin, end


def update_readme(readme: Path, out: Path) -> None:
    """Replace the README's results block for `out` (it must hold the two marker lines) with a fresh one."""
    readme = Path(readme)
    text, begin, end = check_readme(readme, out)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + readme_block(out, readme.parent) + tail)


def _reading(summary: dict, spec: ExperimentSpec, base_key: str | None, head_key: str | None) -> str:
    """One generated sentence: the verdicts the issue asks about (full R&B, Regroup alone, does the mixture matter)."""
    said = []
    for name, what in (
        (head_key, "full R&B"),
        (resolve_group("original/stratified", summary["groups"], None), "the original domains (stratified)"),
        (resolve_group(spec.baseline.rsplit("/", 1)[0] + "/natural", summary["groups"], spec.data.k), "natural mixing"),
    ):
        p = summary["paired"].get(name)
        if p:
            said.append(f"{what}: {p['verdict']}")
    if not said:
        return f"No paired comparison against {base_key} yet."
    text = f"Against {base_key}, seed by seed: " + "; ".join(said) + "."
    vs_orig = summary.get("headline_vs_original")
    if vs_orig:
        text += f" Full R&B against original/stratified: {vs_orig['verdict']}."
    alone = summary["paired_vs_stratified"].get("original/rnb")
    if alone:
        text += f" Balance alone (original/rnb against original/stratified): {alone['verdict']}."
    return text


def _headroom_sentence(oracle: dict | None, mixture: dict, domain: str) -> list[str]:
    """The oracle's headroom and, on a planted setting, p on the planted domain against the clean control."""
    said = []
    if oracle:
        h = oracle["headroom"]
        said.append(f"Headroom (stratified − the best static mixture, {h['n']} seeds): {fmt(h['mean'])} "
                     f"[{fmt(h['low'])}, {fmt(h['high'])}]" + ("; within noise, so this setting cannot rank mixers."
                                                               if oracle["within_noise"] else "."))  # fmt: skip
    ratios = [f"{g} {fmt(e['p_domain'], 3)} vs {fmt(e['p_domain_control'], 3)} (×{fmt(e['ratio'], 2)})"
              for g, e in mixture.items() if e.get("p_domain_control") is not None]  # fmt: skip
    if ratios:
        said.append(f"p on `{domain}` against the clean control: " + "; ".join(ratios) + ".")
    return ["", " ".join(said)] if said else []
