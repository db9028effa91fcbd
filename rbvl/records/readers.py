"""Readers: every input format streamed into Records, every bad row a Reject with its reason and source.

    from rbvl.records import ReadOptions, Record, Reject, read_records
    for item in read_records(["data/llava.json"], ReadOptions(image_root="data/images")):
        ...  # a Record, or a Reject(id, source, reason, detail)

One pass, bounded memory: a JSON array is parsed as a stream (ijson), JSON lines line by line, Parquet and Arrow batch
by batch (pyarrow). Containers, detected from the input (or `ReadOptions.format`): JSON / JSONL files (`llava`,
`jsonl`), Parquet files (`parquet`, Hugging Face `datasets` output included), Arrow files and `save_to_disk` folders
(`arrow`), WebDataset shards (`webdataset`: image + `.json` / `.txt`), and a dataset name (`org/name[:split]`) found
in the local Hugging Face cache. Every row, whatever the container, is read by rbvl.records.rows: conversations
(LLaVA, ShareGPT, chat `messages` with content parts and an `images` column), prompt/response pairs, S1 traces.

Images stay on disk (`Record.image_path`) until a DataLoader worker asks for them; an image path that resolves
outside the image root (by `..`, an absolute path or a symlink) is rejected as `image_outside_root` unless
`allow_outside_root`.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rbvl.records import tables
from rbvl.records.jsonfiles import json_items
from rbvl.records.record import IMAGE_TOKEN, Record, RecordsError, Reject
from rbvl.records.rows import conversation_field, describe_row, pair_row, row_keys, row_record

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
FORMATS = ("llava", "jsonl", "parquet", "arrow", "webdataset")
CONTAINERS = {"json": "JSON", "jsonl": "JSON lines", "llava": "JSON", "parquet": "Parquet", "arrow": "Arrow",
              "webdataset": "WebDataset shards"}  # fmt: skip


@dataclass
class ReadOptions:
    format: str | None = None  # None = auto; one of FORMATS
    image_root: str | None = None  # relative image paths are resolved against it (default: the input file's folder)
    preset: str | None = None  # "llava" | "s1" | "text"
    text_fields: list[str] | None = None  # fields joined into Record.text (overrides the preset)
    label_field: str | None = None  # column with the original domain label (overrides the preset)
    with_trajectory: bool = False  # s1: embed the question and the thinking trajectory
    allow_outside_root: bool = False  # accept image paths that resolve outside the image root (.., absolute, symlink)
    conversation_field: str | None = None  # the column of chat turns (default: conversations | conversation | messages)
    image_field: str | None = None  # the column of images (default: images | image)
    id_field: str | None = None  # the column of record ids (default: id; rows without one get FILESTEM-ROW)
    prompt_field: str | None = None  # text-only rows: the prompt column (default: prompt | question | instruction ...)
    response_field: str | None = None  # text-only rows: the response column (default: response | answer | output ...)
    announce: Callable[[str], None] | None = None  # told, once per input, how it is read (when `format` is auto)


def read_records(
    paths: str | Iterable[str], opts: ReadOptions | None = None, tags: dict[str, str] | None = None
) -> Iterator[Record | Reject]:
    """Every record of `paths` as a Record or a Reject, in input order; ids are unique within one call.

    A row without an id is named TAG-ROW, TAG being its file's `file_tags` entry (in `tags`, which a caller reading
    several splits makes over all of their files, or else made over this call's files)."""
    opts = opts or ReadOptions()
    seen: dict[str, int] = {}  # id → the file it came from (its position in `names`)
    names: list[str] = []
    readers = {"webdataset": _read_webdataset, "parquet": _read_table, "arrow": _read_table}
    specs = [paths] if isinstance(paths, str) else list(paths)
    inputs = [(spec, expand_inputs([spec], opts.format)) for spec in specs]
    tags = tags or file_tags([path for _, files in inputs for path, _ in files])
    for spec, files in inputs:
        announce = _Announcer(spec, len(files), opts)
        for path, fmt in files:
            announce.fmt = fmt
            names.append(path)
            here = len(names) - 1
            for item in readers.get(fmt, _read_json)(path, fmt, opts, announce, tags.get(path)):
                if isinstance(item, Record):
                    first = seen.get(item.id)
                    if first is None:
                        seen[item.id] = here
                    else:
                        where = "in this file" if first == here else f"in {names[first]}"
                        hint = (
                            " (tar keys must be unique across shards)" if fmt == "webdataset" and first != here else ""
                        )
                        item = Reject(item.id, item.source or path, "duplicate_id", f"id seen earlier {where}{hint}")
                yield item


