"""The human side of Regroup: OUT/summary.md with PNG plots, a short summary on the terminal, and what was rejected
said so that a person can act on it (a count per reason with an example record, a hint for a likely mistake)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rbvl.records import Reject, Rejects


@dataclass
class Rejected:
    """One split's rejects as a person reads them: (reason, count, first reject) most frequent first, and hints."""

    split: str
    n_in: int
    reasons: list[tuple[str, int, Reject]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """`missing_image 20 (e.g. r3: data/x.jpg)`, one per reason."""
        return [f"{reason} {n} (e.g. {_example(first)})" for reason, n, first in self.reasons]

    def headline(self, n: int = 3) -> str:
        """The main reasons in one phrase: `28 rejected: missing_image 20 (e.g. ...), bad_json 8 (e.g. ...)`."""
        total = sum(count for _, count, _ in self.reasons)
        more = f", and {len(self.reasons) - n} more reasons" if len(self.reasons) > n else ""
        return f"{total} rejected" + (f": {', '.join(self.lines()[:n])}{more}" if self.reasons else "")


def rejected(rejects: Rejects, split: str, n_in: int, image_root: str | None) -> Rejected:
    """The per-reason view of `split`'s rejects, with a hint for each likely user mistake:

    most records `missing_image`: the image root is probably not where the images are (--image-root);
    every record `missing_field`: the file's columns are not the ones rbvl looks for (its example lists both).
    """
    out = Rejected(split, n_in, rejects.summary(split))
    by_reason = {reason: (n, first) for reason, n, first in out.reasons}
    if "missing_image" in by_reason and 2 * by_reason["missing_image"][0] > n_in:
        n, first = by_reason["missing_image"]
        where = image_root or "each input file's own folder"
        out.hints.append(
            f"{n} of {n_in} {split} records name an image file that is not there (e.g. {first.detail}): did you pass "
            f"--image-root? Relative image paths are resolved against {where}"
        )
    if "missing_field" in by_reason and by_reason["missing_field"][0] == n_in:
        out.hints.append(
            f"every {split} record lacks the fields rbvl reads (its example lists those it looked for and those "
            "the row has): name yours with --conversation-field, --image-field, --prompt-field or --response-field"
        )
    return out


def read_rejects(path: Path, n_examples: int = 3) -> dict[str, list[tuple[str, int, list[dict]]]]:
    """rejects.jsonl as {split: [(reason, count, the first `n_examples` lines)]}, most frequent first (the gallery's
    "Rejected" section); empty when the file is missing, unreadable lines skipped."""
    import json

    found: dict[str, dict[str, list]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            entry = found.setdefault(str(row.get("split")), {}).setdefault(str(row.get("reason")), [0, []])
            entry[0] += 1
            if len(entry[1]) < n_examples:
                entry[1].append(row)
    return {
        split: sorted(((reason, n, ex) for reason, (n, ex) in reasons.items()), key=lambda t: -t[1])
        for split, reasons in found.items()
    }


def _example(r: Reject) -> str:
    who = r.id if r.id is not None else r.source
    return f"{who}: {_short(r.detail, 300)}" if r.detail else str(who)


def examples_per_cluster(records: list, clusters: np.ndarray, distances: np.ndarray, k: int, n: int = 3) -> list:
    """Per cluster, the texts of the `n` records nearest its centroid (shortened to 200 characters)."""
    out = []
    for c in range(k):
        rows = np.flatnonzero(clusters == c)
        rows = rows[np.argsort(distances[rows], kind="stable")[:n]]
        out.append([_short(records[i].text) for i in rows])
    return out


def _short(text: str, n: int = 200) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def write_summary(
    out: Path,
    manifest: dict,
    x: np.ndarray,
    clusters: np.ndarray,
    labels: list,
    plots: bool = True,
    rejects: list[Rejected] = (),
):
    """summary.md: the k sweep, cluster sizes with top labels, example texts, what was rejected and why; plus sweep /
    sizes / projection PNGs."""
    pngs = _plots(out, manifest, x, clusters, labels) if plots else []
    c = manifest["counts"]
    lines = [
        "# Regroup summary",
        "",
        f"Embedder `{manifest['embedder']['name']}` (combine {manifest['embedder']['combine']}, "
        f"dim {manifest['embedder']['dim']}); chosen k = **{manifest['k']}**.",
        "",
        f"Train: {c['train']['in']} in, {c['train']['written']} written, {c['train']['rejected']} rejected. "
        f"Eval: {c['eval']['in']} in, {c['eval']['written']} written, {c['eval']['rejected']} rejected"
        + (" (every one in `rejects.jsonl`)." if c["train"]["rejected"] + c["eval"]["rejected"] else "."),
        "",
        *_notes_line(manifest),
        *_rejected_section(rejects),
        "## k sweep",
        "",
        "| k | silhouette | inertia |",
        "| --- | --- | --- |",
    ]
    for s in manifest["sweep"]:
        mark = " ←" if s["k"] == manifest["k"] else ""
        lines.append(f"| {s['k']}{mark} | {_fmt(s['silhouette'])} | {_fmt(s['inertia'])} |")
    if manifest.get("labels"):
        lab = manifest["labels"]
        lines += [
            "",
            "## Against the original labels",
            "",
            f"NMI {_fmt(lab['nmi'])}; silhouette of the labels {_fmt(lab['silhouette_labels'])}, "
            f"of the clusters {_fmt(lab['silhouette_clusters'])} ({lab['n_labels']} labels).",
        ]
    lines += [
        "",
        "## Clusters",
        "",
        "| cluster | train | eval | eval share | top labels |",
        "| --- | --- | --- | --- | --- |",
    ]
    q = manifest["eval_distribution"]
    for cl in manifest["clusters"]:
        tops = ", ".join(f"{name} ({n})" for name, n in cl["top_labels"]) or "–"
        share = f"{q[cl['id']]:.3f}" if q else "–"
        lines.append(f"| {cl['name']} | {cl['n_train']} | {cl['n_eval']} | {share} | {tops} |")
    lines += ["", "## Examples (nearest the centroid)", ""]
    for cl in manifest["clusters"]:
        lines.append(f"**{cl['name']}**")
        lines += [f"- {t.replace('|', '/')}" for t in cl["examples"]] or ["- (empty)"]
        lines.append("")
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _rejected_section(rejects: list[Rejected]) -> list[str]:
    """summary.md's "Rejected" table (reason, count, an example per split) and its hints; nothing when none were."""
    rows = [(r.split, reason, n, first) for r in rejects for reason, n, first in r.reasons]
    if not rows:
        return []
    lines = ["## Rejected", "", "| split | reason | records | example |", "| --- | --- | --- | --- |"]
    lines += [f"| {split} | {reason} | {n} | {_example(first).replace('|', '/')} |" for split, reason, n, first in rows]
    hints = [h for r in rejects for h in r.hints]
    return [*lines, "", *[f"**Hint:** {h}" for h in hints], *([""] if hints else [])]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _plots(out: Path, manifest: dict, x: np.ndarray, clusters: np.ndarray, labels: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    names = []
    sweep = manifest["sweep"]
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [s["k"] for s in sweep]
        ax.plot(ks, [np.nan if s["silhouette"] is None else s["silhouette"] for s in sweep], "o-", label="silhouette")
        ax.set_xlabel("k")
        ax.set_ylabel("silhouette")
        ax2 = ax.twinx()
        ax2.plot(ks, [s["inertia"] for s in sweep], "s--", color="gray", label="inertia")
        ax2.set_ylabel("inertia")
        ax.axvline(manifest["k"], color="red", lw=0.8)
        ax.set_title("k sweep")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=100)
        plt.close(fig)
        names.append("sweep.png")

    k = manifest["k"]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * k + 2), 3.5))
    present = [lab for lab in labels if lab is not None]
    if present:
        top = [name for name, _ in Counter(map(str, present)).most_common(9)]
        bottom = np.zeros(k)
        for name in [*top, "other"]:
            sel = np.array(
                [(str(lab) == name) if name != "other" else (lab is None or str(lab) not in top) for lab in labels]
            )
            h = np.bincount(clusters[sel], minlength=k)
            ax.bar(range(k), h, bottom=bottom, label=name)
            bottom += h
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.bar(range(k), np.bincount(clusters, minlength=k))
    ax.set_xlabel("cluster")
    ax.set_xticks(range(0, k, max(1, k // 16)))  # whole clusters (matplotlib puts ticks at halves for a few bars)
    ax.set_ylabel("train records")
    ax.set_title("cluster sizes")
    fig.tight_layout()
    fig.savefig(out / "cluster_sizes.png", dpi=100)
    plt.close(fig)
    names.append("cluster_sizes.png")

    if len(x) >= 3 and x.shape[1] >= 2:
        rng = np.random.default_rng(0)
        rows = rng.choice(len(x), size=min(len(x), 20_000), replace=False) if len(x) > 20_000 else np.arange(len(x))
        xy = PCA(n_components=2, random_state=0).fit_transform(x[rows])  # (n, 2)
        fig, ax = plt.subplots(figsize=(5, 4.5))
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=clusters[rows], s=4, cmap="tab20")
        if len(set(clusters[rows].tolist())) <= 20:  # one colour per cluster: say which
            ax.legend(*dots.legend_elements(num=None), title="cluster", fontsize=6, title_fontsize=7, loc="best")
        ax.set_title("PCA of the embeddings, coloured by cluster")
        fig.tight_layout()
        fig.savefig(out / "projection.png", dpi=100)
        plt.close(fig)
        names.append("projection.png")
    return names


def _notes_line(manifest: dict) -> list[str]:
    """The images regroup changed to fit the shards, counted, and where each is listed; nothing when none were."""
    notes = manifest.get("image_notes") or {}
    n = notes.get("count") or 0
    if not n:
        return []
    return [
        f"{n} image{'s' if n != 1 else ''} changed to fit the shards (re-encoded, e.g. 16-bit or BMP; rescaled; cut to "
        f"one frame), each in {notes.get('file')}",
        "",
    ]


def print_summary(manifest: dict, stats: dict, out: Path, rejects: list[Rejected] = ()) -> None:
    """A few lines for the terminal: counts (rejects per reason, with an example), k, sweep, cluster sizes, where
    things are; hints for likely mistakes go to stderr as warnings."""
    import sys

    c = manifest["counts"]
    print(
        f"rbvl-regroup: {manifest['embedder']['name']} → k = {manifest['k']} cluster{'s' if manifest['k'] != 1 else ''} in {out}"
    )
    why = {r.split: r for r in rejects}
    for split in ("train", "eval"):
        if c[split]["in"]:
            print(f"  {split}: {c[split]['in']} in = {c[split]['written']} written + {c[split]['rejected']} rejected")
            for line in why[split].lines() if split in why else []:
                print(f"    rejected: {line}")
    if len(manifest["sweep"]) > 1:
        print("  sweep: " + ", ".join(f"k={s['k']} sil={_fmt(s['silhouette'])}" for s in manifest["sweep"]))
    print("  sizes: " + " ".join(str(cl["n_train"]) for cl in manifest["clusters"]))
    if manifest.get("labels"):
        print(f"  NMI vs original labels: {_fmt(manifest['labels']['nmi'])}")
    if stats:
        print(
            f"  embedded {stats.get('embedded', 0)} (cached {stats.get('reused', 0)}); "
            + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in stats.items() if k.endswith("_s"))
        )
    for line in _notes_line(manifest)[:1]:
        print(f"  {line}")
    print(f"  see {out / 'summary.md'}")
    for hint in [h for r in rejects for h in r.hints]:
        print(f"rbvl-regroup: warning: {hint}", file=sys.stderr)
