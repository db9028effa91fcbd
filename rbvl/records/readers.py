"""Readers: every input format streamed into Records, every bad row a Reject with its reason and source.

    from rbvl.records import ReadOptions, Record, Reject, read_records
    for item in read_records(["data/llava.json"], ReadOptions(image_root="data/images")):
        ...  # a Record, or a Reject(id, source, reason, detail)

One pass, bounded memory: a JSON array is parsed as a stream (ijson), JSON lines line by line, Parquet batch by batch.

Inputs (auto-detected, or `ReadOptions.format`): LLaVA JSON / JSONL with an image root (an image path that resolves
outside it, by `..`, an absolute path or a symlink, is rejected as `image_outside_root` unless
`allow_outside_root`); WebDataset shards (image +
`.json` / `.txt`); text-only JSONL / Parquet (presets: `s1` for S1-59k reasoning traces, `text` for prompt/response
rows). Readers stream: image bytes stay on disk (`Record.image_path`) until a DataLoader worker asks for them.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rbvl.records.record import IMAGE_TOKEN, Record, RecordsError, Reject, normalise_conversation

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


@dataclass
class ReadOptions:
    format: str | None = None  # None = auto; "llava" | "webdataset" | "jsonl" | "parquet"
    image_root: str | None = None  # LLaVA image paths are relative to it (default: the JSON file's folder)
    preset: str | None = None  # "llava" | "s1" | "text"
    text_fields: list[str] | None = None  # fields joined into Record.text (overrides the preset)
    label_field: str | None = None  # column with the original domain label (overrides the preset)
    with_trajectory: bool = False  # s1: embed the question and the thinking trajectory
    allow_outside_root: bool = False  # accept image paths that resolve outside the image root (.., absolute, symlink)


# What each preset embeds, which column is the original label, and how rows become conversations.
PRESETS = {
    "llava": {"text_fields": None, "label_field": "domain"},  # text = the user turns
    "s1": {"text_fields": ["question"], "label_field": "source_type"},
    "text": {"text_fields": None, "label_field": "domain"},  # prompt/question/instruction → response/answer/output
}
PROMPT_FIELDS = ("prompt", "question", "instruction", "input", "query")
RESPONSE_FIELDS = ("response", "answer", "output", "completion", "solution")


def read_records(paths: str | Iterable[str], opts: ReadOptions | None = None) -> Iterator[Record | Reject]:
    """Every record of `paths` as a Record or a Reject, in input order; ids are unique within one call."""
    opts = opts or ReadOptions()
    seen: set[str] = set()
    for path, fmt in expand_inputs([paths] if isinstance(paths, str) else list(paths), opts.format):
        reader = {"llava": _read_llava, "webdataset": _read_webdataset, "jsonl": _read_rows, "parquet": _read_rows}
        for item in reader[fmt](path, opts):
            if isinstance(item, Record):
                if item.id in seen:
                    item = Reject(item.id, item.source or path, "duplicate_id", "id seen earlier")
                else:
                    seen.add(item.id)
            yield item


def expand_inputs(paths: list[str], fmt: str | None) -> list[tuple[str, str]]:
    """Files, globs, folders of shards and brace-expanded urls → [(file, format)]."""
    from braceexpand import braceexpand

    out = []
    for spec in paths:
        found = []
        for pattern in braceexpand(str(spec)):
            p = Path(pattern)
            if p.is_dir():
                found += sorted(str(x) for x in p.glob("*.tar"))
            elif p.is_file():
                found.append(str(p))
            else:
                found += sorted(glob.glob(pattern))
        if not found:
            raise RecordsError(f"no input matches '{spec}'")
        out += [(f, fmt or detect_format(f)) for f in found]
    return out


def detect_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".json", ".jsonl"):
        first = _peek_json(path)
        if isinstance(first, dict) and ("conversations" in first or "conversation" in first or "image" in first):
            return "llava"
        return "jsonl" if suffix == ".jsonl" or not isinstance(first, dict) or "question" in first else "llava"
    raise RecordsError(f"{path}: cannot tell the format from '{suffix}'; pass --format llava|webdataset|jsonl|parquet")


def _peek_json(path: str):
    """The first record of a JSON array or JSON-lines file, reading only the file's start (None if there is none)."""
    with open(path, "rb") as f:
        if _first_byte(f) == b"[":
            try:
                return next(_array_items(f), None)
            except RecordsError:
                return None
        for _, line in zip(range(20), f):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _first_byte(f) -> bytes:
    """The first non-blank byte of a binary file (after a UTF-8 BOM), leaving the file after the BOM."""
    head = f.read(4096)
    f.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


