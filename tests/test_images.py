"""The image contract (rbvl/records/images.py): every format Pillow writes survives regroup and a training step."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from rbvl.records.images import EIGHT_BIT_MODES, ImageRejected, for_shard, open_rgb

SHARD_EXTS = {"png", "jpg", "webp"}


def writable_formats() -> dict[str, bytes]:
    """format → bytes of a small image Pillow writes in it here (formats it cannot write here are left out)."""
    Image.init()
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
    out = {}
    for fmt in sorted(Image.SAVE):
        for mode in ("RGB", "L", "1"):
            buf = io.BytesIO()
            try:
                base.convert(mode).save(buf, format=fmt)
            except Exception:  # noqa: BLE001 - this format cannot write this mode (or at all) here
                continue
            if buf.tell():
                out[fmt] = buf.getvalue()
                break
    return out


FORMATS = writable_formats()


def openable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_writable_format_becomes_a_shard_image_or_a_reason(fmt):
    data = FORMATS[fmt]
    if not openable(data):  # Pillow writes it but cannot read it back (PDF, PALM): a reject with a reason
        with pytest.raises(ImageRejected, match="cannot decode"):
            for_shard(data, fmt.lower())
        return
    img = for_shard(data, fmt.lower())
    assert img.ext in SHARD_EXTS
    with Image.open(io.BytesIO(img.data)) as im:
        assert {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[img.ext] == im.format
        assert getattr(im, "n_frames", 1) == 1
    ref = Image.open(io.BytesIO(data))
    assert open_rgb(img.data).size == ref.size
    if ref.format in ("PNG", "JPEG", "WEBP"):  # (a one-frame MPO opens as a JPEG)
        assert img.data == data and img.note is None, "shard formats are kept byte for byte"
    else:
        assert "re-encoded as PNG" in img.note
        # lossless: the PNG holds the pixels Pillow decoded from the original (float formats: rounded, not truncated)
        diff = np.abs(np.asarray(open_rgb(img.data)).astype(int) - np.asarray(ref.convert("RGB")).astype(int))
        assert diff.max() <= (0 if ref.mode in EIGHT_BIT_MODES else 1)


def test_16_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 128 * 8).reshape(8, 128).astype(np.uint16)  # (8, 128): within the 50:1 aspect bound
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    img = for_shard(buf.getvalue(), "png")
    assert img.ext == "png" and "16-bit" in img.note
    got = np.asarray(Image.open(io.BytesIO(img.data)))
    expected = np.rint(ramp / 257.0)  # the definition: 65535 → 255, linear
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert len(np.unique(got)) > 200, "not saturated to 0/255"
    assert np.asarray(open_rgb(buf.getvalue()))[..., 0].max() == 255  # the stream reads deep images the same way


def test_animated_keeps_the_first_frame_and_says_so():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "PNG", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        img = for_shard(buf.getvalue(), fmt.lower())
        assert "3 frames: the first kept" in img.note, fmt
        px = np.asarray(open_rgb(img.data))[8, 8]
        assert px[0] > 200 and px[1] < 60 and px[2] < 60, (fmt, px)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "cannot decode"),
        (b"not an image at all", "cannot decode"),
        (None, "cannot decode"),  # a PNG cut in half, filled below
    ],
)
def test_broken_files_are_rejected_with_a_reason(data, why):
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ImageRejected, match=why) as e:
        for_shard(data, "png")
    assert "BytesIO" not in str(e.value), "Pillow's name for the buffer says nothing to a user"


def test_content_decides_the_extension():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert for_shard(buf.getvalue(), "jpg").ext == "png"


@pytest.mark.slow
def test_every_format_round_trips_through_regroup_and_a_training_step(tmp_path):
    """Images of every format → rbvl-regroup → shards → the stream's decode → collate → tiny-model forward."""
    import torch
    import webdataset as wds

    from data_tools.regroup import main
    from rbvl.config import ModelConfig
    from rbvl.data import decode
    from rbvl.data.collate import Encoder
    from rbvl.model import load_model

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    extra = {}
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(buf, format="PNG")
    extra["PNG16"] = (buf.getvalue(), "png")
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    extra["GIFANIM"] = (buf.getvalue(), "gif")
    files = {fmt: (data, fmt.lower()) for fmt, data in FORMATS.items()} | extra
    for i, (fmt, (data, ext)) in enumerate(sorted(files.items())):
        name = f"img{i}.{ext}"
        (images / name).write_bytes(data)
        rows.append(
            {
                "id": f"r{i}",
                "image": name,
                "fmt": fmt,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is this?"},
                    {"from": "gpt", "value": f"a {fmt} image"},
                ],
            }
        )
    for i in range(6):  # text-only rows, so k=2 always has enough records
        rows.append(
            {"id": f"t{i}", "conversations": [{"from": "human", "value": f"{i}+1?"}, {"from": "gpt", "value": "x"}]}
        )
    (tmp_path / "train.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "train.json"), "--image-root", str(images), "--out", str(out), "--k", "2"]
    argv += ["--embedder", "open_clip:rbvl-tiny"]
    assert main([*argv, "--no-progress", "--no-plots", "--num-workers", "0"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]["train"]
    assert counts["in"] == counts["written"] + counts["rejected"] == len(rows)
    rejected = {json.loads(line)["id"] for line in (out / "rejects.jsonl").read_text().splitlines()}
    unreadable = {f"r{i}" for i, (fmt, (data, _)) in enumerate(sorted(files.items())) if not openable(data)}
    assert rejected == unreadable, "exactly the files Pillow cannot open are rejected"
    notes = [json.loads(line) for line in (out / "image_notes.jsonl").read_text().splitlines()]
    assert manifest["image_notes"]["count"] == len(notes) > 0
    said = f"{len(notes)} images changed to fit the shards (re-encoded, e.g. 16-bit or BMP; rescaled; cut to one frame)"
    assert said in (out / "summary.md").read_text(), "summary.md says so, as the terminal does"

    samples = []
    for tar in sorted(out.glob("train/cluster_*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            exts = {k for k in s if k not in ("__key__", "__url__", "__local_path__", "json")}
            assert exts <= SHARD_EXTS, exts
            samples.append(decode(s))
    with_image = [s for s in samples if s["image"] is not None]
    assert len(with_image) == len(files) - len(unreadable)
    model, processor = load_model(ModelConfig(name="tiny-llava"), seed=0)
    collate = Encoder(processor, max_length=256)
    result = collate(with_image, [0] * len(with_image))
    batch = result[0] if isinstance(result, tuple) else result
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    assert inputs["pixel_values"].shape[0] == len(with_image)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
