"""Records: one training example whatever its source, the readers that make them, and the rejects that explain what
could not be used (see `docs/formats.md` for the field-by-field contract).

    from rbvl.records import ReadOptions, Record, Reject, read_records
    for item in read_records(["data/llava.json"], ReadOptions(image_root="data/images")):
        ...  # a Record, or a Reject(id, source, reason, detail)

One pass, bounded memory: a JSON array is parsed as a stream (ijson), JSON lines line by line, Parquet batch by batch;
`RecordSpool` keeps read records on disk (an offset index in memory) for the stages after reading, and one `Rejects`
collector gathers what read, embed and write could not use, to be written once as rejects.jsonl.

Inputs (auto-detected, or `ReadOptions.format`): LLaVA JSON / JSONL with an image root; WebDataset shards (image +
`.json` / `.txt`); text-only JSONL / Parquet (presets: `s1` for S1-59k reasoning traces, `text` for prompt/response
rows). Readers stream: image bytes stay on disk (`Record.image_path`) until a DataLoader worker asks for them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")

# LLaVA's speaker names onto chat roles.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

REASONS = (
    "bad_json",
    "missing_field",
    "missing_image",
    "unreadable_image",
    "empty_conversation",
    "malformed_conversation",
    "image_placeholder_mismatch",
    "duplicate_id",
    "multiple_images",
)


class RecordsError(ValueError):
    """An input that cannot be read at all (no file matches, a JSON file that does not parse); one line."""


@dataclass
class Record:
    id: str
    conversation: list[dict]  # [{"role": "user" | "assistant" | "system", "content": str}, ...]
    image: bytes | None = None  # the image file's bytes, untouched
    image_ext: str | None = None  # "png", "jpg", ...
    label: str | None = None  # the source's own domain label
    text: str = ""  # what gets embedded
    meta: dict = field(default_factory=dict)  # "format", anything else worth keeping (JSON-serialisable)
    image_path: str | None = None  # read lazily by `load_image` (LLaVA JSON keeps images on disk)
    source: str = ""  # file (and line / row / key) the record came from, as in a Reject

    def load_image(self) -> tuple[bytes, str] | None:
        """(bytes, extension) of the record's image, or None for a text-only record."""
        if self.image is not None:
            return self.image, self.image_ext or "png"
        if self.image_path is None:
            return None
        ext = Path(self.image_path).suffix.lower().lstrip(".") or "png"
        return Path(self.image_path).read_bytes(), "jpg" if ext == "jpeg" else ext


@dataclass
class Reject:
    id: str | None
    source: str  # file (and line / row / key) the record came from
    reason: str  # one of REASONS
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ReadOptions:
    format: str | None = None  # None = auto; "llava" | "webdataset" | "jsonl" | "parquet"
    image_root: str | None = None  # LLaVA image paths are relative to it (default: the JSON file's folder)
    preset: str | None = None  # "llava" | "s1" | "text"
    text_fields: list[str] | None = None  # fields joined into Record.text (overrides the preset)
    label_field: str | None = None  # column with the original domain label (overrides the preset)
    with_trajectory: bool = False  # s1: embed the question and the thinking trajectory


# What each preset embeds, which column is the original label, and how rows become conversations.
PRESETS = {
    "llava": {"text_fields": None, "label_field": "domain"},  # text = the user turns
    "s1": {"text_fields": ["question"], "label_field": "source_type"},
    "text": {"text_fields": None, "label_field": "domain"},  # prompt/question/instruction → response/answer/output
}
PROMPT_FIELDS = ("prompt", "question", "instruction", "input", "query")
RESPONSE_FIELDS = ("response", "answer", "output", "completion", "solution")


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


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
        record.image_path = str(file.resolve())
    record.text = _text(row, conversation, opts)
    yield record


