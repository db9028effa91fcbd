"""The oracle: the best static mixture at the same step budget, and how much of its gain each mixer captures.

A mixer can only be judged against what mixing could gain at all. The oracle searches the simplex with static
`manual` runs on `search_seeds`: every point of a grid of step `grid_step` when there are at most `grid_max_m`
domains, else the uniform point and `candidates` Dirichlet(1) draws, then `refine` draws around the best so far
(Dirichlet centred on it, concentration `concentration`), the way Aioli's repository searches its static baselines;
last, the natural mixture (each domain's share of the train rows), the static mixture a user has without mixing.
The winner is then trained at `headline_seeds`, seeds the search never saw, so its reported loss is not the minimum
of noisy candidates (which would flatter it).

    headroom      = stratified − oracle                              (paired by seed, t interval)
    share(mixer)  = mean(stratified − mixer) / mean(stratified − oracle)   (bootstrap over seeds, percentile 95%)

A setting whose headroom interval contains 0 cannot rank mixers, and the report says so. The keys are
`OracleSpec`'s (rbvl/experiment/spec.py: the experiment file's `oracle:`).
"""

from __future__ import annotations

import itertools

import numpy as np

SEARCH = "oracle-search"
ORACLE = "oracle"


def first_round(m: int, spec) -> list[np.ndarray]:
    """The first round's mixtures: the grid for small m, else uniform + Dirichlet draws."""
    if m <= spec.grid_max_m:
        n = round(1 / spec.grid_step)
        points = [np.array(c, dtype=float) / n for c in itertools.product(range(n + 1), repeat=m) if sum(c) == n]
        return points
    rng = np.random.default_rng(spec.seed)
    return [np.full(m, 1 / m)] + [rng.dirichlet(np.ones(m)) for _ in range(spec.candidates)]


def refinements(best: np.ndarray, spec) -> list[np.ndarray]:
    """Draws around `best` (none when the first round was a grid)."""
    if len(best) <= spec.grid_max_m:
        return []
    rng = np.random.default_rng(spec.seed + 1)
    return [rng.dirichlet(best * spec.concentration + 0.05) for _ in range(spec.refine)]


def weights_override(names: list[str], p: np.ndarray) -> str:
    """`mixing.weights={a: 0.25, ...}` for the recipe (weights rounded to 4 decimals)."""
    return "mixing.weights={" + ", ".join(f"'{n}': {w:.4f}" for n, w in zip(names, p)) + "}"


def search(names: list[str], spec, score, natural=None) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """Run the search: `score(index, p)` trains mixture p (candidate `index`) at the search seeds and returns its
    mean metric (lower is better). `natural` (the train shares), when given, is the last candidate, so a search
    run before it existed keeps its indices. Returns the best mixture and every (mixture, score)."""
    tried = [(p, score(j, p)) for j, p in enumerate(first_round(len(names), spec))]
    best = min(tried, key=lambda t: t[1])[0]
    offset = len(tried)
    tried += [(p, score(offset + j, p)) for j, p in enumerate(refinements(best, spec))]
    if natural is not None:
        natural = np.asarray(natural, dtype=float) / float(np.sum(natural))
        tried.append((natural, score(len(tried), natural)))
    return min(tried, key=lambda t: t[1])[0], tried


def headroom(stratified: dict[int, float], oracle: dict[int, float], mixers: dict[str, dict[int, float]], paired,
             n_boot: int = 2000) -> dict:  # fmt: skip
    """Headroom = stratified − oracle (paired by seed) and each mixer's captured share with a bootstrap interval.

    Each mapping is seed → metric (lower is better); `paired` is rbvl.experiment.report.paired (the t interval)."""
    seeds = sorted(set(stratified) & set(oracle))
    if not seeds:
        return {}
    room = paired([stratified[s] for s in seeds], [oracle[s] for s in seeds])
    out = {"seeds": seeds, "headroom": room, "within_noise": room["low"] is None or room["low"] <= 0, "share": {}}
    rng = np.random.default_rng(0)
    for name, values in mixers.items():
        common = [s for s in seeds if s in values]
        if not common:
            continue
        gain = np.array([stratified[s] - values[s] for s in common])
        full = np.array([stratified[s] - oracle[s] for s in common])
        share = float(gain.mean() / full.mean()) if full.mean() else None
        boot = rng.integers(0, len(common), size=(n_boot, len(common)))
        ratios = gain[boot].mean(1) / np.where(full[boot].mean(1) == 0, np.nan, full[boot].mean(1))
        ratios = ratios[np.isfinite(ratios)]  # a resample whose oracle equals stratified has no share
        low, high = (None, None)  # no interval from one seed, or when no resample has any headroom
        if len(common) > 1 and ratios.size:
            low, high = np.percentile(ratios, [2.5, 97.5]).tolist()
        out["share"][name] = {"n": len(common), "share": share, "low": low, "high": high}
    return out


def headroom_lines(result: dict, fmt) -> list[str]:
    """The report's section on the oracle."""
    if not result:
        return []
    h = result["headroom"]
    lines = ["", "## Headroom: the best static mixture (oracle) against stratified", ""]
    lines.append(f"Headroom (stratified − oracle, {h['n']} seeds): {fmt(h['mean'])} [{fmt(h['low'])}, "
                 f"{fmt(h['high'])}].")  # fmt: skip
    if result["within_noise"]:
        lines.append("The headroom is within noise: this setting cannot rank mixers at these seeds.")
    lines += ["", "| cell | n | share of the headroom captured | 95% bootstrap interval |", "| --- | --- | --- | --- |"]
    for name, s in sorted(result["share"].items()):
        lines.append(f"| {name} | {s['n']} | {fmt(s['share'], 2)} | [{fmt(s['low'], 2)}, {fmt(s['high'], 2)}] |")
    return lines
