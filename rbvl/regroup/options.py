"""Regroup options: one typed dataclass, checked by the field engine the training config uses (`rbvl.config.engine`).

Defaults ← YAML (`--config`) ← `key=value` ← `--flags`. Every field below is a YAML key, a `key=value` override
and a `--flag` (underscores become dashes); `rbvl-regroup --help` is generated from the fields and their docstrings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rbvl.config.engine import Checked, ConfigError, from_dict, option, parse_override, read_yaml, set_dotted
from rbvl.records.tables import is_dataset_name
from rbvl.regroup.errors import RegroupError


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _k_spec(value: str) -> str | None:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", value) or any(int(k) < 1 for k in value.split(",")):
        return "expected a positive int or a comma-separated list of them (4,8,16)"
    return None


def _embedder(value: str) -> str | None:
    return None if ":" in value else "expected open_clip:MODEL[/PRETRAINED], hf:MODEL or sentence-transformers:MODEL"


@dataclass
class RegroupOptions(Checked):
    KEY: ClassVar[str] = ""

    input: list[str] = option(factory=list)
    """Train inputs (files, folders or globs): JSON / JSONL, Parquet, Arrow, a `datasets` save_to_disk folder,
    WebDataset shards (.tar), or a dataset name `org/name[:split]` in the local Hugging Face cache; rows hold LLaVA /
    ShareGPT conversations, chat `messages` with an `images` column, or prompt/response pairs (docs/formats.md)."""
    out: str | None = None
    """Output folder for shards, manifest.json, rejects.jsonl, summary.md (new, empty, or a previous regroup output)."""
    eval: list[str] = option(factory=list)
    """Eval inputs, assigned to the nearest train centroid (never used to fit)."""
    image_root: str | None = None
    """Folder that relative image paths are resolved against (default: the input file's folder)."""
    allow_outside_root: bool = False
    """Accept image paths that resolve outside the image root (`..`, absolute paths, symlinks pointing out); by
    default such a record is rejected as `image_outside_root`, so a dataset file cannot pull in other files."""
    format: str | None = option(None, choices=(None, "llava", "webdataset", "jsonl", "parquet", "arrow"))
    """Input container (default: detected from the file names, and said in one line per input)."""
    conversation_field: str | None = None
    """Column of chat turns (default: the first of conversations, conversation, messages)."""
    image_field: str | None = None
    """Column of images: paths, lists of paths or Hugging Face `Image` values (default: images, then image)."""
    id_field: str | None = None
    """Column of record ids (default: id; a row without one is named FILESTEM-ROW)."""
    prompt_field: str | None = None
    """Text-only rows: the prompt column (default: the first of prompt, question, instruction, query, input)."""
    response_field: str | None = None
    """Text-only rows: the response column (default: the first of response, answer, output, completion, solution)."""
    preset: str | None = option(None, choices=(None, "llava", "s1", "text"))
    """Reader preset for text-only corpora (e.g. `s1` for the S1 traces)."""
    text_fields: list[str] | None = None
    """Record fields whose text is embedded (default: the reader's); comma-separated or several values."""
    label_field: str | None = None
    """Field holding the source's own domain label."""
    with_trajectory: bool = False
    """s1 preset: embed the question together with its thinking trajectory."""
    embedder: str = option("open_clip:ViT-B-32/laion2b_s34b_b79k", check=_embedder, allowed="KIND:MODEL")
    """open_clip:MODEL[/PRETRAINED], hf:MODEL_ID_OR_PATH or sentence-transformers:MODEL_ID_OR_PATH."""
    combine: str = option("mean", choices=("mean", "concat", "image", "text"))
    """How open_clip image and text vectors combine: mean | concat | image | text."""
    k: str = option("4,8,16,32", check=_k_spec, allowed="an int or a comma-separated list (4,8,16)")
    """Number of clusters, or a comma-separated sweep chosen by silhouette."""
    seed: int = option(0, ge=0)
    """Seed for k-means, silhouette sampling and random-init models."""
    num_workers: int = option(factory=_default_workers, ge=0)
    """DataLoader workers that read, decode and preprocess (default min(4, CPUs))."""
    batch_size: int = option(64, ge=1)
    """Records per encode call."""
    chunk_size: int = option(4096, ge=1)
    """Records between flushes of the embedding cache (the resume granularity)."""
    resume: bool = True
    """Continue an interrupted embedding when OUT/.cache matches the same inputs and embedder."""
    overwrite: bool = False
    """Replace a previous regroup output in OUT (recognised by its manifest.json; nothing else is ever deleted)."""
    maxcount: int = option(10_000, ge=1)
    """Samples per shard."""
    minibatch_above: int = option(50_000, ge=1)
    """Use MiniBatchKMeans above this many train records."""
    silhouette_sample: int = option(10_000, ge=2)
    """Sample the silhouette to this many rows above it."""
    device: str = option("cpu", check=lambda v: None if v.strip() else "expected a torch device", allowed="a device")
    """Torch device for the embedder."""
    plots: bool = True
    """Write PNG plots beside summary.md."""
    gallery: bool = True
    """Write gallery/index.html: thumbnails and captions per cluster, to judge the clusters by eye."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        # Shorthands a YAML file or a flag may use: one path for a list, `k: 8` or `k: [4, 8]`, `a,b` fields.
        for name in ("input", "eval"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.text_fields, str):
            self.text_fields = [self.text_fields]
        if isinstance(self.text_fields, list):
            self.text_fields = [s.strip() for t in self.text_fields for s in str(t).split(",") if s.strip()]
        if isinstance(self.k, (int, list, tuple)) and not isinstance(self.k, bool):
            self.k = ",".join(str(v) for v in (self.k if isinstance(self.k, (list, tuple)) else [self.k]))
        super().__post_init__()

    def validate(self) -> None:
        """The checks that need the whole picture (called before any work)."""
        if not self.input:
            raise RegroupError("no input: give --input PATH (or `input:` in --config)")
        if not self.out:
            raise RegroupError("no output folder: give --out DIR (or `out:` in --config)")
        for p in [*self.input, *self.eval]:
            if not Path(p).exists() and not any(c in p for c in "*?[{") and not is_dataset_name(p):
                raise RegroupError(f"input not found: {p}")
        if self.image_root and not Path(self.image_root).is_dir():
            raise RegroupError(f"--image-root {self.image_root}: no such folder")


def load_options(
    config: str | None = None, overrides: dict | None = None, items: list[str] | None = None
) -> RegroupOptions:
    """Defaults ← YAML file `config` ← `key=value` `items` ← `overrides` (the flags given on the command line).

    Raises:
        RegroupError: an unreadable config, an unknown key or a value out of range (one line naming the key).
    """
    try:
        tree = {str(k).replace("-", "_"): v for k, v in read_yaml(config, "config").items()} if config else {}
        for item in items or []:
            key, value = parse_override(item)
            set_dotted(tree, key.replace("-", "_"), value)
        tree.update(overrides or {})
        return from_dict(RegroupOptions, tree)
    except ConfigError as e:
        where = f" in {config}" if config and "unknown key" in str(e) else ""
        raise RegroupError(f"{e}{where}") from None