def normalise_conversation(turns) -> tuple[list[dict], tuple[str, str] | None]:
    """LLaVA `from/value` or `role/content` turns → rbvl turns, or (reason, detail) for what is wrong."""
    if not isinstance(turns, list):
        return [], ("malformed_conversation", "the conversation is not a list of turns")
    if not turns:
        return [], ("empty_conversation", "no turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            return [], ("malformed_conversation", "a turn is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLE_NAMES or not isinstance(content, str):
            return [], (
                "malformed_conversation",
                f"turn with role {role!r} and content of type {type(content).__name__}",
            )
        out.append({"role": ROLE_NAMES[role], "content": content})
    if all(not t["content"].replace(IMAGE_TOKEN, "").strip() for t in out):
        return [], ("empty_conversation", "every turn is empty")
    speakers = [t["role"] for t in out if t["role"] != "system"]
    if not speakers or speakers[0] != "user":
        return [], ("malformed_conversation", "the first turn is not the user's")
    if "assistant" not in speakers:
        return [], ("malformed_conversation", "no assistant turn")
    return out, None


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


# ---------------------------------------------------------------------------------------------------------------------
# Helpers for the stages after reading
# ---------------------------------------------------------------------------------------------------------------------


class Rejects:
    """The one collector of what could not be used, per split, from every stage (read, embed, write).

    `rejects.add("train", Reject(...))` or `rejects.add("train", record, "unreadable_image", detail)`; written once,
    as rejects.jsonl (one line per reject, with its split); `count(split)` closes the manifest's books
    (in = written + rejected).
    """

    def __init__(self):
        self.items: list[tuple[str, Reject]] = []

    def add(self, split: str, item: Reject | Record, reason: str | None = None, detail: str = "") -> None:
        if isinstance(item, Record):
            if reason not in REASONS:
                raise ValueError(f"unknown reject reason {reason!r}")
            item = Reject(item.id, item.source or split, reason, detail)
        self.items.append((split, item))

    def count(self, split: str) -> int:
        return sum(1 for s, _ in self.items if s == split)

    def by_reason(self, split: str) -> dict[str, int]:
        return dict(Counter(r.reason for s, r in self.items if s == split))

    def ids(self, split: str) -> list:
        return [r.id for s, r in self.items if s == split]

    def write(self, path: str | Path) -> int:
        """rejects.jsonl, train then eval in the order found; returns how many lines were written."""
        with open(path, "w", encoding="utf-8") as f:
            for split, r in self.items:
                f.write(json.dumps({"split": split, **r.to_json()}, ensure_ascii=False) + "\n")
        return len(self.items)


class RecordSpool:
    """Records kept on disk, one after another, with an offset index in memory (8 bytes per record).

    Regroup spools what it reads and takes records back by row for embedding (in DataLoader workers: reads use
    `os.pread`, which shares no file position across forked processes), for the report and for writing shards.
    Each entry is a small binary header, the record's fields as JSON and its image bytes when it carries them.
    """

    _HEAD = struct.Struct("<II")  # JSON length, image length

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "wb")  # closed by finish()
        self.offsets = array("q", [0])  # entry i is bytes offsets[i]..offsets[i + 1]
        self.labels: list[str | None] = []  # kept in memory for clustering metrics (one object per distinct label)
        self._names: dict[str, str] = {}
        self._fd: int | None = None

    def append(self, rec: Record) -> None:
        fields = {k: v for k, v in rec.__dict__.items() if k != "image"}
        head = json.dumps(fields, ensure_ascii=False).encode()
        image = rec.image or b""
        self._out.write(self._HEAD.pack(len(head), len(image)) + head + image)
        self.offsets.append(self.offsets[-1] + self._HEAD.size + len(head) + len(image))
        self.labels.append(None if rec.label is None else self._names.setdefault(rec.label, rec.label))

    def finish(self) -> RecordSpool:
        """Done appending: flush, and from now on read."""
        if self._out is not None:
            self._out.close()
            self._out = None
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SpoolRows(self, range(len(self))[i])
        if self._fd is None:
            self.finish()
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = self.offsets[i], self.offsets[i + 1]
        data = os.pread(self._fd, end - start, start)
        n_head, n_image = self._HEAD.unpack_from(data)
        rec = Record(**json.loads(data[self._HEAD.size : self._HEAD.size + n_head]))
        if n_image:
            rec.image = data[self._HEAD.size + n_head :]
        return rec

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def rows(self, rows) -> SpoolRows:
        return SpoolRows(self, rows)

    def close(self, delete: bool = True) -> None:
        self.finish()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete:
            self.path.unlink(missing_ok=True)

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn reopen the file themselves
        state = dict(self.__dict__)
        state.update(_out=None, _fd=None)
        return state


class SpoolRows:
    """A list-like view of some rows of a spool (the train rows, the eval rows)."""

    def __init__(self, spool: RecordSpool, rows):
        self.spool, self.rows_ = spool, rows

    def __len__(self) -> int:
        return len(self.rows_)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SpoolRows(self.spool, self.rows_[i])
        return self.spool[int(self.rows_[i])]

    def __iter__(self) -> Iterator[Record]:
        return (self.spool[int(r)] for r in self.rows_)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(record_id: str) -> str:
    """A WebDataset-safe key for `record_id` (webdataset splits file names at the first dot).

    Unsafe characters become `_`; when that changed the id, a short hash of the original keeps keys unique.
    """
    key = _UNSAFE.sub("_", record_id)
    if key != record_id or not key:
        key = f"{key}_{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return key
