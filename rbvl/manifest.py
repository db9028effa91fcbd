"""manifest.json: the contract between Regroup and Balance, with its one writer and its one reader.

    from rbvl import manifest
    path = manifest.write(out, manifest.build(clusters, eval_distribution=q, k=len(clusters), seed=0))
    m = manifest.read(path)            # a dict; refuses a file of another format with one line

Regroup, the original-label manifests of `rbvl experiment`, the synthetic shard sets and the benchmarks all write
through `build` + `write`; training, eval, the gallery and the CLI all read through `read`. The fields are in
docs/formats.md. The file is written last and atomically, so its presence means the shards it lists are complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILENAME = "manifest.json"
FORMAT = "rbvl-regroup/1"  # bump the number when a reader of the old layout would misread the new one


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or of another format (one line, naming the file)."""


def domain_entry(
    index: int,
    name: str,
    train_shards: list[str],
    train_sizes: list[int],
    eval_shards: list[str] = (),
    eval_sizes: list[int] = (),
    **extra,
) -> dict:
    """One domain (cluster) of the manifest: its shards (relative to the manifest's folder) and their sizes."""
    return {
        "id": index,
        "name": name,
        "train_shards": list(train_shards),
        "n_train": int(sum(train_sizes)),
        "eval_shards": list(eval_shards),
        "n_eval": int(sum(eval_sizes)),
        "shard_sizes": [int(x) for x in train_sizes],
        "eval_shard_sizes": [int(x) for x in eval_sizes],
        **extra,
    }


def build(clusters: list[dict], *, eval_distribution: list[float] | None = None, **fields) -> dict:
    """A manifest dict: format, tool version, `k`, the domains, q (the eval set's share of each domain), `fields`."""
    from rbvl import __version__

    return {
        "format": FORMAT,
        "tool_version": __version__,
        "k": len(clusters),
        **fields,
        "clusters": clusters,
        "eval_distribution": list(eval_distribution or []),
    }


def write(out: str | Path, manifest: dict) -> Path:
    """OUT/manifest.json via a temp file and os.replace, so its presence means everything else is complete."""
    out = Path(out)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"refusing to write a manifest of format {manifest.get('format')!r}: build() makes {FORMAT}")
    tmp = out / (FILENAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / FILENAME)
    return out / FILENAME


def read(path: str | Path) -> dict:
    """The manifest at `path` (the file, or the folder holding it), checked for format and shape.

    Raises:
        ManifestError: missing file, bad JSON, no `clusters` list, or a format other than this rbvl reads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (run rbvl-regroup first; the manifest is written last)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not a regroup manifest (cannot be read as JSON: {e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("clusters"), list):
        raise ManifestError(f"{path}: not a regroup manifest (no 'clusters' list)")
    found = manifest.get("format")
    if found != FORMAT:
        raise ManifestError(
            f"{path}: manifest format {found!r}, this rbvl reads {FORMAT!r} (regroup the data again with this version)"
        )
    return manifest
