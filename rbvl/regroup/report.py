"""The human side of Regroup: OUT/summary.md with PNG plots, and a short summary on the terminal."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


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


def write_summary(out: Path, manifest: dict, x: np.ndarray, clusters: np.ndarray, labels: list, plots: bool = True):
    """summary.md: the k sweep, cluster sizes with top labels, example texts; plus sweep / sizes / projection PNGs."""
    pngs = _plots(out, manifest, x, clusters, labels) if plots else []
    c = manifest["counts"]
    lines = [
        "# Regroup summary",
        "",
        f"Embedder `{manifest['embedder']['name']}` (combine {manifest['embedder']['combine']}, "
        f"dim {manifest['embedder']['dim']}); chosen k = **{manifest['k']}**.",
        "",
        f"Train: {c['train']['in']} in, {c['train']['written']} written, {c['train']['rejected']} rejected. "
        f"Eval: {c['eval']['in']} in, {c['eval']['written']} written, {c['eval']['rejected']} rejected "
        "(reasons in `rejects.jsonl`).",
        "",
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
        ax.scatter(xy[:, 0], xy[:, 1], c=clusters[rows], s=4, cmap="tab20")
        ax.set_title("PCA of the embeddings, coloured by cluster")
        fig.tight_layout()
        fig.savefig(out / "projection.png", dpi=100)
        plt.close(fig)
        names.append("projection.png")
    return names


def print_summary(manifest: dict, stats: dict, out: Path) -> None:
    """A few lines for the terminal: counts, k, sweep, cluster sizes, where things are."""
    c = manifest["counts"]
    print(f"rbvl-regroup: {manifest['embedder']['name']} → k = {manifest['k']} clusters in {out}")
    for split in ("train", "eval"):
        if c[split]["in"]:
            print(f"  {split}: {c[split]['in']} in = {c[split]['written']} written + {c[split]['rejected']} rejected")
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
    print(f"  see {out / 'summary.md'}")
