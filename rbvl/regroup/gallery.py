"""The cluster gallery: OUT/gallery/index.html, a static page to judge a regrouping by eye.

    rbvl gallery shards/                       # (re)build it for an existing regroup output
    from rbvl.regroup.gallery import write_gallery
    write_gallery("shards/")                   # the same from Python; regroup calls it at its end

Per cluster: its size and eval share, top original labels, mean silhouette, and cards for the records nearest the
centroid and for a seeded random sample (image thumbnails with captions; text-only records as text cards); above them
the k sweep and a 2-D PCA projection of the embeddings coloured by cluster. No server, no network, no JavaScript:
the CSS is inline and the thumbnails are JPEG files in gallery/thumbs/, referenced by relative paths.

Embeddings come from regroup when it calls this, else from its embedding cache (OUT/.cache) when that is still on
disk and matches the shards. Without them the page still shows everything the shards hold (each sample's stored
distance to its centroid picks the nearest ones), says that the silhouette is not available, and projects the
centroids instead of the records.

Cost: each train shard is read once, tar headers and JSON members only (the reader seeks past the image bytes); then
only the chosen images (at most n_nearest + n_random per cluster) are read back and thumbnailed.
"""

from __future__ import annotations

import heapq
import html
import io
import json
import random
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rbvl.regroup.errors import RegroupError

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}
THUMB = 192  # px, the longest side of a thumbnail file
# matplotlib's tab10 then the light half of tab20: the page and the plots give cluster c the same colour.
COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the first dot of the name


def colour(c: int) -> str:
    return COLOURS[c % len(COLOURS)]


@dataclass
class Card:
    """One record shown on the page: where its image lies in its shard, and what its caption says."""

    key: str
    id: str
    label: str | None
    distance: float
    meta: dict  # the sample's JSON; the caption is made from it only for the cards shown
    question: str = ""
    answer: str = ""
    image: tuple[str, int, int] | None = None  # (shard path, byte offset, size) of the image member
    thumb: str | None = None  # gallery-relative path of the written thumbnail
    small: bool = False  # source image under 64 px: scaled up without smoothing
    error: str | None = None  # why the image could not be shown


@dataclass
class ClusterView:
    """What the page shows of one cluster, gathered while its shards are read."""

    id: int
    n: int = 0  # train samples read from its shards
    n_images: int = 0
    sum_distance: float = 0.0
    nearest: list = field(default_factory=list)  # heap of (-distance, order, Card), the n nearest so far
    pool: list = field(default_factory=list)  # reservoir sample of Cards
    silhouette: float | None = None
    n_silhouette: int = 0  # sampled rows of this cluster behind `silhouette`


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def write_gallery(
    out: str | Path,
    manifest: dict | None = None,
    embeddings: tuple[list[str], np.ndarray] | None = None,
    *,
    n_nearest: int = 12,
    n_random: int = 12,
    sample: int = 10_000,
    plots: bool = True,
) -> Path:
    """Write OUT/gallery/index.html (+ thumbs/, plots) for the regroup output in `out`; returns the page's path.

    Args:
        out: the regroup output folder (holding manifest.json), or the manifest.json itself.
        manifest: the manifest (default: read from `out`).
        embeddings: (train ids, (N, d) embeddings) as regroup holds them; default: its cache in OUT/.cache, if any.
        n_nearest: cards per cluster nearest its centroid.
        n_random: cards per cluster drawn at random (seeded by the manifest's seed) from the rest.
        sample: train rows (seeded sample) behind the silhouettes and the projection plot.
        plots: draw the k sweep and projection PNGs (matplotlib).

    Raises:
        RegroupError: no manifest, or one that is not a regroup manifest.
    """
    out = Path(out)
    if out.name == "manifest.json":
        out = out.parent
    manifest = manifest if manifest is not None else read_manifest(out)
    if n_nearest < 0 or n_random < 0 or sample < 0:
        raise RegroupError("n_nearest, n_random and sample must be >= 0")
    k = max((int(e.get("id", i)) for i, e in enumerate(manifest["clusters"])), default=-1) + 1
    seed = int(manifest.get("seed", 0))
    tmp = out / "gallery.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "thumbs").mkdir(parents=True)
    problems: list[str] = []

    views, train_ids, train_clusters = scan_shards(out, manifest, n_nearest, n_random, seed, problems)
    for v, entry in zip(views, manifest["clusters"]):
        if "n_train" in entry and int(entry["n_train"]) != v.n:
            problems.append(
                f"{entry.get('name', v.id)}: manifest says {entry['n_train']} train records, shards hold {v.n}"
            )
    cards = _chosen(views, n_nearest, n_random)
    _write_thumbs([c for pair in cards.values() for group in pair for c in group], tmp / "thumbs")

    x, labels, note = _embedding_sample(out, manifest, embeddings, train_ids, train_clusters, sample, seed)
    if x is not None:
        sil = cluster_silhouettes(x, labels, k)
        for v in views:
            v.silhouette, v.n_silhouette = sil[v.id]
    figures = _plots(tmp, out, manifest, x, labels, views, note) if plots else []
    for line in problems[:5]:
        print(f"rbvl gallery: warning: {line}", file=sys.stderr)
    if len(problems) > 5:
        print(f"rbvl gallery: warning: ... and {len(problems) - 5} more (listed on the page)", file=sys.stderr)
    page = render(manifest, views, cards, figures, note, problems, x is not None)
    (tmp / "index.html").write_text(page, encoding="utf-8")
    final = out / "gallery"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final / "index.html"


