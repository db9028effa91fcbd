"""The cluster gallery: OUT/gallery/index.html, a static page to judge a regrouping by eye.

    rbvl gallery shards/                       # (re)build it for an existing regroup output
    from rbvl.regroup.gallery import write_gallery
    write_gallery("shards/")                   # the same from Python; regroup calls it at its end

Per cluster: its size and eval share, top original labels, mean silhouette, and cards for the records nearest the
centroid and for a seeded random sample (image thumbnails with captions; text-only records as text cards); above them
the k sweep and a 2-D PCA projection of the embeddings coloured by cluster. No server, no network, no JavaScript:
the CSS is inline and the thumbnails are JPEG files in gallery/thumbs/, referenced by relative paths. This module
reads and chooses; `gallery_page` draws the plots and writes the HTML.

Embeddings come from regroup when it calls this, else from its embedding cache (OUT/.cache) when that is still on
disk and matches the shards. Without them the page still shows everything the shards hold (each sample's stored
distance to its centroid picks the nearest ones), says that the silhouette is not available, and projects the
centroids instead of the records.

Cost: each train shard is read once, tar headers and JSON members only (the reader seeks past the image bytes); then
only the chosen images (at most n_nearest + n_random per cluster) are read back and thumbnailed.
"""

from __future__ import annotations

import heapq
import io
import json
import random
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rbvl import manifest as manifest_file
from rbvl.regroup.errors import RegroupError
from rbvl.regroup.gallery_page import draw_plots, render
from rbvl.regroup.report import read_rejects
from rbvl.regroup.tar_index import iter_shard
from rbvl.runtime import fsfault

THUMB = 192  # px, the longest side of a thumbnail file


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
    tmp = out / "gallery.tmp"
    try:
        with fsfault.writing(tmp):  # a write that fails without naming its file names the folder being written
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "thumbs").mkdir(parents=True)
            _build(out, tmp, manifest, embeddings, n_nearest, n_random, sample, plots)
        final = out / "gallery"
        _swap_in(tmp, final)
    finally:  # a full disk or a read-only folder: no gallery.tmp is left, the previous gallery stays
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` with the finished `tmp` by renames; if the second rename fails the previous one comes back."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    with fsfault.writing(final):
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            if old.exists():
                old.rename(final)
            raise
    shutil.rmtree(old, ignore_errors=True)


def _build(out: Path, tmp: Path, manifest: dict, embeddings, n_nearest: int, n_random: int, sample: int, plots: bool):
    """Write the page, its thumbnails and plots into `tmp`."""
    k = max((int(e.get("id", i)) for i, e in enumerate(manifest["clusters"])), default=-1) + 1
    seed = int(manifest.get("seed", 0))
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
    sizes = [v.n for v in views]
    figures = draw_plots(tmp, manifest, x, labels, sizes, _centroids(out, manifest), note) if plots else []
    for line in problems[:5]:
        print(f"rbvl gallery: warning: {line}", file=sys.stderr)
    if len(problems) > 5:
        print(f"rbvl gallery: warning: ... and {len(problems) - 5} more (listed on the page)", file=sys.stderr)
    rejected = read_rejects(out / "rejects.jsonl")
    page = render(manifest, views, cards, figures, note, problems, x is not None, rejected)
    (tmp / "index.html").write_text(page, encoding="utf-8")


def after_regroup(out: Path, manifest: dict, ids: list[str], x: np.ndarray, enabled: bool, plots: bool) -> None:
    """Regroup's last step: write the gallery (or remove a stale one); a failure is a warning, never a lost run."""
    if not enabled:
        shutil.rmtree(Path(out) / "gallery", ignore_errors=True)
        return
    t0 = time.perf_counter()
    try:
        page = write_gallery(out, manifest, (ids, x), plots=plots)
    except Exception as e:  # noqa: BLE001 - the shards and manifest are already complete; say what failed
        why = fsfault.describe(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        print(f"rbvl-regroup: warning: gallery not written ({why}); "
              f"rebuild it with `rbvl gallery {out}`", file=sys.stderr)  # fmt: skip
        return
    print(f"  gallery: {page} ({time.perf_counter() - t0:.1f}s)")


def read_manifest(out: Path) -> dict:
    if not (Path(out) / manifest_file.FILENAME).is_file():
        raise RegroupError(f"no manifest.json in {out} (is it a finished rbvl-regroup output?)")
    try:
        return manifest_file.read(Path(out) / manifest_file.FILENAME)
    except manifest_file.ManifestError as e:
        raise RegroupError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------------
# Reading the shards once
# ---------------------------------------------------------------------------------------------------------------------


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
                    if fsfault.is_fault(e):  # a full disk is not a bad image
                        raise
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
