"""Embedders: turn records into L2-normalised vectors, with decoding in DataLoader workers and a resumable cache.

Embedder names are a contract (they go into the manifest):

    open_clip:MODEL[/PRETRAINED_TAG_OR_CHECKPOINT]   image + text (`open_clip:rbvl-tiny` is the offline tiny config)
    hf:MODEL_ID_OR_PATH                              text only: transformers.AutoModel, mean-pooled over the mask
    sentence-transformers:MODEL_ID_OR_PATH           text only: the model's own pooling, normalised

How image and text combine (`combine`) for open_clip: `mean` (default) is the renormalised mean of the two
normalised vectors; `concat` is [img, txt] / √2; `image` / `text` use one side. A record without an image uses its
text side alone: for `mean` and `image` that is the text vector; for `concat` it is [0, txt] (zeros in the image
half, so text-only records do not pretend to have image content). A multi-image record's image vector is the
renormalised mean of its images' normalised vectors (each image counts equally, whatever its size), then combined
with the text as for one image: the record lands near what its images have in common.

`embed_records` runs the model over a `torch.utils.data.DataLoader` whose workers read, decode and preprocess
(so the model never waits on decoding); images that do not decode come back as rejects. Rows go into a
memory-mapped `.npy` under `OUT/.cache/` with a progress marker flushed every chunk, so an interrupted run continues
where it stopped.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rbvl.records import images
from rbvl.regroup.errors import RegroupError

PREFIXES = ("open_clip", "hf", "sentence-transformers")
COMBINES = ("mean", "concat", "image", "text")
TINY = "rbvl-tiny"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


# ---------------------------------------------------------------- embedders


@dataclass
class Embedder:
    """A model plus the per-sample work its DataLoader workers do.

    `prepare` and `collate` run in workers; `encode` runs in the main process on a collated batch.
    """

    name: str
    kind: str  # "open_clip" | "hf" | "sentence-transformers"
    dim: int
    combine: str
    uses_images: bool
    model: Any
    preprocess_desc: str
    image_transform: Any = None  # open_clip: PIL image -> (3, H, W) tensor
    tokenizer: Any = None
    image_size: int | None = None
    extra: dict = field(default_factory=dict)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "combine": self.combine, "dim": self.dim, "preprocess": self.preprocess_desc}

    # ---- in the workers

    def collate(self, items: list[dict]) -> dict:
        """Batch what `_EmbedDataset.__getitem__` returned: indices, every image tensor of the batch (a record's
        images one after another) with each record's image count, tokens."""
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)  # (B,)
        errors = [(it["index"], it["error"]) for it in items if it["error"]]
        ok = torch.tensor([not it["error"] for it in items])  # (B,)
        n_images = torch.tensor([it["n_images"] for it in items], dtype=torch.long)  # (B,)
        has_image = n_images > 0  # (B,)
        images = [it["image"] for it in items if it["image"] is not None]
        batch = {"index": index, "ok": ok, "has_image": has_image, "n_images": n_images, "errors": errors}
        batch["images"] = torch.cat(images) if images else None  # (N_img, 3, H, W)
        texts = [it["text"] for it in items]
        if self.kind == "open_clip":
            batch["tokens"] = self.tokenizer(texts) if self.combine != "image" or not all(has_image) else None
        elif self.kind == "hf":
            batch["tokens"] = dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
        else:  # sentence-transformers: `preprocess` since 6 (its `tokenize` warns), `tokenize` before
            batch["tokens"] = (getattr(self.model, "preprocess", None) or self.model.tokenize)(texts)
        return batch

    # ---- in the main process

    @torch.inference_mode()
    def encode(self, batch: dict) -> torch.Tensor:
        """(B, dim) float32 rows, L2-normalised; rows of records that failed to decode are zeros."""
        if self.kind == "hf":
            toks = batch["tokens"]
            hidden = self.model(**toks).last_hidden_state  # (B, T, h)
            mask = toks["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (B, h)
            return F.normalize(pooled.float(), dim=-1)
        if self.kind == "sentence-transformers":
            out = self.model(batch["tokens"])["sentence_embedding"]  # (B, h)
            return F.normalize(out.float(), dim=-1)
        return self._encode_clip(batch)

    def _encode_clip(self, batch: dict) -> torch.Tensor:
        has_image = batch["has_image"]  # (B,)
        n = len(has_image)
        d = self.model_dim
        txt = torch.zeros(n, d)
        if batch["tokens"] is not None:
            txt = F.normalize(self.model.encode_text(batch["tokens"]).float(), dim=-1)  # (B, d)
        img = torch.zeros(n, d)
        if batch["images"] is not None and self.uses_images:
            per_image = F.normalize(self.model.encode_image(batch["images"]).float(), dim=-1)  # (N_img, d)
            owner = torch.arange(n).repeat_interleave(batch["n_images"])  # (N_img,) the record of each image
            img = F.normalize(img.index_add(0, owner, per_image), dim=-1)  # (B, d) mean direction; zeros stay 0
        with_img = has_image & torch.tensor(self.uses_images)
        if self.combine == "concat":
            out = torch.cat([torch.zeros(n, d), txt], dim=1)  # text-only rows: [0, txt]
            out[with_img] = torch.cat([img[with_img], txt[with_img]], dim=1) / 2**0.5
            return out
        out = txt.clone()
        if self.combine == "image":
            out[with_img] = img[with_img]
        elif self.combine == "mean":
            out[with_img] = F.normalize(img[with_img] + txt[with_img], dim=-1)
        return out

    @property
    def model_dim(self) -> int:
        return self.dim // 2 if self.combine == "concat" else self.dim


def parse_embedder_name(name: str) -> tuple[str, str, str | None]:
    """Split an embedder name into (kind, model, pretrained); a wrong name is a `RegroupError` saying what is valid."""
    kind, sep, rest = name.partition(":")
    if not sep or kind not in PREFIXES or not rest:
        close = difflib.get_close_matches(kind, PREFIXES, n=1)
        hint = f" (did you mean '{close[0]}:...'?)" if close and sep else ""
        raise RegroupError(
            f"unknown embedder '{name}'{hint}: use open_clip:MODEL[/PRETRAINED], hf:MODEL_ID_OR_PATH "
            f"or sentence-transformers:MODEL_ID_OR_PATH (offline tiny model: open_clip:{TINY})"
        )
    if kind != "open_clip":
        return kind, rest, None
    model, _, pretrained = rest.partition("/")
    if model.startswith("hf-hub"):  # open_clip:hf-hub:org/repo keeps its slash
        return kind, rest, None
    return kind, model, pretrained or None


def check_embedder_name(name: str) -> None:
    """Fail early, with a suggestion, on a malformed name or an unknown open_clip architecture."""
    kind, model_name, _ = parse_embedder_name(name)
    if kind in ("hf", "sentence-transformers") and (
        model_name.startswith(("/", "./", "../", "~")) or Path(model_name).is_dir()
    ):
        _check_model_folder(name, kind, Path(model_name).expanduser())
    if kind == "open_clip" and not model_name.startswith("hf-hub:"):
        import open_clip

        register_tiny_config()
        known = open_clip.list_models()
        if model_name not in known:
            close = difflib.get_close_matches(model_name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {TINY}, ViT-B-32"
            raise RegroupError(f"unknown open_clip model '{model_name}' in embedder '{name}'{hint}")


MODEL_FILES = {"hf": ("config.json",), "sentence-transformers": ("modules.json", "config.json")}


def _check_model_folder(name: str, kind: str, folder: Path) -> None:
    """A local hf / sentence-transformers model: a folder with the file its loader starts from, else one line naming
    what is missing and the subfolders that have it (a package's folder often keeps the model one level down)."""
    if not folder.is_dir():  # a folder, not a hub id: say so before any hub lookup
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise RegroupError(f"embedder '{name}': {folder} is {what} (a local model folder or a hub id)")
    wanted = MODEL_FILES[kind]
    if any((folder / f).is_file() for f in wanted):
        return
    inside = sorted(d.name for d in folder.iterdir() if d.is_dir() and any((d / f).is_file() for f in wanted))
    hint = f"; its subfolder {', '.join(f'{d}/' for d in inside)} has one" if inside else ""
    raise RegroupError(f"embedder '{name}': {folder} holds no {' or '.join(wanted)}, so it is not a {kind} model{hint}")


def register_tiny_config() -> None:
    """Make `rbvl-tiny` known to open_clip through its own config registry (idempotent)."""
    import open_clip

    if TINY not in open_clip.list_models():
        open_clip.add_model_config(ASSETS / f"{TINY}.json")


def load_embedder(name: str, combine: str = "mean", seed: int = 0, device: str = "cpu") -> Embedder:
    """Build the embedder that `name` names (see the module docstring); models without weights are seeded."""
    if combine not in COMBINES:
        raise RegroupError(f"unknown combine '{combine}': choose one of {', '.join(COMBINES)}")
    kind, model_name, pretrained = parse_embedder_name(name)
    torch.manual_seed(seed)
    if kind != "open_clip":
        check_embedder_name(name)  # a local folder that is not a model: one line (open_clip checks its own below)
    if kind == "open_clip":
        return _load_open_clip(name, model_name, pretrained, combine, device)
    if kind == "hf":
        from transformers import AutoModel, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_name)
            model = AutoModel.from_pretrained(model_name).eval().to(device)
        except (OSError, ValueError) as e:  # a missing file; a folder whose files do not make a model
            raise RegroupError(f"cannot load hf model '{model_name}': {str(e).splitlines()[0]}") from None
        dim = model.config.hidden_size
        return Embedder(name, kind, dim, "text", False, model, "mean-pooled last hidden state, L2", tokenizer=tok)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(model_name, device=device).eval()
    except (OSError, ValueError) as e:  # a missing file; a folder whose files do not make a model
        raise RegroupError(
            f"cannot load sentence-transformers model '{model_name}': {str(e).splitlines()[0]}"
        ) from None
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dim_of()
    return Embedder(name, kind, dim, "text", False, model, "sentence-transformers pooling, L2")


def _load_open_clip(name: str, model_name: str, pretrained: str | None, combine: str, device: str) -> Embedder:
    import open_clip

    check_embedder_name(name)
    before = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs to the root logger what it then raises, or that a tiny model
    try:  # has no pretrained weights (it has none by design)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except RuntimeError as e:
        problem = str(e).splitlines()[0]
        if problem.startswith("Failed to download weights"):  # then the hub client's paragraph: one clause is enough
            problem = problem.split(": ", 1)[0]
        hint = ""
        if pretrained and not Path(pretrained).exists():
            hint = (
                f"; open_clip fetches '{pretrained}' from the Hugging Face hub: offline, put the weights in the hub "
                f"cache (HF_HUB_CACHE) or name the file, open_clip:{model_name}/PATH/TO/WEIGHTS.bin "
                f"(open_clip:{TINY} runs the pipeline with no weights)"
            )
        raise RegroupError(f"cannot load open_clip '{name}': {problem}{hint}") from None
    finally:
        logging.disable(before)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    d = model.text_projection.shape[1] if getattr(model, "text_projection", None) is not None else None
    d = d or open_clip.get_model_config(model_name)["embed_dim"]
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    desc = f"JPEG draft decode >= {size}px, then open_clip val transform: resize {size}, center crop {size}, normalise"
    dim = 2 * d if combine == "concat" else d
    return Embedder(
        name, "open_clip", dim, combine, combine != "text", model, desc, preprocess, tokenizer, image_size=size
    )


# ---------------------------------------------------------------- the DataLoader side


class _EmbedDataset(torch.utils.data.Dataset):
    """Index i → what the embedder's workers need for record i: decoded, preprocessed image and text."""

    def __init__(self, records: list, embedder: Embedder):
        self.records = records
        self.embedder = embedder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"index": i, "image": None, "n_images": 0, "text": rec.text or "", "error": ""}
        try:
            loaded = rec.load_images()
        except Exception as e:  # noqa: BLE001 - a file that cannot be read is a reject, never a crashed loader
            item["error"] = f"cannot read image: {type(e).__name__}: {e}"[:300]
            return item
        if not loaded:
            return item
        try:
            tensors = [self._decode(data) for data, _ in loaded]  # every image decoded and checked
            item["n_images"] = len(tensors)
            if self.embedder.uses_images:
                item["image"] = torch.stack(tensors)  # (n_images, 3, H, W)
        except images.ImageRejected as e:
            item["error"] = images.tagged(e)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a crashed loader
            item["error"] = f"cannot decode the image: {type(e).__name__}: {images.short_error(e)}"
        return item

    def _decode(self, data: bytes) -> torch.Tensor | None:
        """One image's bytes → the embedder's (3, H, W) input (None when it embeds text only), or an exception."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            images.check_aspect(im.size)  # from the header: a 1 x 100000 sliver is never resized
            if self.embedder.uses_images and self.embedder.image_size:
                # JPEG: decode at the smallest DCT scale still >= the model's size (much less work)
                im.draft("RGB", (self.embedder.image_size, self.embedder.image_size))
            im.load()
            return self.embedder.image_transform(im.convert("RGB")) if self.embedder.uses_images else None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for encoding


def make_loader(records: list, embedder: Embedder, start: int, batch_size: int, num_workers: int):
    """An ordered DataLoader over records[start:], batches collated in the workers."""
    return torch.utils.data.DataLoader(
        _EmbedDataset(records, embedder),
        batch_size=batch_size,
        sampler=range(start, len(records)),
        num_workers=num_workers,
        collate_fn=embedder.collate,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


# ---------------------------------------------------------------- the resumable cache


def cache_key(records: list, embedder: Embedder, extra: str = "") -> str:
    """A hash of what decides the embeddings: embedder, combine, and each record's id, text and image identity."""
    h = hashlib.sha256(json.dumps([embedder.name, embedder.combine, embedder.dim, extra]).encode())
    for r in records:
        h.update(r.id.encode() + b"\0" + (r.text or "").encode() + b"\0")
        path = getattr(r, "image_path", None)
        if path:
            st = os.stat(path) if os.path.exists(path) else None
            h.update(f"{path}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
        elif r.image is not None:
            h.update(hashlib.sha1(r.image).digest())
        for m in r.more_images:  # a multi-image record's further images
            h.update(hashlib.sha1(m["data"]).digest() if "data" in m else m["path"].encode())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def embed_records(
    records: list,
    embedder: Embedder,
    cache_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int = 4096,
    resume: bool = True,
    key_extra: str = "",
    progress: bool = True,
) -> tuple[np.ndarray, dict[int, str], dict]:
    """Embed every record into `cache_dir/embeddings.npy`, resuming a matching interrupted run.

    Args:
        records: the records to embed (train then eval), in a fixed order.
        embedder: from `load_embedder`.
        cache_dir: where the memmap, the id index and the progress marker live.
        batch_size: rows per encode call.
        num_workers: DataLoader workers that read, decode and preprocess.
        chunk_size: rows between flushes of the memmap and the progress marker.
        resume: continue a previous run whose cache key matches; otherwise start over.
        key_extra: anything else that should invalidate the cache (e.g. the seed for random-init models).
        progress: show a tqdm bar.

    Returns:
        (embeddings, errors, stats): the (N, dim) float32 memmap; row → decode error for rows to reject;
        {"embedded": rows encoded now, "reused": rows taken from the cache}.
    """
    from tqdm.auto import tqdm

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    n = len(records)
    key = cache_key(records, embedder, key_extra)
    meta_path, prog_path, err_path = cache / "meta.json", cache / "progress.json", cache / "errors.jsonl"
    emb_path = cache / "embeddings.npy"
    start = 0
    if resume and meta_path.exists() and prog_path.exists() and emb_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and meta.get("n") == n and meta.get("dim") == embedder.dim:
            start = int(json.loads(prog_path.read_text()).get("done", 0))
    errors: dict[int, str] = {}
    if start > 0:
        emb = np.lib.format.open_memmap(emb_path, mode="r+")  # (N, dim)
        if err_path.exists():
            for line in err_path.read_text().splitlines():
                row = json.loads(line)
                if row["row"] < start:
                    errors[row["row"]] = row["error"]
        err_path.write_text("".join(json.dumps({"row": r, "error": e}) + "\n" for r, e in sorted(errors.items())))
    else:
        emb = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(n, embedder.dim))  # (N, dim)
        (cache / "ids.json").write_text(json.dumps([r.id for r in records]))
        err_path.write_text("")
        _write_json_atomic(prog_path, {"done": 0})
        _write_json_atomic(meta_path, {"key": key, "n": n, "dim": embedder.dim, "embedder": embedder.name})
    stats = {"embedded": n - start, "reused": start}
    if start >= n:
        return emb, errors, stats

    loader = make_loader(records, embedder, start, batch_size, num_workers)
    done, since_flush, pending_errors = start, 0, []
    bar = tqdm(total=n, initial=start, desc="embed", unit="rec", disable=not progress)
    for batch in loader:
        vecs = embedder.encode(batch)  # (B, dim)
        idx = batch["index"].numpy()
        emb[idx[0] : idx[-1] + 1] = vecs.numpy()  # batches are contiguous and ordered
        pending_errors += batch["errors"]
        done = int(idx[-1]) + 1
        since_flush += len(idx)
        bar.update(len(idx))
        if since_flush >= chunk_size:
            _flush(emb, err_path, prog_path, pending_errors, done)
            errors.update(pending_errors)
            since_flush, pending_errors = 0, []
    _flush(emb, err_path, prog_path, pending_errors, done)
    errors.update(pending_errors)
    bar.close()
    return emb, errors, stats


def _flush(emb: np.memmap, err_path: Path, prog_path: Path, new_errors: list, done: int) -> None:
    """Rows first, then their errors, then the marker: a marker never points past data that is on disk."""
    emb.flush()
    with err_path.open("a") as f:
        for row, err in new_errors:
            f.write(json.dumps({"row": int(row), "error": err}) + "\n")
    _write_json_atomic(prog_path, {"done": done})
