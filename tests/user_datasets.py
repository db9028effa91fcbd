"""The dataset shapes users bring, built small in a folder from real photos (scikit-image, scikit-learn), each with
what rbvl should make of every record: the normalised conversation and the images, so a test can compare a written
shard sample with its input.

    case = BUILDERS["trl_vlm_parquet"](tmp_path)   # Case(args for rbvl-regroup, expected {id: (turns, images)})

Used by tests/test_formats.py; docs/formats.md shows one record of each shape.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

N = 30  # records per case: the issue measured 28-34
QUESTIONS = [
    ("What is in this photo?", "A photo, {k}."),
    ("Describe the colours.", "Mostly {k}."),
    ("How many objects are there?", "{n}"),
]


@dataclass
class Case:
    """rbvl-regroup arguments for one input shape, and per record id what its shard sample must hold."""

    args: list[str]
    expected: dict[str, tuple[list[dict], list[bytes]]] = field(default_factory=dict)  # id → (turns, PNG bytes)


@cache
def photos() -> tuple[bytes, ...]:
    """Small PNG crops of the real photos that ship with scikit-image and scikit-learn (10 of them)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    arrays = [getattr(sd, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    arrays += list(load_sample_images().images)
    out = []
    for k, a in enumerate(arrays * 2):
        h, w = a.shape[:2]
        crop = a[(k % 2) * h // 4 :, (k % 3) * w // 6 :][: h // 2, : w // 2]  # a different crop each time round
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop[..., :3])).resize((32, 32)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return tuple(out)


def photo(i: int) -> bytes:
    return photos()[i % len(photos())]


def qa(i: int) -> tuple[str, str]:
    q, a = QUESTIONS[i % len(QUESTIONS)]
    return q, a.format(k=f"number {i}", n=i % 7)


def expected_turns(question: str, answer: str, n_images: int) -> list[dict]:
    return [
        {"role": "user", "content": "<image>\n" * n_images + question},
        {"role": "assistant", "content": answer},
    ]


def _write_images(folder: Path, prefix: str, i: int, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for j in range(n):
        name = f"{prefix}{i}_{j}.png"
        (folder / name).write_bytes(photo(i + 3 * j))
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face `datasets` output
# ---------------------------------------------------------------------------------------------------------------------


def _vqa_dataset(n: int = N):
    """A `datasets.Dataset` with an `Image` column, a question and an answer (VQA-style), and what each becomes."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    rows = {"id": [], "image": [], "question": [], "answer": []}
    expected = {}
    for i in range(n):
        q, a = qa(i)
        rows["id"].append(f"vqa-{i}")
        rows["image"].append({"bytes": photo(i), "path": f"photo{i}.png"})
        rows["question"].append(q)
        rows["answer"].append(a)
        expected[f"vqa-{i}"] = (expected_turns(q, a, 1), [photo(i)])
    return Dataset.from_dict(rows).cast_column("image", ImageFeature()), expected


def hf_parquet_image(root: Path) -> Case:
    ds, expected = _vqa_dataset()
    ds.to_parquet(str(root / "train.parquet"))
    return Case(["--input", str(root / "train.parquet")], expected)


def hf_save_to_disk(root: Path) -> Case:
    ds, expected = _vqa_dataset()
    ds.save_to_disk(str(root / "train"))
    return Case(["--input", str(root / "train")], expected)


def hf_arrow_file(root: Path) -> Case:
    ds, expected = _vqa_dataset()
    ds.save_to_disk(str(root / "saved"))
    return Case(["--input", str(next((root / "saved").glob("*.arrow")))], expected)


def _trl_rows(n: int = N, multi_every: int = 0):
    """TRL's VLM format: `messages` with content parts and an `images` list; every `multi_every`-th row has two."""
    rows, expected = [], {}
    for i in range(n):
        q, a = qa(i)
        n_images = 2 if multi_every and i % multi_every == 0 else 1
        user = [{"type": "image"}] * n_images + [{"type": "text", "text": q}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        images = [photo(i + 3 * j) for j in range(n_images)]
        rows.append({"messages": messages, "images": images})
        expected[f"train-{i}"] = (expected_turns(q, a, n_images), images)
    return rows, expected


def trl_vlm_parquet(root: Path) -> Case:
    from datasets import Dataset, List
    from datasets import Image as ImageFeature

    rows, expected = _trl_rows(multi_every=5)
    columns = {"messages": [r["messages"] for r in rows], "images": [[{"bytes": b} for b in r["images"]] for r in rows]}
    Dataset.from_dict(columns).cast_column("images", List(ImageFeature())).to_parquet(str(root / "train.parquet"))
    return Case(["--input", str(root / "train.parquet")], expected)


def trl_vlm_jsonl(root: Path) -> Case:
    rows, expected = _trl_rows()
    lines = []
    for i, row in enumerate(rows):
        names = _write_images(root / "images", "t", i, len(row["images"]))
        lines.append(json.dumps({"messages": row["messages"], "images": names}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return Case(["--input", str(root / "train.jsonl"), "--image-root", str(root / "images")], expected)


def messages_jsonl_text(root: Path) -> Case:
    """Chat `messages` with string content, text only (as TRL and OpenAI write it), a system turn in some."""
    lines, expected = [], {}
    for i in range(N):
        q, a = qa(i)
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": "Answer briefly."})
        lines.append(json.dumps({"id": f"m{i}", "messages": turns}))
        expected[f"m{i}"] = (turns, [])
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return Case(["--input", str(root / "train.jsonl")], expected)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA and ShareGPT
# ---------------------------------------------------------------------------------------------------------------------


def _llava(root: Path, n_images_of, speakers=("human", "gpt"), as_list: bool = True) -> Case:
    rows, expected = [], {}
    for i in range(N):
        q, a = qa(i)
        n = n_images_of(i)
        names = _write_images(root / "images", "l", i, n)
        row = {"id": f"l{i}", "conversations": [
            {"from": speakers[0], "value": "<image>\n" * n + q}, {"from": speakers[1], "value": a}]}  # fmt: skip
        if n:
            row["image"] = names if as_list or n > 1 else names[0]
        rows.append(row)
        expected[f"l{i}"] = (expected_turns(q, a, n), [(root / "images" / x).read_bytes() for x in names])
    (root / "train.json").write_text(json.dumps(rows))
    return Case(["--input", str(root / "train.json"), "--image-root", str(root / "images")], expected)


def llava_image_list(root: Path) -> Case:
    """LLaVA JSON whose `image` is a list of one path."""
    return _llava(root, lambda i: 1 if i % 3 else 0)


def llava_multi_image(root: Path) -> Case:
    """LLaVA JSON with multi-image records: `image` a list of two paths and two `<image>` placeholders."""
    return _llava(root, lambda i: 2 if i % 2 else 1)


def sharegpt_user_assistant(root: Path) -> Case:
    """ShareGPT `conversations` whose `from` says user / assistant, `image` a string."""
    return _llava(root, lambda i: 1 if i % 2 else 0, speakers=("user", "assistant"), as_list=False)


def alpaca_jsonl(root: Path) -> Case:
    lines, expected = [], {}
    for i in range(N):
        q, a = qa(i)
        extra = f"Context {i}." if i % 2 else ""
        lines.append(json.dumps({"instruction": q, "input": extra, "output": a}))
        prompt = f"{q}\n\n{extra}" if extra else q
        expected[f"train-{i}"] = ([{"role": "user", "content": prompt}, {"role": "assistant", "content": a}], [])
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return Case(["--input", str(root / "train.jsonl")], expected)


BUILDERS = {
    f.__name__: f
    for f in (
        hf_parquet_image,
        hf_save_to_disk,
        hf_arrow_file,
        trl_vlm_parquet,
        trl_vlm_jsonl,
        messages_jsonl_text,
        llava_image_list,
        llava_multi_image,
        sharegpt_user_assistant,
        alpaca_jsonl,
    )
}
