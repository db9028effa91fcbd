"""Record: one training example whatever its source; Reject: one that could not be used, and why; `Rejects`: the one
collector of them from every stage (read, embed, write), written once as rejects.jsonl (docs/formats.md, "Record").

    turns, problem = normalise_conversation(row["conversations"])   # LLaVA `from/value` → `role/content`, or why not
    record = Record(row["id"], turns, label=row.get("domain"))
    rejects.add("train", record, "unreadable_image", "cannot decode the .png image")
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"

# LLaVA's speaker names onto chat roles.
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


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(record_id: str) -> str:
    """A WebDataset-safe key for `record_id` (webdataset splits file names at the first dot).

    Unsafe characters become `_`; when that changed the id, a short hash of the original keeps keys unique.
    """
    key = _UNSAFE.sub("_", record_id)
    if key != record_id or not key:
        key = f"{key}_{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return key
