"""The report of `rbvl experiment`, written from results.jsonl alone: report.md, plots, summary.json.

    from rbvl.experiment import summarise, paired
    paired([0.31, 0.30, 0.33], [0.35, 0.36, 0.34])   # mean difference, 95% t interval, verdict

Every number in the report comes from a finished run's row; nothing is typed by hand. Differences are paired by
seed against the baseline cell (the same seed draws the same initial model and data order), with a Student-t 95%
interval; a difference whose interval contains 0 is reported as within noise.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np

from rbvl.experiment.mixture import mixture_lines, mixture_summary
from rbvl.experiment.oracle import SEARCH, headroom, headroom_lines
from rbvl.experiment.regime import regime
from rbvl.experiment.spec import ExperimentSpec

METRIC = "eval_loss_all"  # every eval token, the same records for every grouping (see run.token_weighted)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------


def summarise(values: list[float]) -> dict:
    """n, mean, sample std (ddof 1; 0 for one value)."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(a):
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(a), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def paired(cell: list[float], base: list[float], level: float = 0.95) -> dict:
    """Paired differences cell − base: mean, std, the t interval and a verdict (lower loss is better)."""
    from scipy import stats

    d = np.asarray(cell, dtype=float) - np.asarray(base, dtype=float)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else None, "std": float(d.std(ddof=1)) if n > 1 else None}
    if n < 2:
        return {**out, "low": None, "high": None, "verdict": "one seed: no noise estimate"}
    half = stats.t.ppf(0.5 + level / 2, n - 1) * out["std"] / math.sqrt(n)
    low, high = out["mean"] - half, out["mean"] + half
    if high < 0:
        verdict = "lower (better) beyond noise"
    elif low > 0:
        verdict = "higher (worse) beyond noise"
    else:
        verdict = "within noise"
    return {**out, "low": float(low), "high": float(high), "verdict": verdict}


