"""Output: per-cluster WebDataset shards, rejects.jsonl, centroids.npy and manifest.json (written last, atomically).

Layout and fields follow docs/formats.md:

    OUT/train/cluster_003/shard-000000.tar   <key>.png|.jpg|.webp (rbvl/images.py contract) + <key>.json
    OUT/eval/cluster_003/shard-000000.tar    eval records, assigned to the nearest train centroid
    OUT/centroids.npy  OUT/rejects.jsonl  OUT/manifest.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rbvl import images
from rbvl.records import sanitize_key

MANIFEST = "manifest.json"
FORMAT = "rbvl-regroup/1"


def cluster_name(c: int) -> str:
    return f"cluster_{c:03d}"


class _SplitWriter:
    """One lazily opened `webdataset.ShardWriter` per cluster of one split; counts samples per shard."""

    def __init__(self, out: Path, split: str, maxcount: int):
        self.out, self.split, self.maxcount = out, split, maxcount
        self.writers: dict[int, object] = {}
        self.shard_sizes: dict[int, dict[str, int]] = {}
        self.notes: list[dict] = []  # images changed to fit the shard contract (rbvl/images.py)

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
        w.write(sample)
        rel = Path(w.fname).relative_to(self.out).as_posix()
        sizes = self.shard_sizes[cluster]
        sizes[rel] = sizes.get(rel, 0) + 1

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def shards(self, cluster: int) -> tuple[list[str], list[int]]:
        sizes = self.shard_sizes.get(cluster, {})
        names = sorted(sizes)
        return names, [sizes[n] for n in names]


def write_shards(
    out: Path,
    split: str,
    records: list,
    clusters: np.ndarray,
    distances: np.ndarray,
    maxcount: int,
    progress: bool = True,
) -> tuple[_SplitWriter, list]:
    """Write `records` (each with its cluster and distance) into OUT/split/cluster_XXX/ shards.

    Returns the writer (for shard lists and sizes) and rejects for records whose image vanished since embedding.
    """
    from tqdm.auto import tqdm

    from rbvl.records import Reject

    writer = _SplitWriter(out, split, maxcount)
    late_rejects = []
    try:
        for rec, c, dist in tqdm(
            zip(records, clusters.tolist(), distances.tolist()),
            total=len(records),
            desc=f"write {split}",
            unit="rec",
            disable=not progress,
        ):
            sample = {"__key__": sanitize_key(rec.id)}
            try:
                loaded = rec.load_image()
            except OSError as e:
                late_rejects.append(Reject(rec.id, _source(rec, split), "missing_image", str(e)))
                continue
            note = None
            if loaded is not None:
                try:
                    img = images.for_shard(*loaded)  # PNG/JPEG/WebP, 8-bit, one frame: what the stream reads
                except images.ImageRejected as e:
                    late_rejects.append(Reject(rec.id, _source(rec, split), "unreadable_image", str(e)))
                    continue
                sample[img.ext] = img.data
                note = img.note
                if note:
                    writer.notes.append({"split": split, "id": rec.id, "note": note})
            sample["json"] = {
                "id": rec.id,
                "conversation": rec.conversation,
                "label": rec.label,
                "cluster": int(c),
                "distance": round(float(dist), 6),
                "text": rec.text,
                **({"image_note": note} if note else {}),
            }
            writer.write(int(c), sample)
    finally:
        writer.close()
    return writer, late_rejects


def _source(rec, split: str) -> str:
    meta = getattr(rec, "meta", None) or {}
    return str(meta.get("source") or getattr(rec, "source", None) or split)


def write_rejects(out: Path, rejects: dict[str, list]) -> None:
    """rejects.jsonl: one line per rejected record, with its split."""
    with (out / "rejects.jsonl").open("w") as f:
        for split, items in rejects.items():
            for r in items:
                f.write(json.dumps({"split": split, **r.to_json()}, ensure_ascii=False) + "\n")


def write_manifest(out: Path, manifest: dict) -> Path:
    """manifest.json via a temp file and os.replace, so its presence means everything else is complete."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def save_centroids(out: Path, centroids: np.ndarray) -> str:
    np.save(out / "centroids.npy", centroids.astype(np.float32))  # (k, d)
    return "centroids.npy"