class _Announcer:
    """Tells `opts.announce`, once per input and only when the format was detected, how the input is read: called
    with the input's first row (None for tar shards)."""

    def __init__(self, spec: str, n_files: int, opts: ReadOptions):
        self.spec, self.n_files, self.opts = spec, n_files, opts
        self.fmt = ""
        self.done = opts.announce is None or opts.format is not None

    def __call__(self, row) -> None:
        if self.done:
            return
        self.done = True
        shape = describe_row(row, self.opts) if row is not None else "image + .json / .txt per sample"
        many = f" ({self.n_files} files)" if self.n_files > 1 else ""
        self.opts.announce(f"{self.spec}{many}: {CONTAINERS[self.fmt]}, {shape}")


def expand_inputs(paths: list[str], fmt: str | None) -> list[tuple[str, str]]:
    """Files, globs, folders (of shards, Parquet or Arrow files; `save_to_disk` output), brace-expanded urls and
    dataset names in the local Hugging Face cache → [(file, format)]."""
    from braceexpand import braceexpand

    out = []
    for spec in paths:
        found = []
        for pattern in braceexpand(str(spec)):
            p = Path(pattern)
            if p.is_dir():
                found += tables.folder_inputs(p)
            elif p.is_file():
                found.append((str(p), None))
            elif tables.is_dataset_name(pattern) and not glob.glob(pattern):
                found += tables.cached_dataset_files(pattern)
            else:
                found += [(f, None) for f in sorted(glob.glob(pattern))]
        if not found:
            hint = ""
            if tables.is_dataset_name(str(spec)):
                hint = " (no file, and no dataset of that name in the local Hugging Face cache: download it once)"
            raise RecordsError(f"no input matches '{spec}'{hint}")
        out += [(f, fmt or found_fmt or detect_format(f)) for f, found_fmt in found]  # a given format wins
    return out


def file_tags(files: Iterable[str]) -> dict[str, str]:
    """file → the name its rows without an id are given (TAG-ROW): the file's stem, or where several files share a
    stem (`train/data-00000-of-00001.arrow` and `test/data-00000-of-00001.arrow`, `save_to_disk` splits), as many
    of its folders' names before it as tell them apart (`train-data-00000-of-00001`), and its suffix where they lie
    in one folder (`x-json`, `x-jsonl`)."""
    by_stem: dict[str, list[str]] = {}
    for f in dict.fromkeys(files):
        by_stem.setdefault(Path(f).stem, []).append(f)
    tags = {}
    for stem, group in by_stem.items():  # only files of one stem are compared: linear in the files
        if len(group) == 1:
            tags[group[0]] = stem
            continue
        folders = {f: Path(os.path.abspath(f)).parent.parts[1:][::-1] for f in group}  # nearest first, no root
        shared = Counter(folder[:d] for folder in set(folders.values()) for d in range(len(folder) + 1))
        per_folder = Counter(folders.values())
        for f in group:
            folder, depth = folders[f], 0
            while depth < len(folder) and shared[folder[:depth]] > 1:  # another folder ends in these names too
                depth += 1
            tag = "-".join([*reversed(folder[:depth]), stem])
            if per_folder[folder] > 1:  # another file of this stem in the same folder
                tag = f"{tag}-{Path(f).suffix.lstrip('.')}"
            tags[f] = tag
    return tags


