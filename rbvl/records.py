"""Records: one training example whatever its source, and the rejects that explain what could not be used.

The readers that turn LLaVA JSON, WebDataset shards and text-only JSONL/Parquet into records live here too
(see `docs/formats.md` for the field-by-field contract).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field

IMAGE_TOKEN = "<image>"

# LLaVA's speaker names onto chat roles.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    id: str
    conversation: list[dict]  # [{"role": "user" | "assistant" | "system", "content": str}, ...]
    image: bytes | None = None  # the image file's bytes, untouched
    image_ext: str | None = None  # "png", "jpg", ...
    label: str | None = None  # the source's own domain label
    text: str = ""  # what gets embedded
    meta: dict = field(default_factory=dict)


@dataclass
class Reject:
    id: str | None
    source: str  # file (and line / row / key) the record came from
    reason: str  # a short fixed string, see docs/formats.md
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(record_id: str) -> str:
    """A WebDataset-safe key for `record_id` (webdataset splits file names at the first dot).

    Unsafe characters become `_`; when that changed the id, a short hash of the original keeps keys unique.
    """
    key = _UNSAFE.sub("_", record_id)
    if key != record_id or not key:
        key = f"{key}_{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return key
