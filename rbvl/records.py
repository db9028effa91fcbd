"""Records: one training example whatever its source, the readers that make them, and the rejects that explain what
could not be used (see `docs/formats.md` for the field-by-field contract).

    from rbvl.records import ReadOptions, Record, Reject, read_records
    for item in read_records(["data/llava.json"], ReadOptions(image_root="data/images")):
        ...  # a Record, or a Reject(id, source, reason, detail)

Inputs (auto-detected, or `ReadOptions.format`): LLaVA JSON / JSONL with an image root; WebDataset shards (image +
`.json` / `.txt`); text-only JSONL / Parquet (presets: `s1` for S1-59k reasoning traces, `text` for prompt/response
rows). Readers stream: image bytes stay on disk (`Record.image_path`) until a DataLoader worker asks for them.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
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
    meta: dict = field(default_factory=dict)
    image_path: str | None = None  # read lazily by `load_image` (LLaVA JSON keeps images on disk)

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
                    item = Reject(item.id, item.meta.get("source", path), "duplicate_id", "id seen earlier")
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
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return data[0] if data else None
        except json.JSONDecodeError:
            return None
    for line in head.splitlines():
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _json_items(path: str) -> Iterator[tuple[str, object]]:
    """(source, parsed object or the JSONDecodeError) for a JSON array file or a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1).strip() or f.read(64).lstrip()[:1]
    if head == "{":
        _refuse_single_object(path)
    if head == "[":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", e


def _refuse_single_object(path: str) -> None:
    """A `.json` file holding one JSON object (not a list of records, not JSON lines) is an error naming the file."""
    if Path(path).suffix.lower() != ".json":
        return
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        rest = f.read(1 << 16)
    try:
        obj = json.loads(first)
        if rest.strip():
            return  # JSON lines in a .json file
    except json.JSONDecodeError:
        try:  # an object spread over several lines (json.dump with indent)
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
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
    record = Record(rid, conversation, label=_label(row, opts, "domain"), meta={"source": source, "format": "llava"})
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

    for sample in tariterators.tarfile_samples([{"url": path}]):
        key = sample["__key__"]
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
        meta = {"source": source, "format": "s1" if preset == "s1" else "text"}
        yield Record(rid, conversation, label=_label(row, opts, label_default, preset), text=text, meta=meta)


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise RecordsError(f"{path}: not a readable Parquet file: {e}") from None
    i = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


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


def check_image(data: bytes) -> str | None:
    """An error message if `data` does not decode as an image, else None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return f"{type(e).__name__}: {e}"
    return None


def write_rejects(path: str | Path, rejects: Iterable[Reject], **extra) -> int:
    """Append rejects as JSON lines; returns how many were written."""
    n = 0
    with open(path, "a", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps({**r.to_json(), **extra}) + "\n")
            n += 1
    return n


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(record_id: str) -> str:
    """A WebDataset-safe key for `record_id` (webdataset splits file names at the first dot).

    Unsafe characters become `_`; when that changed the id, a short hash of the original keeps keys unique.
    """
    key = _UNSAFE.sub("_", record_id)
    if key != record_id or not key:
        key = f"{key}_{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return key