def correlation(x: list[float], y: list[float]) -> dict:
    """Pearson r and Spearman ρ with their p-values (None below 3 points)."""
    from scipy import stats

    pts = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pts) < 3:
        return {"n": len(pts), "pearson": None, "spearman": None}
    a, b = map(np.asarray, zip(*pts))
    if a.std() == 0 or b.std() == 0:
        return {"n": len(pts), "pearson": None, "spearman": None}
    pr, spr = stats.pearsonr(a, b), stats.spearmanr(a, b)
    return {
        "n": len(pts),
        "pearson": float(pr.statistic),
        "pearson_p": float(pr.pvalue),
        "spearman": float(spr.statistic),
        "spearman_p": float(spr.pvalue),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(x, digits: int = 4) -> str:
    """x to `digits` decimals; `–` for None."""
    return "–" if x is None else f"{x:.{digits}f}"


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    return groups


def resolve_group(name: str, groups: dict, k: int | None) -> str | None:
    """`regrouped/stratified` → the group key `regrouped-k4/stratified`."""
    domains, _, strategy = name.partition("/")
    key = f"regrouped-k{k}/{strategy}" if domains == "regrouped" else name
    return key if key in groups else None


def summarise_experiment(spec: ExperimentSpec, rows: list[dict]) -> tuple[dict, str | None, str | None]:
    """(summary, baseline group, headline group) from the finished rows: what report.md and the README print."""
    main = groups = _groups([r for r in rows if not r.get("label", "").startswith(SEARCH)])
    base_key = resolve_group(spec.baseline, groups, spec.data.k)
    head_key = resolve_group(spec.headline, groups, spec.data.k)
    summary = {"experiment": spec.name, "metric": METRIC, "groups": {}, "paired": {}, "k_sweep": {}, "cost": {}}
    for g, rs in main.items():
        summary["groups"][g] = {
            METRIC: summarise([r[METRIC] for r in rs]),
            "eval_loss_q": summarise([r["eval_loss_q"] for r in rs]),
            "wall_s": summarise([r["wall_s"] for r in rs]),
            "seeds": sorted(r["seed"] for r in rs),
        }
    if base_key:
        for g, rs in main.items():
            if g != base_key and (p := _paired_by_seed(rs, main[base_key])):
                summary["paired"][g] = p
    # Balance's own effect: every cell against stratified on the same domains; and the headline against the
    # original domains' stratified cell (does full R&B beat what a user would run without rbvl?)
    summary["paired_vs_stratified"] = {}
    for g, rs in main.items():
        ref = g.split("/")[0] + "/stratified"
        if g != ref and ref in main and (p := _paired_by_seed(rs, main[ref])):
            summary["paired_vs_stratified"][g] = {"reference": ref, **p}
    if head_key and "original/stratified" in main:
        p = _paired_by_seed(main[head_key], main["original/stratified"])
        summary["headline_vs_original"] = {"reference": "original/stratified", **p} if p else None
    summary["oracle"] = _headroom(spec, main)
    summary["mixture"] = mixture_summary(spec, main)
    summary["cost"] = _cost_table(main)
    summary["k_sweep"] = _k_sweep(rows, spec)
    summary["domains_differ"] = _domains_differ(main.get(base_key) or [])
    return summary, base_key, head_key


def _headroom(spec: ExperimentSpec, main: dict) -> dict:
    """The oracle's headroom over stratified on its domains, and each other cell there's share of it."""
    if not spec.oracle.domains:
        return {}
    where = "original" if spec.oracle.domains == "original" else f"regrouped-k{spec.data.k}"
    by_seed = {g: {r["seed"]: r[METRIC] for r in rs} for g, rs in main.items() if g.startswith(f"{where}/")}
    strat, best = by_seed.pop(f"{where}/stratified", {}), by_seed.pop(f"{where}/manual+oracle", {})
    return headroom(strat, best, by_seed, paired)


def _paired_by_seed(rows: list[dict], reference: list[dict]) -> dict | None:
    """`paired` over the seeds both cells ran (None when they share none)."""
    ref = {r["seed"]: r[METRIC] for r in reference}
    common = [r for r in rows if r["seed"] in ref]
    if not common:
        return None
    return paired([r[METRIC] for r in common], [ref[r["seed"]] for r in common])


def write_report(spec: ExperimentSpec, cells, rows: list[dict], out: Path, source: str = "") -> Path:
    """report.md + summary.json + PNG plots in `out` from the finished rows; returns report.md."""
    main = _groups([r for r in rows if not r.get("label", "").startswith(SEARCH)])
    summary, base_key, head_key = summarise_experiment(spec, rows)
    plots = _plots(main, summary, out, base_key)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = _header_lines(spec, rows, out, source)
    for g in sorted(main):
        s = summary["groups"][g]
        mark = " (baseline)" if g == base_key else " (headline)" if g == head_key else ""
        lines.append(
            f"| {g}{mark} | {s[METRIC]['n']} | {fmt(s[METRIC]['mean'])} ± {fmt(s[METRIC]['std'])} | "
            f"{fmt(s['eval_loss_q']['mean'])} ± {fmt(s['eval_loss_q']['std'])} | "
            f"{fmt(s['wall_s']['mean'], 1)} ± {fmt(s['wall_s']['std'], 1)} |"
        )
    lines += _paired_lines(spec, summary, base_key, head_key)
    lines += headroom_lines(summary["oracle"], fmt)
    lines += mixture_lines(summary["mixture"], fmt)
    lines += _k_sweep_lines(summary["k_sweep"])
    lines += _cost_lines(summary["cost"])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Every run's resolved config, final per-domain losses and cost are in `results.jsonl`."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _header_lines(spec: ExperimentSpec, rows: list[dict], out: Path, source: str) -> list[str]:
    """Title, notes, where and when the runs ran, the metric, and the head of the results table."""
    lines = [f"# {spec.name}: R&B against its ablations and peers", ""]
    if spec.role:
        lines += [f"Role: {spec.role} setting ("
                  + ("defaults were chosen here)." if spec.role == "development" else "nothing was tuned here)."), ""]  # fmt: skip
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    if rows and regime(rows[0]):
        lines += [f"Regime: {regime(rows[0])}", ""]
    where = (rows[0].get("machine") if rows else None) or {  # where the runs ran (rows of rbvl ≤ 0.2: here)
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": _torch_version(),
    }
    finished = sorted(r["finished"] for r in rows if r.get("finished"))
    lines += [
        f"Produced by `rbvl experiment {source}` from {len(rows)} finished runs ({out / 'results.jsonl'}); "
        f"machine: {where['machine']}, {where['cpus']} CPUs, {where['platform']}, torch {where['torch']}"
        + (f"; runs finished {finished[0]} to {finished[-1]}" if finished else "")
        + f"; report written {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"Metric: final eval loss over every eval token (`{METRIC}`): the same eval records for every grouping, "
        "so original and regrouped domains compare directly. The q-weighted loss (each grouping's own eval "
        "shares) is given too; it compares runs only within one grouping.",
        "",
        "## Results (mean ± std over seeds)",
        "",
        "| cell | seeds | eval loss (all tokens) | q-weighted | wall clock s |",
        "| --- | --- | --- | --- | --- |",
    ]
    return lines


def _paired_lines(spec: ExperimentSpec, summary: dict, base_key: str | None, head_key: str | None) -> list[str]:
    """Paired differences against the baseline and against stratified on the same domains; do the domains and
    the mixture matter here?"""
    lines = ["", f"## Paired differences against {base_key or spec.baseline} (same seed; 95% t interval)", ""]
    if not summary["paired"]:
        lines.append("No baseline runs finished yet.")
    else:
        lines += ["| cell | n | mean difference | 95% interval | verdict |", "| --- | --- | --- | --- | --- |"]
        for g, p in sorted(summary["paired"].items()):
            lines.append(
                f"| {g} | {p['n']} | {fmt(p['mean'])} | [{fmt(p['low'])}, {fmt(p['high'])}] | {p['verdict']} |"
            )
        if head_key in summary["paired"]:
            p = summary["paired"][head_key]
            lines += ["", f"Headline: {head_key} vs {base_key}: {fmt(p['mean'])} ({p['verdict']})."]
    vs_orig = summary.get("headline_vs_original")
    if vs_orig:
        lines.append(
            f"Headline vs original/stratified (the original domains, no mixing): {fmt(vs_orig['mean'])} "
            f"[{fmt(vs_orig['low'])}, {fmt(vs_orig['high'])}] ({vs_orig['verdict']})."
        )
    others = {g: p for g, p in summary["paired_vs_stratified"].items() if p["reference"] != base_key}
    if others:  # those against the baseline are in the table above
        lines += [
            "",
            "## Against stratified on the same domains (the mixer's own effect; same seed, 95% t interval)",
            "",
            "| cell | against | n | mean difference | 95% interval | verdict |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for g, p in sorted(others.items()):
            lines.append(
                f"| {g} | {p['reference']} | {p['n']} | {fmt(p['mean'])} | [{fmt(p['low'])}, {fmt(p['high'])}] | "
                f"{p['verdict']} |"
            )
    dd = summary["domains_differ"]
    if dd:
        lines += [
            "",
            f"Do the domains differ? On the baseline runs, per-domain eval losses range from {fmt(dd['min'])} to "
            f"{fmt(dd['max'])} (spread {fmt(dd['spread'])}; the seed-to-seed std of one domain's loss is at most "
            f"{fmt(dd['max_seed_std'])}).",
        ]
    natural = resolve_group(spec.baseline.rsplit("/", 1)[0] + "/natural", summary["groups"], spec.data.k)
    if natural in summary["paired"]:
        p = summary["paired"][natural]
        lines += [
            "",
            f"Does the mixture matter here? {natural} (sampling by domain size) against {base_key}: "
            f"{fmt(p['mean'])} [{fmt(p['low'])}, {fmt(p['high'])}], {p['verdict']}. When this is within noise, "
            "the setting cannot tell mixers apart at these seeds either.",
        ]
    return lines


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


def _domains_differ(rows: list[dict]) -> dict:
    if not rows:
        return {}
    per = np.array([[x if x is not None else np.nan for x in r["eval"]["loss_per_domain"]] for r in rows])
    means = np.nanmean(per, axis=0)
    seed_std = np.nanstd(per, axis=0, ddof=1) if len(rows) > 1 else np.zeros(per.shape[1])
    return {
        "min": float(np.nanmin(means)),
        "max": float(np.nanmax(means)),
        "spread": float(np.nanmax(means) - np.nanmin(means)),
        "max_seed_std": float(np.nanmax(seed_std)),
    }


def _cost_table(groups: dict) -> dict:
    table = {}
    stratified_wall = {}
    for g, rs in groups.items():
        if g.endswith("/stratified"):
            stratified_wall[g.split("/")[0]] = {r["seed"]: r["wall_s"] for r in rs}
    for g, rs in groups.items():
        costs = [r.get("cost") or {} for r in rs]
        ref = stratified_wall.get(g.split("/")[0], {})
        over = [r["wall_s"] / ref[r["seed"]] - 1 for r in rs if r["seed"] in ref]
        flops_share = [
            (r["cost"] or {}).get("flops", 0) / r["train_flops"] for r in rs if r.get("train_flops") and r.get("cost")
        ]
        table[g] = {
            "wall_s": summarise([r["wall_s"] for r in rs])["mean"],
            "wall_overhead_vs_stratified": summarise(over)["mean"] if over else None,
            "extra_forward_tokens": summarise([c.get("forward_tokens") for c in costs])["mean"],
            "extra_backward_tokens": summarise([c.get("backward_tokens") for c in costs])["mean"],
            "extra_flops": summarise([c.get("flops") for c in costs])["mean"],
            "extra_flops_share": summarise(flops_share)["mean"] if flops_share else None,
            "mixer_seconds": summarise([c.get("seconds") for c in costs])["mean"],
        }
    return table


def _cost_lines(cost: dict) -> list[str]:
    lines = [
        "",
        "## Cost (means over seeds; extra = work the mixer adds beyond ordinary training)",
        "",
        "| cell | wall clock s | wall vs stratified | extra fwd tokens | extra bwd tokens | extra FLOPs | "
        "extra FLOPs / training FLOPs | mixer s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, c in sorted(cost.items()):
        pct = c["wall_overhead_vs_stratified"]
        share, flops = c["extra_flops_share"], c["extra_flops"]
        lines.append(
            f"| {g} | {fmt(c['wall_s'], 1)} | {'–' if pct is None else f'{100 * pct:+.1f}%'} | "
            f"{fmt(c['extra_forward_tokens'], 0)} | {fmt(c['extra_backward_tokens'], 0)} | "
            f"{'–' if flops is None else f'{flops:.3g}'} | "
            f"{'–' if share is None else f'{100 * share:.3f}%'} | {fmt(c['mixer_seconds'], 2)} |"
        )
    lines.append("")
    lines.append(
        "DoReMi's cost excludes training its reference model (one more full run: the stratified cell of the same "
        "seed). `–`: the run reported no measured cost."
    )
    return lines


def _k_sweep(rows: list[dict], spec: ExperimentSpec) -> dict:
    ks = sorted({r["k"] for r in rows if r.get("k") in spec.k_sweep.ks})
    if not ks:
        return {}
    by_k = {}
    for k in ks:
        rs = [r for r in rows if r.get("k") == k and r["strategy"] == spec.k_sweep.strategy and not r.get("label")]
        by_k[k] = {
            "loss": summarise([r[METRIC] for r in rs]),
            "silhouette": next((r["silhouette"] for r in rs if r.get("silhouette") is not None), None),
        }
    means = [by_k[k]["loss"]["mean"] for k in ks]
    return {
        "strategy": spec.k_sweep.strategy,
        "by_k": {str(k): v for k, v in by_k.items()},
        "loss_vs_k": correlation(ks, means),
        "loss_vs_silhouette": correlation([by_k[k]["silhouette"] for k in ks], means),
    }


def _k_sweep_lines(sweep: dict) -> list[str]:
    if not sweep:
        return []
    lines = [
        "",
        f"## k sweep ({sweep['strategy']} on the clusters at each k)",
        "",
        "| k | silhouette | eval loss (all tokens) |",
        "| --- | --- | --- |",
    ]
    for k, v in sweep["by_k"].items():
        lines.append(f"| {k} | {fmt(v['silhouette'])} | {fmt(v['loss']['mean'])} ± {fmt(v['loss']['std'])} |")
    for name, c in (("k", sweep["loss_vs_k"]), ("silhouette", sweep["loss_vs_silhouette"])):
        if c["pearson"] is None:
            lines.append(f"\nLoss vs {name}: too few points (or no spread) for a correlation ({c['n']} points).")
        else:
            lines.append(
                f"\nLoss vs {name}: Pearson r = {c['pearson']:.3f} (p = {c['pearson_p']:.3g}), Spearman ρ = "
                f"{c['spearman']:.3f} (p = {c['spearman_p']:.3g}), {c['n']} points (means over seeds)."
            )
    return lines


def _plots(groups: dict, summary: dict, out: Path, base_key: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = sorted(groups)
    if names:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
        means = [summary["groups"][g][METRIC]["mean"] or np.nan for g in names]
        stds = [summary["groups"][g][METRIC]["std"] or 0.0 for g in names]
        colors = ["tab:gray" if g == base_key else "tab:blue" for g in names]
        ax.barh(names, means, xerr=stds, color=colors, capsize=3)
        for i, g in enumerate(names):  # every seed, so the spread is visible
            ax.plot([r[METRIC] for r in groups[g]], [i] * len(groups[g]), "k.", ms=4)
        lo = np.nanmin([r[METRIC] for rs in groups.values() for r in rs if r[METRIC] is not None] or [0])
        ax.set_xlim(left=lo * 0.97)
        ax.set_xlabel("final eval loss (all eval tokens); bars: mean ± std, dots: seeds")
        fig.tight_layout()
        written.append(out / "eval_loss.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    sweep = summary.get("k_sweep")
    if sweep:
        ks = [int(k) for k in sweep["by_k"]]
        mean = [sweep["by_k"][str(k)]["loss"]["mean"] for k in ks]
        std = [sweep["by_k"][str(k)]["loss"]["std"] or 0 for k in ks]
        sil = [sweep["by_k"][str(k)]["silhouette"] for k in ks]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].errorbar(ks, mean, yerr=std, marker="o", capsize=3)
        axes[0].set_xlabel("k")
        axes[0].set_ylabel("final eval loss (all eval tokens)")
        axes[1].errorbar([s if s is not None else np.nan for s in sil], mean, yerr=std, fmt="o", capsize=3)
        for k, s, m in zip(ks, sil, mean):
            if s is not None:
                axes[1].annotate(f"k={k}", (s, m), textcoords="offset points", xytext=(4, 4))
        axes[1].set_xlabel("silhouette")
        r = sweep["loss_vs_silhouette"].get("pearson")
        axes[1].set_title("" if r is None else f"Pearson r = {r:.2f}")
        fig.tight_layout()
        written.append(out / "k_sweep.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