def after_regroup(out: Path, manifest: dict, ids: list[str], x: np.ndarray, enabled: bool, plots: bool) -> None:
    """Regroup's last step: write the gallery (or remove a stale one); a failure is a warning, never a lost run."""
    if not enabled:
        shutil.rmtree(Path(out) / "gallery", ignore_errors=True)
        return
    t0 = time.perf_counter()
    try:
        page = write_gallery(out, manifest, (ids, x), plots=plots)
    except Exception as e:  # noqa: BLE001 - the shards and manifest are already complete; say what failed
        print(f"rbvl-regroup: warning: gallery not written ({type(e).__name__}: {e}); "
              f"rebuild it with `rbvl gallery {out}`", file=sys.stderr)  # fmt: skip
        return
    print(f"  gallery: {page} ({time.perf_counter() - t0:.1f}s)")


def read_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise RegroupError(f"no manifest.json in {out} (is it a finished rbvl-regroup output?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegroupError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("clusters"), list):
        raise RegroupError(f"{path} is not a regroup manifest (no 'clusters' list)")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Reading the shards once
# ---------------------------------------------------------------------------------------------------------------------


def iter_shard(path: Path):
    """(key, sample JSON, image member (offset, size) or None) per sample of one tar, without reading image bytes."""
    key, meta, image = None, None, None
    with open(path, "rb") as f:
        for name, offset, size in tar_members(f):
            found = _KEY.match(name)
            if not found:
                continue
            k, ext = found.group(1), found.group(2).lower()
            if k != key:
                if key is not None:
                    yield key, meta, image
                key, meta, image = k, None, None
            if ext == "json":
                f.seek(offset)
                meta = f.read(size)
            elif ext in IMAGE_EXTS and image is None:
                image = (offset, size)
    if key is not None:
        yield key, meta, image


def tar_members(f) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of an uncompressed tar, reading only its headers.

    Python's tarfile parses webdataset's pax headers about 5x slower than this; the formats read are those tarfile
    and webdataset write (ustar, pax `x` records, GNU `L` long names). Raises tarfile.ReadError on a bad header.
    """
    pos, pax, long_name = 0, {}, None
    while True:
        f.seek(pos)
        block = f.read(512)
        if len(block) < 512 or block.count(0) == 512:  # end of archive
            return
        try:
            chk = block[148:156]
            ok = _number(chk) == sum(block) - sum(chk) + 256  # the checksum field counts as 8 spaces
            size, kind = _number(block[124:136]), block[156:157]
        except ValueError:
            ok = False
        if not ok:
            raise tarfile.ReadError(f"bad tar header at byte {pos}")
        data = pos + 512
        if kind in (b"x", b"L"):  # extended header / GNU long name: they apply to the next member
            f.seek(data)
            raw = f.read(size)
            if kind == b"L":
                long_name = raw.rstrip(b"\0").decode("utf-8", "replace")
            else:
                pax = _pax(raw)
        if kind in (b"0", b"\0", b"7"):
            name = pax.get("path") or long_name
            if name is None:
                name, prefix = _text(block[0:100]), _text(block[345:500]) if block[257:262] == b"ustar" else ""
                name = f"{prefix}/{name}" if prefix else name
            if "size" in pax:
                size = int(pax["size"])
            yield name, data, size
        if kind not in (b"x", b"L"):
            pax, long_name = {}, None
        pos = data + (size + 511) // 512 * 512


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit of its first byte is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax(raw: bytes) -> dict[str, str]:
    """pax records `LEN key=value\\n` → {key: value}."""
    out, i = {}, 0
    while i < len(raw):
        sp = raw.find(b" ", i)
        if sp < 0:
            break
        length = int(raw[i:sp])
        key, _, value = raw[sp + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i += length
    return out


def scan_shards(out: Path, manifest: dict, n_nearest: int, n_random: int, seed: int, problems: list[str]):
    """Read every train shard once; per cluster keep the `n_nearest` nearest samples and a reservoir sample.

    Returns (views, train ids, their clusters (N,)). Unreadable shards and samples are listed in `problems`.
    """
    rng = random.Random(seed)
    views, ids, clusters = [], [], []
    order = 0
    for i, entry in enumerate(manifest["clusters"]):
        c = int(entry.get("id", i))
        view = ClusterView(c)
        views.append(view)
        for rel in entry.get("train_shards", []):
            try:
                for card in _cards(out / rel):  # streamed: a shard's samples are never all held
                    if isinstance(card, str):
                        problems.append(f"{rel}: {card}")
                        continue
                    ids.append(card.id)
                    clusters.append(c)
                    order += 1
                    _keep(view, card, order, n_nearest, n_nearest + n_random, rng)
            except (OSError, tarfile.TarError) as e:
                problems.append(f"{rel}: cannot be read ({e})")
    return views, ids, np.asarray(clusters, dtype=np.int64)


def _keep(view: ClusterView, card: Card, order: int, n_nearest: int, pool_size: int, rng: random.Random) -> None:
    """Count `card` in its cluster; keep it if it is among the nearest so far, or drawn into the reservoir."""
    view.n += 1
    view.n_images += card.image is not None
    view.sum_distance += card.distance
    item = (-card.distance, -order, card)  # a heap of the nearest, farthest on top; ties: the earlier sample stays
    if len(view.nearest) < n_nearest:
        heapq.heappush(view.nearest, item)
    elif n_nearest and item > view.nearest[0]:
        heapq.heapreplace(view.nearest, item)
    if len(view.pool) < pool_size:  # room to draw n_random that are not among the nearest
        view.pool.append(card)
    else:
        j = rng.randrange(view.n)
        if j < pool_size:
            view.pool[j] = card


def _cards(path: Path):
    """A Card per sample of one shard, or a one-line string for a sample whose JSON is unusable."""
    for key, raw, image in iter_shard(path):
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            yield f"sample {key}: no readable .json member"
            continue
        try:
            distance = float(meta.get("distance") or 0.0)
        except (TypeError, ValueError):
            distance = 0.0
        label = meta.get("label")
        yield Card(
            key=key,
            id=str(meta.get("id", key)),
            label=None if label is None else str(label),
            distance=distance,
            meta=meta,
            image=None if image is None else (str(path), *image),
        )


def _caption(meta: dict) -> tuple[str, str]:
    """The first user turn (without the <image> placeholder) and the first assistant turn after it."""
    turns = meta.get("conversation") if isinstance(meta.get("conversation"), list) else []
    question = answer = ""
    for t in turns:
        if not isinstance(t, dict):
            continue
        role, content = t.get("role"), str(t.get("content", ""))
        if role == "user" and not question:
            question = content.replace("<image>", " ")
        elif role == "assistant" and question and not answer:
            answer = content
    if not question:
        question = str(meta.get("text") or "")
    return _short(question, 400), _short(answer, 200)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _chosen(views: list[ClusterView], n_nearest: int, n_random: int) -> dict[int, tuple[list, list]]:
    """Per cluster: (nearest first by distance, random sample of the others)."""
    chosen = {}
    for v in views:
        nearest = [card for _, _, card in sorted(v.nearest, key=lambda t: (-t[0], -t[1]))]
        taken = {card.key for card in nearest}
        chosen[v.id] = (nearest, [card for card in v.pool if card.key not in taken][:n_random])
        for card in chosen[v.id][0] + chosen[v.id][1]:
            card.question, card.answer = _caption(card.meta)
    return chosen


def _write_thumbs(cards: list[Card], folder: Path) -> None:
    """A JPEG thumbnail per card with an image, read from its shard by offset (a card keeps the reason otherwise)."""
    from PIL import Image, ImageOps

    by_shard: dict[str, list[Card]] = {}
    written: list[str] = []
    for card in cards:
        if card.image is not None:
            by_shard.setdefault(card.image[0], []).append(card)
    for shard, group in by_shard.items():
        with open(shard, "rb") as f:
            for card in sorted(group, key=lambda c: c.image[1]):
                f.seek(card.image[1])
                data = f.read(card.image[2])
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced scale
                        im = ImageOps.exif_transpose(im)
                        card.small = max(im.size) < 64
                        if im.mode in ("RGBA", "LA", "P"):
                            im = im.convert("RGBA")
                            bg = Image.new("RGB", im.size, "white")
                            bg.paste(im, mask=im.getchannel("A"))
                            im = bg
                        im = im.convert("RGB")
                        im.thumbnail((THUMB, THUMB))
                        name = f"{len(written):05d}.jpg"  # not the key: a foreign shard's key may be any string
                        im.save(folder / name, quality=85)
                        written.append(name)
                        card.thumb = f"thumbs/{name}"
                except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes; show it on the card
                    card.error = f"image does not decode ({type(e).__name__})"


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings: silhouettes and the projection
# ---------------------------------------------------------------------------------------------------------------------


def _embedding_sample(out, manifest, embeddings, train_ids, train_clusters, sample, seed):
    """(x (n, d), clusters (n,), note): a seeded sample of the train embeddings, or (None, None, why not)."""
    cluster_of = dict(zip(train_ids, train_clusters.tolist()))
    if embeddings is not None:
        ids, x_all = embeddings
        source = "the embeddings of this run"
    else:
        loaded = load_cached_embeddings(out, manifest)
        if isinstance(loaded, str):
            return None, None, loaded
        ids, x_all = loaded
        source = "the embedding cache (OUT/.cache)"
    rows = [i for i, rid in enumerate(ids) if rid in cluster_of]
    found = {ids[i] for i in rows}
    if len(found) < len(cluster_of):
        return None, None, f"{len(cluster_of) - len(found)} train records of the shards have no embedding in {source}"
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
    x = _take(x_all, rows)  # (n, d)
    labels = np.asarray([cluster_of[ids[i]] for i in rows.tolist()], dtype=np.int64)  # (n,)
    centroids = _centroids(out, manifest)
    if centroids is not None and len(x) and centroids.shape[1] == x.shape[1]:
        d2 = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)  # (n, k)
        agree = float((d2.argmin(1) == labels).mean())
        if agree < 0.99:  # a cache from another run of the same ids
            return None, None, f"{source} does not match these clusters ({agree:.0%} nearest-centroid agreement)"
    note = f"from {source}" + (f", on a seeded sample of {len(rows):,} train records" if len(rows) < len(found) else "")
    return x, labels, note


def load_cached_embeddings(out: Path, manifest: dict):
    """(ids, [(n, d) memmap per part]) from OUT/.cache (one cache, or torchrun's per-rank parts), or why not."""
    cache = out / ".cache"
    parts = sorted(cache.glob("part-*")) or [cache]
    ids, arrays = [], []
    for part in parts:
        try:
            meta = json.loads((part / "meta.json").read_text())
            done = int(json.loads((part / "progress.json").read_text()).get("done", -1))
            part_ids = json.loads((part / "ids.json").read_text())
            emb = np.load(part / "embeddings.npy", mmap_mode="r")  # (n, d)
        except (OSError, ValueError, TypeError, AttributeError):
            return "the embeddings are not on disk (no complete OUT/.cache)"
        name = (manifest.get("embedder") or {}).get("name")
        if name and meta.get("embedder") not in (None, name):
            return f"the embedding cache holds {meta.get('embedder')} embeddings, the manifest {name}"
        if done != len(part_ids) or emb.shape[0] != len(part_ids):
            return f"the embedding cache in {part} is incomplete"
        ids += part_ids
        arrays.append(emb)
    return ids, arrays


def _take(x, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of an array, or of the concatenation of a list of arrays without building it."""
    if not isinstance(x, list):
        return np.asarray(x[rows], dtype=np.float32)
    bounds = np.cumsum([0] + [len(a) for a in x])
    pieces = []
    for a, lo, hi in zip(x, bounds[:-1], bounds[1:]):
        mine = rows[(rows >= lo) & (rows < hi)] - lo
        pieces.append(np.asarray(a[mine], dtype=np.float32))
    return np.concatenate(pieces)


def _centroids(out: Path, manifest: dict) -> np.ndarray | None:
    name = manifest.get("centroids")
    try:
        return np.load(out / name).astype(np.float32) if name else None  # (k, d)
    except (OSError, ValueError):
        return None


def cluster_silhouettes(x: np.ndarray, labels: np.ndarray, k: int) -> list[tuple[float | None, int]]:
    """Per cluster: (mean silhouette of its rows in x (n, d), rows); None where undefined (fewer than 2 clusters)."""
    import sklearn
    from sklearn.metrics import silhouette_samples

    present = np.unique(labels)
    if len(present) < 2 or len(present) > len(x) - 1:
        return [(None, int((labels == c).sum())) for c in range(k)]
    with sklearn.config_context(working_memory=64):  # MiB per block of distances (default 1 GiB: 10k rows at once)
        s = silhouette_samples(x, labels)  # (n,)
    return [(float(s[labels == c].mean()) if (labels == c).any() else None, int((labels == c).sum())) for c in range(k)]


def _plots(folder: Path, out: Path, manifest: dict, x, labels, views, note: str) -> list[tuple[str, str]]:
    """sweep.png and projection.png in the gallery folder; returns [(file, caption)]."""
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

    centroids = _centroids(out, manifest)
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
        sizes = np.array([v.n for v in views] + [0] * (len(xy) - len(views)))[: len(xy)]
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


def render(manifest, views, cards, figures, note, problems, have_embeddings) -> str:
    """The whole page as one HTML string; every value from the data goes through html.escape."""
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


def _labels(entry: dict, n: int) -> str:
    tops = entry.get("top_labels") or []
    if not tops:
        return '<span class="empty">no labels</span>'
    return "".join(f'<span class="chip">{_e(name)}<b>{_e(cnt)}</b></span>' for name, cnt in tops[:n])


def _card(c: Card) -> str:
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