def detect_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    known = {".tar": "webdataset", ".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "jsonl"}
    if suffix in known:
        return known[suffix]
    raise RecordsError(f"{path}: cannot tell the format from '{suffix}'; pass --format {'|'.join(FORMATS)}")


def _read_json(path: str, fmt: str, opts: ReadOptions, on_row, tag: str | None) -> Iterator[Record | Reject]:
    """JSON / JSONL rows of any shape; images are relative to the image root (default: the file's folder)."""
    root = Path(opts.image_root) if opts.image_root else Path(path).parent
    stem = tag or Path(path).stem
    for i, (source, row) in enumerate(json_items(path)):
        if isinstance(row, Exception):
            yield Reject(None, source, "bad_json", str(row))
            continue
        on_row(row)
        yield row_record(row, source, opts, root, f"{stem}-{i}")


def _read_table(path: str, fmt: str, opts: ReadOptions, on_row, tag: str | None) -> Iterator[Record | Reject]:
    """Parquet or Arrow rows of any shape (Hugging Face `Image` columns included)."""
    root = Path(opts.image_root) if opts.image_root else Path(path).parent
    stem = tag or Path(path).stem
    for i, (source, row) in enumerate(tables.table_rows(path, fmt)):
        on_row(row)
        yield row_record(row, source, opts, root, f"{stem}-{i}")


def _read_webdataset(path: str, fmt: str, opts: ReadOptions, on_row, tag: str | None) -> Iterator[Record | Reject]:
    from webdataset import tariterators

    on_row(None)
    keys = set()
    for sample in _tar_samples(tariterators.tarfile_samples([{"url": path}]), path):
        key = sample["__key__"]
        if key in keys:  # webdataset groups consecutive files: a key seen before is a sample whose files are apart
            yield Reject(
                key, f"{path}:{key}", "duplicate_id", "key seen earlier in this shard (its files not together?)"
            )
            continue
        keys.add(key)
        files = [ext for ext in sample if not ext.startswith("__")]
        stems = {ext.rpartition(".")[0] for ext in files}
        if len(stems) == 1 and "" not in stems:  # webdataset splits "a.b.jpg" at the first dot: the id was "a.b"
            stem = stems.pop()
            key = f"{key}.{stem}"
            sample = {"__key__": key, **{ext.rpartition(".")[2]: sample[ext] for ext in files}}
        source = f"{path}:{key}"
        image = next(((sample[e], "jpg" if e == "jpeg" else e) for e in IMAGE_EXTS if e in sample), None)
        images = [image] if image else []
        if "json" in sample:
            try:
                row = json.loads(sample["json"])
            except json.JSONDecodeError as e:
                yield Reject(key, source, "bad_json", str(e))
                continue
        else:
            row = {}
        columns = row_keys(row)  # before the id is filled in: what the file itself holds
        row.setdefault("id", key)
        if isinstance(row.get("images"), list) and row["images"] and all(e in sample for e in row["images"]):
            images = [(sample[e], e.rpartition(".")[2]) for e in row["images"]]  # an rbvl multi-image sample
        caption = None
        if conversation_field(row, opts) is None and not pair_row(row, opts):  # a caption (or .txt) sample
            caption = row.get("caption") or row.get("text")
            if caption is None and "txt" in sample:
                caption = sample["txt"].decode("utf-8", errors="replace").strip()
            if not caption:
                why = (
                    "the .txt caption is empty"
                    if "txt" in sample
                    else "no conversation, caption or .txt, nor a prompt with a response"
                )
                why += f"; the .json has: {columns}" if "json" in sample else ""
                yield Reject(row["id"], source, "missing_field", why)
                continue
            prompt = f"{IMAGE_TOKEN}\nDescribe the image." if image else "Continue."
            row["conversation"] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
        if "label" in row and "domain" not in row:
            row["domain"] = row["label"]
        record = row_record(row, source, opts, None, key, images=images)
        if caption is not None and isinstance(record, Record) and not opts.text_fields:
            record.text = str(caption)  # the caption is the sample's text (CLIP's pair), not the fixed prompt
        yield record


def _tar_samples(samples: Iterator[dict], path: str) -> Iterator[dict]:
    n = 0
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - tarfile / webdataset raise several types for a broken shard
            problem = " ".join(str(e.args[0] if e.args else e).split())
            raise RecordsError(f"{path}: not a readable tar shard after {n} samples: {problem}") from None
        n += 1
        yield sample
