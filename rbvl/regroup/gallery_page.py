"""The cluster gallery's page: the k sweep and projection PNGs, and index.html (inline CSS, no JavaScript).

`rbvl.regroup.gallery` reads the shards and chooses the cards; this module only draws and writes. Every value that
comes from the data goes through `html.escape`.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

# matplotlib's tab10 then the light half of tab20: the page and the plots give cluster c the same colour.
COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip


def colour(c: int) -> str:
    return COLOURS[c % len(COLOURS)]


def draw_plots(
    folder: Path, manifest: dict, x, labels, sizes: list[int], centroids, note: str
) -> list[tuple[str, str]]:
    """sweep.png and projection.png in the gallery folder; returns [(file, caption)].

    x (n, d) and labels (n,) are a sample of the train embeddings and their clusters, or None: then the centroids
    (k, d) are projected instead, with areas from `sizes` (train records per cluster).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    figures = []
    sweep = manifest.get("sweep") or []
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        ks = [s["k"] for s in sweep]
        ax.plot(ks, [np.nan if s.get("silhouette") is None else s["silhouette"] for s in sweep], "o-", color="C0")
        ax.set_xlabel("k")
        ax.set_xticks(ks)
        ax.set_ylabel("silhouette", color="C0")
        ax2 = ax.twinx()
        ax2.plot(ks, [s.get("inertia") for s in sweep], "s--", color="gray")
        ax2.set_ylabel("inertia", color="gray")
        ax.axvline(manifest.get("k", ks[0]), color="red", lw=0.8)
        ax.set_title(f"k sweep (chosen k = {manifest.get('k')})")
        fig.tight_layout()
        fig.savefig(folder / "sweep.png", dpi=100)
        plt.close(fig)
        figures.append(("sweep.png", "Silhouette (left) and inertia (right) per k; the red line is the chosen k."))

    if x is not None and len(x) >= 3 and x.shape[1] >= 2:
        pca = PCA(n_components=2, random_state=0).fit(x)
        xy = pca.transform(x)  # (n, 2)
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.scatter(xy[:, 0], xy[:, 1], c=[colour(c) for c in labels.tolist()], s=9, alpha=0.75, linewidths=0)
        centres = pca.transform(centroids) if centroids is not None and centroids.shape[1] == x.shape[1] else None
        for c in np.unique(labels).tolist():
            at = centres[c] if centres is not None and c < len(centres) else np.median(xy[labels == c], axis=0)
            ax.annotate(str(c), at, ha="center", va="center", fontsize=9, weight="bold",
                        bbox={"boxstyle": "circle,pad=0.2", "fc": "white", "ec": colour(c), "lw": 1.5, "alpha": 0.8})  # fmt: skip
        ax.set_title("PCA of the embeddings, coloured by cluster")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(folder / "projection.png", dpi=100)
        plt.close(fig)
        figures.append(("projection.png", f"{len(x):,} train records ({note}); numbers mark the centroids."))
    elif centroids is not None and len(centroids) >= 2 and centroids.shape[1] >= 2:
        xy = PCA(n_components=2, random_state=0).fit_transform(centroids)  # (k, 2)
        sizes = np.array(list(sizes) + [0] * (len(xy) - len(sizes)))[: len(xy)]
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.scatter(xy[:, 0], xy[:, 1], s=60 + 1500 * sizes / max(1, sizes.max()),
                   c=[colour(c) for c in range(len(xy))], alpha=0.6)  # fmt: skip
        for c, at in enumerate(xy):
            ax.annotate(str(c), at, ha="center", va="center", fontsize=9, weight="bold")
        ax.margins(0.18)  # room for the largest discs
        ax.set_title("PCA of the centroids (area ∝ cluster size)")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(folder / "projection.png", dpi=100)
        plt.close(fig)
        figures.append(("projection.png", f"Centroids only: {note}."))
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f7;color:#1d2330;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif}
main{max-width:1320px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px}
h3{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#5b6475;margin:16px 0 8px}
.sub{color:#5b6475;margin:0 0 14px}
.warn{background:#fff4e5;border:1px solid #f0c36d;border-radius:6px;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px #0002}
th,td{padding:6px 10px;text-align:left;border-bottom:1px solid #eceef2;vertical-align:middle}
th{background:#f8f9fb;font-weight:600;color:#3a4252;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eef6ff}
.bar{display:inline-block;height:8px;border-radius:4px;margin-right:6px;vertical-align:middle}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.chip{display:inline-block;background:#eef0f4;border-radius:10px;padding:1px 8px;margin:1px 3px 1px 0;
font-size:12px;white-space:nowrap}
.chip b{font-weight:600;color:#5b6475;margin-left:3px}
.figs{display:flex;flex-wrap:wrap;gap:16px}
.figs{align-items:flex-start}
figure{margin:0;background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px #0002;max-width:440px}
figure img{max-width:100%;display:block}
figcaption{color:#5b6475;font-size:12px;margin-top:6px}
section.cluster{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;margin:22px 0;padding:14px 18px;
border-top:6px solid var(--c)}
section.cluster h2{margin:0 0 6px;display:flex;align-items:baseline;gap:12px;flex-wrap:wrap}
.stats{color:#3a4252;display:flex;gap:18px;flex-wrap:wrap;font-size:13px;margin-bottom:4px}
.stats span b{font-size:15px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fafbfc;border:1px solid #e4e7ec;border-radius:8px;overflow:hidden;display:flex;
flex-direction:column;min-height:100%}
.card .img{height:140px;background:#e9ecf1;display:flex;align-items:center;justify-content:center}
.card .img img{max-width:100%;max-height:140px;width:auto;height:auto;object-fit:contain}
.card .img img.px{image-rendering:pixelated;width:112px;height:112px}
.card .cap{padding:6px 8px;font-size:12px}
.q{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
.a{color:#2456a4;display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
.meta{color:#7a8294;font-size:11px;margin-top:3px;display:flex;justify-content:space-between;gap:6px}
.meta .lab{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.card.text{background:#fffdf3;border-color:#efe4b8}
.card.text .q{-webkit-line-clamp:7;font-size:12.5px}
.tag{display:inline-block;background:#efe4b8;color:#6b5a17;border-radius:4px;padding:0 5px;font-size:10px;
margin-bottom:4px;text-transform:uppercase;letter-spacing:.04em}
.bad{color:#a33;font-size:12px;padding:8px}
.empty{color:#7a8294;font-style:italic}
nav a{color:inherit;text-decoration:none}
nav a:hover{text-decoration:underline}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def render(manifest, views, cards, figures, note, problems, have_embeddings, rejected=None) -> str:
    """The whole page as one HTML string; every value from the data goes through html.escape. `rejected`:
    {split: [(reason, count, example rejects.jsonl rows)]} (rbvl.regroup.report.read_rejects)."""
    k = len(views)
    counts = manifest.get("counts") or {}
    q = manifest.get("eval_distribution") or []
    total = sum(v.n for v in views) or 1
    biggest = max([v.n for v in views] + [1])
    emb = manifest.get("embedder") or {}
    lab = manifest.get("labels") or {}
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Regroup gallery · k = {k}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Regroup gallery · {k} cluster{'s' if k != 1 else ''}</h1>",
    ]
    sub = [f"embedder <b>{_e(emb.get('name', '?'))}</b>"]
    for split in ("train", "eval"):
        c = counts.get(split)
        if c and c.get("in"):
            sub.append(f"{split} {c.get('in', 0):,} in · {c.get('written', 0):,} written · {c.get('rejected', 0):,} "
                       "rejected")  # fmt: skip
    if lab.get("nmi") is not None:
        sub.append(f"NMI with the original labels {_num(lab['nmi'])}")
    if manifest.get("created"):
        sub.append(_e(manifest["created"]))
    parts.append(f'<p class="sub">{" · ".join(sub)}</p>')
    parts += [f'<div class="warn">{_e(p)}</div>' for p in problems[:20]]
    if len(problems) > 20:
        parts.append(f'<div class="warn">… and {len(problems) - 20} more problems</div>')
    if not have_embeddings:
        parts.append(f'<div class="warn">Silhouettes not available: {_e(note)}.</div>')

    # overview table
    parts += [
        "<h2>Clusters at a glance</h2><nav><table><tr><th>cluster</th><th>train records</th><th>eval</th>"
        "<th>eval share</th><th>silhouette</th><th>mean dist.</th><th>top original labels</th></tr>"
    ]
    for v in views:
        entry = manifest["clusters"][views.index(v)]
        share = _num(q[v.id], ".1%") if v.id < len(q) else "–"
        width = int(120 * v.n / biggest)
        parts.append(
            f'<tr><td><a href="#{_e(entry.get("name", v.id))}"><span class="sw" style="background:{colour(v.id)}">'
            f"</span>{_e(entry.get('name', v.id))}</a></td>"
            f'<td><span class="bar" style="width:{width}px;background:{colour(v.id)}"></span>{v.n:,} '
            f'<span class="sub">({v.n / total:.1%})</span></td>'
            f'<td class="num">{int(entry.get("n_eval", 0)):,}</td><td class="num">{share}</td>'
            f'<td class="num">{_num(v.silhouette)}</td>'
            f'<td class="num">{_num(v.sum_distance / v.n if v.n else None)}</td>'
            f"<td>{_labels(entry, 3)}</td></tr>"
        )
    parts.append("</table></nav>")

    # k sweep and plots
    sweep = manifest.get("sweep") or []
    if sweep or figures:
        title = "k sweep" + (" and projection" if figures and figures[-1][0] == "projection.png" else "")
        parts.append(f'<h2>{title if sweep else "Projection"}</h2><div class="figs">')
    if sweep:
        parts.append("<div><table><tr><th>k</th><th>silhouette</th><th>inertia</th></tr>")
        for s in sweep:
            best = ' class="best"' if s.get("k") == manifest.get("k") else ""
            mark = " ← chosen" if best else ""
            parts.append(f'<tr{best}><td>{_e(s.get("k"))}{mark}</td><td class="num">{_num(s.get("silhouette"))}</td>'
                         f'<td class="num">{_num(s.get("inertia"), ".4g")}</td></tr>')  # fmt: skip
        parts.append("</table></div>")
    for name, caption in figures:
        parts.append(f'<figure><img src="{_e(name)}" alt="{_e(name)}"><figcaption>{_e(caption)}</figcaption>'
                     "</figure>")  # fmt: skip
    if sweep or figures:
        parts.append("</div>")

    parts += _rejected(rejected or {})

    # one section per cluster
    for i, v in enumerate(views):
        entry = manifest["clusters"][i]
        name = entry.get("name", f"cluster {v.id}")
        share = _num(q[v.id], ".1%") if v.id < len(q) else "–"
        evals = f"<b>{int(entry.get('n_eval', 0)):,}</b> eval · share <b>{share}</b>" if q else "no eval set"
        sil = (f"<b>{_num(v.silhouette)}</b> mean silhouette ({v.n_silhouette:,} rows)" if v.silhouette is not None
               else "silhouette <b>n/a</b>" + ("" if have_embeddings else " (no embeddings)"))  # fmt: skip
        parts += [
            f'<section class="cluster" id="{_e(name)}" style="--c:{colour(v.id)}">',
            f'<h2><span><span class="sw" style="background:{colour(v.id)}"></span>{_e(name)}</span>'
            f'<span class="chip">{v.n:,} train · {v.n / total:.1%}</span></h2>',
            f'<div class="stats"><span>{evals}</span>'
            f"<span>{sil}</span>"
            f"<span><b>{_num(v.sum_distance / v.n if v.n else None)}</b> mean distance to centroid</span>"
            f"<span><b>{v.n_images:,}</b> with images, <b>{v.n - v.n_images:,}</b> text only</span></div>",
            f"<div>top original labels: {_labels(entry, 8)}</div>",
        ]
        nearest, rand = cards[v.id]
        for title, group in (("Nearest the centroid", nearest), ("Random sample", rand)):
            inside = "".join(_card(c) for c in group) or '<p class="empty">none left</p>'
            parts.append(f'<h3>{title} ({len(group)})</h3><div class="grid">{inside}</div>')
        parts.append("</section>")
    parts.append(
        f'<p class="sub">Written by rbvl {_e(manifest.get("tool_version", ""))}; rebuild with '
        "<code>rbvl gallery OUT/</code>.</p></main></body></html>"
    )
    return "\n".join(parts) + "\n"


def _rejected(rejected: dict) -> list[str]:
    """The "Rejected" section: per split, each reason with its count and a few examples (id, source, detail)."""
    if not any(rejected.values()):
        return []
    parts = ['<h2 id="rejected">Rejected</h2><table class="rejected"><tr><th>split</th><th>reason</th>'
             "<th>records</th><th>examples</th></tr>"]  # fmt: skip
    for split, reasons in rejected.items():
        for reason, n, examples in reasons:
            shown = "<br>".join(
                f"<code>{_e(x.get('id') if x.get('id') is not None else x.get('source'))}</code> {_e(x.get('detail', ''))}"
                for x in examples
            )
            parts.append(
                f'<tr><td>{_e(split)}</td><td>{_e(reason)}</td><td class="num">{n:,}</td><td>{shown}</td></tr>'
            )
    parts.append('</table><p class="sub">Every rejected record, with its source, is in <code>rejects.jsonl</code>.</p>')
    return parts


def _labels(entry: dict, n: int) -> str:
    tops = entry.get("top_labels") or []
    if not tops:
        return '<span class="empty">no labels</span>'
    return "".join(f'<span class="chip">{_e(name)}<b>{_e(cnt)}</b></span>' for name, cnt in tops[:n])


def _card(c) -> str:
    title = _e(f"{c.id}\n{c.question}\n→ {c.answer}".strip())
    meta = (f'<div class="meta"><span class="lab">{_e(c.label or "")}</span>'
            f"<span>d={c.distance:.3f}</span></div>")  # fmt: skip
    answer = f'<div class="a">{_e(c.answer)}</div>' if c.answer else ""
    if c.image is None:
        return (f'<div class="card text" data-id="{_e(c.id)}" title="{title}"><div class="cap">'
                f'<span class="tag">text only</span><div class="q">{_e(c.question)}</div>{answer}{meta}</div></div>')  # fmt: skip
    if c.thumb:
        cls = ' class="px"' if c.small else ""
        img = f'<img{cls} src="{_e(c.thumb)}" alt="{_e(c.id)}">'
    else:
        img = f'<div class="bad">{_e(c.error or "image not shown")}</div>'
    return (f'<div class="card" data-id="{_e(c.id)}" title="{title}"><div class="img">{img}</div>'
            f'<div class="cap"><div class="q">{_e(c.question)}</div>{answer}{meta}</div></div>')  # fmt: skip
