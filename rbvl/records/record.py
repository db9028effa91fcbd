"""Record: one training example whatever its source; Reject: one that could not be used, and why; `Rejects`: the one
collector of them from every stage (read, embed, write), written once as rejects.jsonl (docs/formats.md, "Record").

    turns, problem = normalise_conversation(row["messages"])   # from/value, role/content, content parts → rbvl turns
    record = Record(row["id"], turns, label=row.get("domain"))
    rejects.add("train", record, "unreadable_image", "cannot decode the .png image")
    rejects.summary("train")   # [(reason, count, first Reject)], most frequent first: what the user reads
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"

# LLaVA's / ShareGPT's speaker names onto chat roles.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

REASONS = (
    "bad_json",
    "missing_field",
    "missing_image",
    "image_outside_root",
    "unreadable_image",
    "image_aspect",
    "empty_conversation",
    "malformed_conversation",
    "image_placeholder_mismatch",
    "duplicate_id",
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
    more_images: list[dict] = field(default_factory=list)
    """Images 2..n of a multi-image sample, in placeholder order: {"path": file} or {"data": bytes, "ext": ext}.
    The first image stays in `image` / `image_path`, so a one-image record looks as it always did."""

    def load_image(self) -> tuple[bytes, str] | None:
        """(bytes, extension) of the record's first image, or None for a text-only record."""
        if self.image is not None:
            return self.image, self.image_ext or "png"
        if self.image_path is None:
            return None
        return _read_file(self.image_path)

    def load_images(self) -> list[tuple[bytes, str]]:
        """(bytes, extension) of every image, in the order of the `<image>` placeholders."""
        first = self.load_image()
        more = [(m["data"], m.get("ext") or "png") if "data" in m else _read_file(m["path"]) for m in self.more_images]
        return ([first] if first is not None else []) + more

    @property
    def n_images(self) -> int:
        return int(self.image is not None or self.image_path is not None) + len(self.more_images)


def _read_file(path: str) -> tuple[bytes, str]:
    ext = Path(path).suffix.lower().lstrip(".") or "png"
    return Path(path).read_bytes(), "jpg" if ext == "jpeg" else ext


@dataclass
class Reject:
    id: str | None
    source: str  # file (and line / row / key) the record came from
    reason: str  # one of REASONS
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def normalise_conversation(turns) -> tuple[list[dict], tuple[str, str] | None]:
    """Chat turns in any of the shapes users have → rbvl turns, or (reason, detail) for what is wrong.

    Turns are LLaVA / ShareGPT `from/value` (human/gpt or user/assistant) or OpenAI / TRL `role/content`; content is a
    string or a list of parts (`{"type": "image"}`, `{"type": "text", "text": ...}`), each image part becoming the
    `<image>` placeholder where it stands, so one contract (docs/formats.md, "Record") serves every source.
    """
    if not isinstance(turns, list):
        return [], ("malformed_conversation", "the conversation is not a list of turns")
    if not turns:
        return [], ("empty_conversation", "no turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            return [], ("malformed_conversation", "a turn is not an object")
        role = turn.get("from", turn.get("role"))
        content = _content_text(turn.get("value", turn.get("content")))
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
    if all(not t["content"].strip() for t in out if t["role"] == "assistant"):
        return [], ("empty_conversation", "every assistant turn is empty: no answer to learn")
    return out, None


def _content_text(content):
    """A turn's content as one string: content parts joined by newlines, an image part as `<image>`; a string as it
    is; anything else unchanged (the caller names its type)."""
    if isinstance(content, bool):  # true / false, as JSON writes them (a yes/no answer)
        return "true" if content else "false"
    if isinstance(content, (int, float)):  # a number answer: its text, as JSON has it
        return str(content)
    if not isinstance(content, list):
        return content
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif isinstance(part, str):  # a list of plain strings: lines of the turn
            pieces.append(part)
        else:
            return part  # not a part we know: malformed
    return "\n".join(pieces)


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

    def summary(self, split: str) -> list[tuple[str, int, Reject]]:
        """(reason, count, first reject with that reason) for `split`, most frequent first: what a person acts on."""
        counts = Counter(r.reason for s, r in self.items if s == split)
        first: dict[str, Reject] = {}
        for s, r in self.items:
            if s == split:
                first.setdefault(r.reason, r)
        return [(reason, n, first[reason]) for reason, n in counts.most_common()]

    def ids(self, split: str) -> list:
        return [r.id for s, r in self.items if s == split]

    def write(self, path: str | Path) -> int:
        """rejects.jsonl, train then eval in the order found; returns how many lines were written."""
        with open(path, "w", encoding="utf-8") as f:
            for split, r in self.items:
                f.write(json.dumps({"split": split, **r.to_json()}, ensure_ascii=False) + "\n")
        return len(self.items)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(record_id: str) -> str:
    """A WebDataset-safe key for `record_id` (webdataset splits file names at the first dot).

    Unsafe characters become `_`; when that changed the id, a short hash of the original keeps keys unique.
    """
    key = _UNSAFE.sub("_", record_id)
    if key != record_id or not key:
        key = f"{key}_{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return key
