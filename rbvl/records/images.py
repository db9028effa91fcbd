"""The image contract between Regroup and the stream: what a shard may hold, and how anything else gets there.

    from rbvl.records.images import for_shard, open_rgb
    img = for_shard(data, "gif")     # ShardImage(data=PNG bytes, ext="png", note="animated GIF: frame 1 of 3 kept")
    pil = open_rgb(img.data)         # what the stream hands the processor: 8-bit RGB

A shard image is PNG, JPEG or WebP, single frame, 8 bits per channel (docs/formats.md, "Images"):

- PNG / JPEG / WebP files that already are that are kept byte for byte (the extension follows the content, not the
  file name: a PNG named `.jpg` is stored as `.png`).
- Any other format Pillow opens (GIF, BMP, TIFF, ICO, PPM, TGA, JPEG 2000 ...) is re-encoded to PNG (lossless).
- 16-bit and 32-bit integer images are scaled to 8 bits (65535 → 255), never clipped; float images in [0, 1] are
  scaled by 255, in [0, 255] rounded, other ranges min-max. Alpha and palettes are kept (PNG holds them).
- Animated or multi-frame images (GIF, APNG, WebP, TIFF pages, MPO) keep their first frame.
- Every change is returned as a `note` (regroup lists them in image_notes.jsonl); a file Pillow cannot open or fully
  decode is rejected with `ImageRejected` (reason `unreadable_image`).
- An image whose sides differ by more than MAX_ASPECT (50:1) is rejected (reason `image_aspect`) from its header,
  before any pixel is decoded or resized: processors resize the short side to the model's size, so a 1 × 100000 px
  sliver would become a 32 × 3.2M (or 336 × 34M) array. `check_aspect` is the one test, used by Regroup (embed, write)
  and by collate (which drops such a sample).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

SHARD_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # Pillow format → shard extension
SHARD_EXTS = ("png", "jpg", "jpeg", "webp")  # what the stream reads (jpeg: shards of other tools)
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
NOTES = "image_notes.jsonl"
MAX_ASPECT = 50  # longest side / shortest side; beyond it an image is rejected (docs/formats.md, "Images")


class ImageRejected(ValueError):
    """An image that cannot become a shard image; the message says why, `reason` is its reject reason."""

    def __init__(self, message: str, reason: str = "unreadable_image"):
        super().__init__(message)
        self.reason = reason


def check_aspect(size: tuple[int, int]) -> None:
    """Raise ImageRejected (reason `image_aspect`) for a (width, height) beyond MAX_ASPECT:1 or with a zero side."""
    w, h = size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageRejected(
            f"image of {w} x {h} px: aspect ratio beyond {MAX_ASPECT}:1 (resizing its short side would blow it up)",
            reason="image_aspect",
        )


def tagged(e: ImageRejected) -> str:
    """`e` as one string that keeps its reason ("image_aspect: ..."), for caches that store plain messages."""
    return f"{e.reason}: {e}"


def untagged(message: str, default: str = "unreadable_image") -> tuple[str, str]:
    """(reason, detail) of a message made by `tagged`; any other message is (`default`, message)."""
    reason, sep, detail = message.partition(": ")
    return (reason, detail) if sep and reason in ("image_aspect", "unreadable_image") else (default, message)


@dataclass
class ShardImage:
    data: bytes
    ext: str  # "png" | "jpg" | "webp"
    note: str | None = None  # what was changed, when something was


def for_shard(data: bytes, ext: str | None = None) -> ShardImage:
    """`data` (an image file's bytes; `ext` its file extension, a hint only) as a shard image, or ImageRejected."""
    from PIL import Image

    name = (ext or "?").lower().lstrip(".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reject with its reason
        raise ImageRejected(f"cannot decode the .{name} image: {type(e).__name__}: {short_error(e)}") from None
    check_aspect(im.size)  # from the header: before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()  # decode everything now: a truncated file fails here, not in a DataLoader worker
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reject with its reason
        raise ImageRejected(f"cannot decode the .{name} image: {type(e).__name__}: {short_error(e)}") from None
    fmt = im.format or name.upper()
    frames = getattr(im, "n_frames", 1)
    if fmt in SHARD_FORMATS and frames == 1 and im.mode in EIGHT_BIT_MODES:
        return ShardImage(data, SHARD_FORMATS[fmt])
    notes = []
    if frames > 1:
        im.seek(0)
        notes.append(f"{frames} frames: the first kept")
    converted, how = to_8bit(im)
    if how:
        notes.append(how)
    if fmt not in SHARD_FORMATS or notes:
        notes.append(f"{fmt} re-encoded as PNG" if fmt != "PNG" else "re-encoded")
    buf = io.BytesIO()
    try:
        converted.save(buf, format="PNG")
    except Exception as e:  # noqa: BLE001 - a mode PNG cannot hold
        raise ImageRejected(f"cannot re-encode the {fmt} image ({im.mode}) as PNG: {short_error(e)}") from None
    return ShardImage(buf.getvalue(), "png", "; ".join(notes))


def to_8bit(im):
    """(an image PNG can hold at 8 bits per channel, a note or None): deep integer and float images scaled."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode in EIGHT_BIT_MODES:
        if mode in ("CMYK", "YCbCr", "RGBX", "RGBa", "La"):  # not PNG modes
            return im.convert("RGBA" if mode.endswith("a") else "RGB"), f"{mode} converted to RGB"
        return im, None
    if mode.startswith("I;16") or mode == "I":
        x = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or x.max(initial=0) > 255 else 255.0
        if x.max(initial=0) > 65535 or x.min(initial=0) < 0:  # 32-bit data: min-max
            lo, hi = x.min(), x.max()
            x, how = (x - lo) / max(hi - lo, 1e-12) * 255.0, f"{mode} min-max scaled to 8 bits"
        else:
            x, how = x * (255.0 / top), (f"16-bit {mode} scaled to 8 bits" if top > 255 else None)
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L"), how
    if mode == "F":
        x = np.asarray(im, dtype=np.float64)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(x.min(initial=0)), float(x.max(initial=0))
        if lo >= 0 and hi <= 1:
            x, how = x * 255.0, "float image in [0, 1] scaled to 8 bits"
        elif lo >= 0 and hi <= 255:
            how = "float image in [0, 255] rounded to 8 bits"
        else:
            x, how = (x - lo) / max(hi - lo, 1e-12) * 255.0, "float image min-max scaled to 8 bits"
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L"), how
    try:  # e.g. 16-bit RGB TIFF, BGR;15, LAB, HSV
        return im.convert("RGBA" if "A" in mode else "RGB"), f"{mode} converted to RGB"
    except Exception as e:  # noqa: BLE001
        raise ImageRejected(f"cannot convert a {mode} image to RGB: {short_error(e)}") from None


def open_rgb(data: bytes):
    """A shard image's bytes → 8-bit RGB PIL image (what the processor gets); deep images scaled, not clipped."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if im.mode not in EIGHT_BIT_MODES:
        im, _ = to_8bit(im)
    return im.convert("RGB")


def write_notes(out: Path, notes: list[dict]) -> int:
    """OUT/image_notes.jsonl: one line per image regroup changed ({"split", "id", "note"}); none → no file."""
    if notes:
        with (Path(out) / NOTES).open("w") as f:
            for n in notes:
                f.write(json.dumps(n, ensure_ascii=False) + "\n")
    return len(notes)


def short_error(e: Exception) -> str:
    """The error's text on one line, without the in-memory buffer Pillow names where a file name would go."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
    return " ".join(text.split())[:200]
