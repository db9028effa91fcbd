"""Regroup options: one typed dataclass; defaults ← YAML (`--config`) ← command-line flags.

Every field below is also a YAML key and a `--flag` (underscores become dashes on the command line).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from rbvl.regroup.errors import RegroupError


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class RegroupOptions:
    input: list[str] = field(default_factory=list)
    """Train inputs: LLaVA JSON, WebDataset shards (.tar) or text-only JSONL/Parquet."""
    out: str | None = None
    """Output folder for shards, manifest.json, rejects.jsonl, summary.md."""
    eval: list[str] = field(default_factory=list)
    """Eval inputs, assigned to the nearest train centroid (never used to fit)."""
    image_root: str | None = None
    """Folder that relative image paths in LLaVA JSON are resolved against."""
    format: str | None = None
    """Input format (default: detected from the file names)."""
    preset: str | None = None
    """Reader preset for text-only corpora (e.g. the S1 traces)."""
    text_fields: list[str] | None = None
    """Record fields whose text is embedded (default: the reader's)."""
    label_field: str | None = None
    """Field holding the source's own domain label."""
    with_trajectory: bool = False
    """s1 preset: embed the question together with its thinking trajectory."""
    embedder: str = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    """open_clip:MODEL[/PRETRAINED], hf:MODEL_ID_OR_PATH or sentence-transformers:MODEL_ID_OR_PATH."""
    combine: str = "mean"
    """How open_clip image and text vectors combine: mean | concat | image | text."""
    k: str = "4,8,16,32"
    """Number of clusters, or a comma-separated sweep chosen by silhouette."""
    seed: int = 0
    """Seed for k-means, silhouette sampling and random-init models."""
    num_workers: int = field(default_factory=_default_workers)
    """DataLoader workers that read, decode and preprocess."""
    batch_size: int = 64
    """Records per encode call."""
    chunk_size: int = 4096
    """Records between flushes of the embedding cache (the resume granularity)."""
    resume: bool = True
    """Continue an interrupted embedding when OUT/.cache matches the same inputs and embedder."""
    overwrite: bool = False
    """Replace an OUT that already holds a manifest."""
    maxcount: int = 10_000
    """Samples per shard."""
    minibatch_above: int = 50_000
    """Use MiniBatchKMeans above this many train records."""
    silhouette_sample: int = 10_000
    """Sample the silhouette to this many rows above it."""
    device: str = "cpu"
    """Torch device for the embedder."""
    plots: bool = True
    """Write PNG plots beside summary.md."""
    gallery: bool = True
    """Write gallery/index.html: thumbnails and captions per cluster, to judge the clusters by eye."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        for name in ("input", "eval"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if isinstance(self.text_fields, str):
            self.text_fields = [s for s in self.text_fields.split(",") if s]
        if isinstance(self.k, int | list):
            self.k = ",".join(str(v) for v in (self.k if isinstance(self.k, list) else [self.k]))
        for name in ("batch_size", "chunk_size", "maxcount"):
            if int(getattr(self, name)) < 1:
                raise RegroupError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise RegroupError(f"num_workers must be >= 0, got {self.num_workers}")

    def validate(self) -> None:
        """The checks that need the whole picture (called before any work)."""
        if not self.input:
            raise RegroupError("no input: give --input PATH (or `input:` in --config)")
        if not self.out:
            raise RegroupError("no output folder: give --out DIR (or `out:` in --config)")
        for p in [*self.input, *self.eval]:
            if not Path(p).exists():
                raise RegroupError(f"input not found: {p}")


FIELD_NAMES = [f.name for f in fields(RegroupOptions)]


def load_options(config: str | None = None, overrides: dict | None = None) -> RegroupOptions:
    """Defaults ← YAML file ← overrides (the flags given on the command line)."""
    import yaml

    values: dict = {}
    if config:
        try:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
        except OSError as e:
            raise RegroupError(f"cannot read config {config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise RegroupError(f"config {config} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise RegroupError(f"config {config} must be a mapping of option: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in FIELD_NAMES:
                close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise RegroupError(f"unknown key '{key}' in {config}{hint}")
            values[name] = value
    values.update(overrides or {})
    try:
        return RegroupOptions(**values)
    except TypeError as e:
        raise RegroupError(f"bad option: {e}") from None