def _array_items(f) -> Iterator[object]:
    """The items of a JSON array, parsed as a stream (ijson: memory holds one item, not the file)."""
    import ijson

    n = 0
    try:
        for item in ijson.items(f, "item", use_float=True):
            yield item
            n += 1
    except (ijson.JSONError, UnicodeDecodeError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecordsError(f"{getattr(f, 'name', 'input')}: not valid JSON after {n} records: {problem}") from None


def _json_items(path: str) -> Iterator[tuple[str, object]]:
    """(source, parsed object or the decoding error) for a JSON array file or a JSON-lines file, streamed.

    Raises:
        RecordsError: a JSON array that stops parsing (the records before the fault were already yielded), or a
            `.json` file holding one JSON object where a list of records is expected.
    """
    with open(path, "rb") as f:
        head = _first_byte(f)
        if head == b"{":
            _refuse_single_object(path)
        if head == b"[":
            for i, row in enumerate(_array_items(f)):
                yield f"{path}[{i}]", row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)  # bytes: bad UTF-8 is a ValueError like bad JSON
            except ValueError as e:
                yield f"{path}:{n}", e


def _refuse_single_object(path: str) -> None:
    """A `.json` file holding one JSON object (not a list of records, not JSON lines) is an error naming the file."""
    if Path(path).suffix.lower() != ".json":
        return
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # only the shape matters here
        first = f.readline()
        rest = f.read(1 << 16)
    try:
        obj = json.loads(first)
        if rest.strip():
            return  # JSON lines in a .json file
    except json.JSONDecodeError:
        try:  # an object spread over several lines (json.dump with indent)
            obj = json.loads(Path(path).read_text(encoding="utf-8-sig", errors="replace"))
        except json.JSONDecodeError:
            return  # broken lines: each becomes a bad_json reject
    if isinstance(obj, dict):
        keys = ", ".join(list(map(str, obj))[:5]) or "none"
        raise RecordsError(f"{path}: expected a list of records (a JSON array), got one JSON object (keys: {keys})")


def _read_llava(path: str, opts: ReadOptions) -> Iterator[Record | Reject]:
    root = Path(opts.image_root) if opts.image_root else Path(path).parent
    for source, row in _json_items(path):
        if isinstance(row, Exception):
            yield Reject(None, source, "bad_json", str(row))
            continue
        yield from _llava_record(row, source, opts, root=root)


def _llava_record(row, source: str, opts: ReadOptions, root: Path | None = None, image: tuple | None = None):
    """One LLaVA-style row → Record or Reject. `image` = (bytes, ext) when the image came with the row (shards)."""
    if not isinstance(row, dict):
        yield Reject(None, source, "malformed_conversation", "a record is a JSON object")
        return
    rid = str(row["id"]) if row.get("id") is not None else None
    turns = row.get("conversations", row.get("conversation"))
    if turns is None:
        yield Reject(rid, source, "missing_field", "no 'conversations'")
        return
    if rid is None:
        yield Reject(None, source, "missing_field", "no 'id'")
        return
    conversation, problem = normalise_conversation(turns)
    if problem:
        yield Reject(rid, source, *problem)
        return
    images = row.get("images") if row.get("image") is None else [row["image"]]
    images = [x for x in (images or []) if x]
    if len(images) > 1:
        yield Reject(rid, source, "multiple_images", f"{len(images)} images; one per record is supported")
        return
    n_images = 1 if (images or image) else 0
    n_tokens = sum(t["content"].count(IMAGE_TOKEN) for t in conversation)
    if n_tokens != n_images:
        yield Reject(rid, source, "image_placeholder_mismatch", f"{n_tokens} '<image>' for {n_images} image(s)")
        return
    record = Record(rid, conversation, label=_label(row, opts, "domain"), meta={"format": "llava"}, source=source)
    if image is not None:
        record.image, record.image_ext = image
    elif images:
        file = Path(images[0]) if Path(images[0]).is_absolute() else root / images[0]
        if not file.is_file():
            yield Reject(rid, source, "missing_image", str(file))
            return
        resolved = file.resolve()
        if not opts.allow_outside_root and not _inside(resolved, root):
            yield Reject(rid, source, "image_outside_root", f"{images[0]} resolves to {resolved}, outside {root}")
            return
        record.image_path = str(resolved)
    record.text = _text(row, conversation, opts)
    yield record


def _inside(resolved: Path, root: Path) -> bool:
    """Whether `resolved` (symlinks followed) lies under the image root (symlinks of the root itself followed too)."""
    return resolved.is_relative_to(root.resolve())


