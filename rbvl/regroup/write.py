"""Output: per-cluster WebDataset shards, rejects.jsonl, centroids.npy and manifest.json (written last, atomically).

Layout and fields follow docs/formats.md:

    OUT/train/cluster_003/shard-000000.tar   <key>.png|.jpg|.webp (rbvl/records/images.py contract) + <key>.json,
                                             in a seeded random order; a multi-image sample holds <key>.0.png,
                                             <key>.1.jpg ... and lists them in its JSON's `images`
    OUT/eval/cluster_003/shard-000000.tar    eval records, assigned to the nearest train centroid
    OUT/centroids.npy  OUT/rejects.jsonl  OUT/manifest.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rbvl import manifest
from rbvl.records import Rejects, images, sanitize_key
from rbvl.runtime import fsfault

SPLIT_CODES = {"train": 0, "eval": 1}  # seeds the write order of each split


def cluster_name(c: int) -> str:
    return f"cluster_{c:03d}"


def cluster_entry(c: int, name: str, train: _SplitWriter, eval_: _SplitWriter, **extra) -> dict:
    """One domain of the manifest (docs/formats.md): its shards and sizes in both splits, plus `extra` fields."""
    return manifest.domain_entry(c, name, *train.shards(c), *eval_.shards(c), **extra)


class _SplitWriter:
    """One lazily opened `webdataset.ShardWriter` per cluster of one split; counts samples per shard."""

    def __init__(self, out: Path, split: str, maxcount: int):
        self.out, self.split, self.maxcount = out, split, maxcount
        self.writers: dict[int, object] = {}
        self.shard_sizes: dict[int, dict[str, int]] = {}
        self._names: dict[str, str] = {}  # shard file → its path relative to OUT
        self.notes: list[dict] = []  # images changed to fit the shard contract (rbvl/records/images.py)
        self.ids: list[str | None] = []  # record id per input row (the gallery matches embeddings rows to samples)
        self.max_images = 0  # the most images one written sample holds (training refuses families that take one)

    def write(self, cluster: int, sample: dict) -> None:
        import webdataset as wds

        if cluster not in self.writers:
            folder = self.out / self.split / cluster_name(cluster)
            folder.mkdir(parents=True, exist_ok=True)
            # mtime=0: the same inputs give byte-identical tars
            self.writers[cluster] = wds.ShardWriter(
                str(folder / "shard-%06d.tar"), maxcount=self.maxcount, maxsize=float("inf"), verbose=0, mtime=0.0
            )
            self.shard_sizes[cluster] = {}
        w = self.writers[cluster]
        with fsfault.writing(w.fname):
            w.write(sample)
        rel = self._names.get(w.fname) or self._names.setdefault(
            w.fname, Path(w.fname).relative_to(self.out).as_posix()
        )
        sizes = self.shard_sizes[cluster]
        sizes[rel] = sizes.get(rel, 0) + 1

    def close(self, failed: bool = False) -> None:
        """Close every shard; after a failure (`failed`), errors while closing are dropped: the first one stands."""
        for w in self.writers.values():
            try:
                with fsfault.writing(w.fname):
                    w.close()
            except OSError:
                if not failed:
                    raise

    def shards(self, cluster: int) -> tuple[list[str], list[int]]:
        sizes = self.shard_sizes.get(cluster, {})
        names = sorted(sizes)
        return names, [sizes[n] for n in names]


def write_shards(
    out: Path,
    split: str,
    records,
    clusters: np.ndarray,
    distances: np.ndarray,
    maxcount: int,
    seed: int,
    rejects: Rejects,
    progress: bool = True,
) -> _SplitWriter:
    """Write `records` (each with its cluster and distance) into OUT/split/cluster_XXX/ shards, in a seeded random
    order, so each cluster's shards hold its records shuffled and any window of the stream is a uniform sample.

    `records` is anything indexable (a list, `RecordSpool.rows`); a record whose image vanished since embedding goes
    to `rejects` (missing_image), and so does one whose image `images.for_shard` refuses (unreadable_image,
    image_aspect); an image it changes gets an `image_note` in its JSON and a line in `writer.notes`. Returns the writer (shard lists,
    per-shard sample counts, image notes, `ids`: the record id of each row of `records`).
    """
    from tqdm.auto import tqdm

    order = np.random.default_rng([seed, SPLIT_CODES[split]]).permutation(len(records))
    writer = _SplitWriter(out, split, maxcount)
    writer.ids = [None] * len(records)
    try:
        for i in tqdm(order.tolist(), desc=f"write {split}", unit="rec", disable=not progress):
            rec, c, dist = records[i], int(clusters[i]), float(distances[i])
            writer.ids[i] = rec.id
            sample = {"__key__": sanitize_key(rec.id)}
            try:
                loaded = rec.load_images()
            except OSError as e:
                rejects.add(split, rec, "missing_image", str(e))
                continue
            try:
                shard_images = [images.for_shard(*one) for one in loaded]  # PNG/JPEG/WebP, 8-bit, one frame
            except images.ImageRejected as e:
                rejects.add(split, rec, e.reason, str(e))
                continue
            names = image_members(shard_images)
            writer.max_images = max(writer.max_images, len(names))
            for name, img in zip(names, shard_images):
                sample[name] = img.data
            notes = [f"image {k}: {img.note}" if len(names) > 1 else img.note for k, img in enumerate(shard_images)]
            note = "; ".join(n for n in notes if n and not n.endswith(": None")) or None
            if note:
                writer.notes.append({"split": split, "id": rec.id, "note": note})
            sample["json"] = {
                "id": rec.id,
                "conversation": rec.conversation,
                "label": rec.label,
                "cluster": c,
                "distance": round(dist, 6),
                "text": rec.text,
                **({"images": names} if len(names) > 1 else {}),
                **({"image_note": note} if note else {}),
            }
            writer.write(c, sample)
    except BaseException:
        writer.close(failed=True)
        raise
    writer.close()
    return writer


def image_members(shard_images: list) -> list[str]:
    """The tar member extensions of a sample's images: `png` for one image (as always), `0.png`, `1.jpg`, ... for a
    multi-image sample, in placeholder order (the sample's JSON lists them as `images`)."""
    if len(shard_images) == 1:
        return [shard_images[0].ext]
    return [f"{k}.{img.ext}" for k, img in enumerate(shard_images)]


def save_centroids(out: Path, centroids: np.ndarray) -> str:
    np.save(out / "centroids.npy", centroids.astype(np.float32))  # (k, d)
    return "centroids.npy"
