"""Where each cell's mixer put its weight, how steady p stayed, and p on a planted domain against a clean control.

Each results.jsonl row carries its run's `mixture` (rbvl.train.metrics.mixture_summary: p averaged over the updates,
the median L1 change of p per update). A planted setting (data_tools/planted.py) has a domain a good mixer should
starve, e.g. `noise`, whose train answers are permuted; its clean control is the same rows with the answers right.
`control:` in the experiment file names the control experiment's folder and that domain, and the report gives, per
cell, p on the domain here, p on it in the control, and their ratio (a mixer that reads the noise puts less there).
"""

from __future__ import annotations

import statistics

from rbvl.experiment.spec import read_results


def mixture_summary(spec, main: dict[str, list[dict]]) -> dict:
    """Per group: mean p per domain over seeds, the median L1 change of p per update, and the control comparison."""
    out: dict = {"groups": {}, "domain": spec.control.domain}
    control = _groups_of(read_results(spec.control.out)) if spec.control.out else {}
    for g, rows in sorted(main.items()):
        mixes = [r["mixture"] for r in rows if r.get("mixture")]
        if not mixes:
            continue
        names = rows[0]["domain_names"]
        p_mean = [statistics.fmean(m["p_mean"][i] for m in mixes) for i in range(len(names))]
        changes = [m["p_l1_median"] for m in mixes if m.get("p_l1_median") is not None]
        entry = {"n": len(mixes), "names": names, "p_mean": p_mean,
                 "p_l1_median": statistics.median(changes) if changes else None}  # fmt: skip
        domain = spec.control.domain
        if domain and domain in names:
            entry["p_domain"] = p_mean[names.index(domain)]
            ref = [r["mixture"]["p_mean"][r["domain_names"].index(domain)]
                   for r in control.get(g, []) if r.get("mixture") and domain in r["domain_names"]]  # fmt: skip
            if ref:
                entry["p_domain_control"] = statistics.fmean(ref)
                entry["control_n"] = len(ref)
                entry["ratio"] = entry["p_domain"] / entry["p_domain_control"] if entry["p_domain_control"] else None
        out["groups"][g] = entry
    return out


def _groups_of(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def mixture_lines(result: dict, fmt) -> list[str]:
    """The report's section: p per domain per cell, p's stability, and the planted domain against the control."""
    groups = result.get("groups") or {}
    if not groups:
        return []
    lines = ["", "## Where the mixers put their weight (p averaged over updates, then over seeds)"]
    by_domains: dict[tuple, list[str]] = {}  # one table per set of domains (original names, a k's clusters)
    for g, e in groups.items():
        by_domains.setdefault(tuple(e["names"]), []).append(g)
    for names, cells in by_domains.items():
        lines += ["", "| cell | n | " + " | ".join(names) + " | median L1 change of p per update |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]  # fmt: skip
        for g in cells:
            e = groups[g]
            ps = " | ".join(fmt(p, 3) for p in e["p_mean"])
            lines.append(f"| {g} | {e['n']} | {ps} | {fmt(e['p_l1_median'], 3)} |")
    lines.append("")
    lines.append("L1 change: 0 = p stays from one update to the next, 2 = all the mass moves.")
    domain = result.get("domain")
    controlled = {g: e for g, e in groups.items() if "p_domain_control" in e}
    if domain and controlled:
        lines += ["", f"## p on `{domain}` against the clean control (the same rows, `{domain}`'s answers right)", "",
                  f"| cell | p_{domain} here | p_{domain} in the control | ratio (a mixer that reads the planted "
                  "defect is below 1) |", "| --- | --- | --- | --- |"]  # fmt: skip
        for g, e in controlled.items():
            lines.append(f"| {g} | {fmt(e['p_domain'], 3)} | {fmt(e['p_domain_control'], 3)} "
                         f"(n={e['control_n']}) | {fmt(e['ratio'], 2)} |")  # fmt: skip
    return lines