def _read_webdataset(path: str, opts: ReadOptions) -> Iterator[Record | Reject]:
    from webdataset import tariterators

    for sample in _tar_samples(tariterators.tarfile_samples([{"url": path}]), path):
        key = sample["__key__"]
        files = [ext for ext in sample if not ext.startswith("__")]
        stems = {ext.rpartition(".")[0] for ext in files}
        if len(stems) == 1 and "" not in stems:  # webdataset splits "a.b.jpg" at the first dot: the id was "a.b"
            stem = stems.pop()
            key = f"{key}.{stem}"
            sample = {"__key__": key, **{ext.rpartition(".")[2]: sample[ext] for ext in files}}
        source = f"{path}:{key}"
        image = next(((sample[e], "jpg" if e == "jpeg" else e) for e in IMAGE_EXTS if e in sample), None)
        if "json" in sample:
            try:
                row = json.loads(sample["json"])
            except json.JSONDecodeError as e:
                yield Reject(key, source, "bad_json", str(e))
                continue
        else:
            row = {}
        row.setdefault("id", key)
        if "conversations" not in row and "conversation" not in row:
            caption = row.get("caption") or row.get("text")
            if caption is None and "txt" in sample:
                caption = sample["txt"].decode("utf-8", errors="replace").strip()
            if not caption:
                yield Reject(row["id"], source, "missing_field", "no conversation, caption or .txt")
                continue
            prompt = f"{IMAGE_TOKEN}\nDescribe the image." if image else "Continue."
            row["conversation"] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
        if "label" in row and "domain" not in row:
            row["domain"] = row["label"]
        yield from _llava_record(row, source, opts, image=image)


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


def _read_rows(path: str, opts: ReadOptions) -> Iterator[Record | Reject]:
    """Text-only rows (JSONL or Parquet): S1-style traces or prompt/response pairs."""
    stem = Path(path).stem
    if path.endswith(".parquet"):
        rows = _parquet_rows(path)
    else:
        rows = _json_items(path)
    for i, (source, row) in enumerate(rows):
        if isinstance(row, Exception):
            yield Reject(None, source, "bad_json", str(row))
            continue
        if not isinstance(row, dict):
            yield Reject(None, source, "malformed_conversation", "a row is a JSON object")
            continue
        if "conversations" in row or "conversation" in row:
            row.setdefault("id", f"{stem}-{i}")
            yield from _llava_record(row, source, opts, root=Path(opts.image_root or Path(path).parent))
            continue
        rid = str(row.get("id", f"{stem}-{i}"))
        preset = opts.preset or ("s1" if "thinking_trajectories" in row else "text")
        if preset == "s1":
            question = row.get("question")
            trajectory = row.get("thinking_trajectories") or []
            trajectory = "\n".join(trajectory) if isinstance(trajectory, list) else str(trajectory)
            answer = "\n\n".join(x for x in (trajectory, row.get("attempt") or row.get("solution") or "") if x)
        else:
            question = next((row[f] for f in PROMPT_FIELDS if row.get(f)), None)
            answer = next((row[f] for f in RESPONSE_FIELDS if row.get(f)), None)
        if not question or not answer:
            yield Reject(rid, source, "missing_field", "no question/prompt and answer/response")
            continue
        conversation = [{"role": "user", "content": str(question)}, {"role": "assistant", "content": str(answer)}]
        text = _text(row, conversation, opts, preset=preset)
        if preset == "s1" and opts.with_trajectory and row.get("thinking_trajectories"):
            text = f"{text}\n{trajectory}"
        label_default = PRESETS.get(preset, {}).get("label_field", "domain")
        meta = {"format": "s1" if preset == "s1" else "text"}
        label = _label(row, opts, label_default, preset)
        yield Record(rid, conversation, label=label, text=text, meta=meta, source=source)


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet file, batch by batch (pyarrow `iter_batches`: memory holds one batch)."""
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}[{i}]", row
                i += 1
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise RecordsError(f"{path}: not a readable Parquet file after {i} rows: {e}") from None


def _label(row: dict, opts: ReadOptions, default: str, preset: str | None = None) -> str | None:
    preset = opts.preset or preset
    name = opts.label_field or PRESETS.get(preset or "", {}).get("label_field") or default
    value = row.get(name)
    return None if value is None else str(value)


def _text(row: dict, conversation: list[dict], opts: ReadOptions, preset: str | None = None) -> str:
    fields = opts.text_fields or PRESETS.get(opts.preset or preset or "", {}).get("text_fields")
    if fields:
        return "\n".join(str(row[f]) for f in fields if row.get(f))
    users = [t["content"].replace(IMAGE_TOKEN, "").strip() for t in conversation if t["role"] == "user"]
    return "\n".join(u for u in users if u)
