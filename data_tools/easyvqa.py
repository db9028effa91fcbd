"""easy-VQA as LLaVA-format instruction data, original domain = question type.

    pip install -e '.[experiments]'                     # the easy-vqa package ships the images and questions (MIT)
    python -m data_tools.easyvqa experiments/data/easyvqa
    python -m data_tools.easyvqa OUT --n-train 4000 --n-eval 600 --seed 1 --overwrite

Writes OUT/train.json and OUT/eval.json (LLaVA rows: id, image, domain, conversations), the images they use under
OUT/images/{train,test}/ (64×64 PNGs, bytes untouched) and OUT/stats.json (written last: counts per split and
domain). Train rows come from the package's train split, eval rows from its test split, so no eval image is seen in
training. The train sample keeps the package's own (imbalanced) mix of question types; the eval sample is balanced
across types, so how the domains are mixed matters. Same seed and arguments, same bytes.

Question types (the `domain` label), from the question's form and answer:
`shape` ("what is the blue shape?" → circle), `color` ("what color is the shape?" → blue), `shape_presence`
("is there a triangle in the image?" → yes/no), `color_presence` ("is there a red shape?" → yes/no) and
`negated` ("does the image not contain a gray shape?" → yes/no).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
TYPES = ("shape", "color", "shape_presence", "color_presence", "negated")


def question_type(question: str, answer: str) -> str:
    """The original domain of one easy-VQA question (see the module docstring)."""
    q = question.lower()
    if answer in SHAPES:
        return "shape"
    if answer not in ("yes", "no"):
        return "color"
    if " not " in f" {q} " or q.startswith("is no "):
        return "negated"
    return "shape_presence" if any(s in q for s in SHAPES) else "color_presence"


def convert(out: str | Path, n_train: int = 3000, n_eval: int = 500, seed: int = 0, overwrite: bool = False) -> dict:
    """Write the converted sample into `out`; returns the stats (also OUT/stats.json).

    Raises:
        FileExistsError: `out` is not empty and `overwrite` is off.
        ValueError: a count is below 1 or above what the package holds.
    """
    import easy_vqa

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for name in ("train.json", "eval.json", "stats.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "images", ignore_errors=True)
    rng = random.Random(seed)
    splits = {
        "train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), n_train, False),
        "eval": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), n_eval, True),
    }
    stats = {"source": "easy-vqa 1.0 (MIT)", "seed": seed, "splits": {}}
    for split, ((questions, answers, image_ids), paths, n, balanced) in splits.items():
        if not 1 <= n <= len(questions):
            raise ValueError(f"--n-{split} must be between 1 and {len(questions)}, got {n}")
        rows = [(q, a, i, question_type(q, a)) for q, a, i in zip(questions, answers, image_ids)]
        picked = _balanced(rows, n, rng) if balanced else rng.sample(rows, n)
        folder = "train" if split == "train" else "test"
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
        records = []
        for j, (q, a, image_id, kind) in enumerate(picked):
            rel = f"images/{folder}/{image_id}.png"
            if not (out / rel).exists():
                shutil.copyfile(paths[image_id], out / rel)
            records.append(
                {
                    "id": f"{split}-{j:06d}",
                    "image": rel,
                    "domain": kind,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{q[0].upper()}{q[1:]}"},
                        {"from": "gpt", "value": a},
                    ],
                }
            )
        (out / f"{split}.json").write_text(json.dumps(records, indent=1))
        stats["splits"][split] = dict(sorted(Counter(r["domain"] for r in records).items()))
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _balanced(rows: list, n: int, rng: random.Random) -> list:
    """n rows, as equal a share of each question type as the data allows."""
    by_type = {t: [r for r in rows if r[3] == t] for t in TYPES}
    for pool in by_type.values():
        rng.shuffle(pool)
    picked, i = [], 0
    while len(picked) < n:
        for t in TYPES:
            if i < len(by_type[t]) and len(picked) < n:
                picked.append(by_type[t][i])
        i += 1
    rng.shuffle(picked)
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-train", type=int, default=3000, help="train questions (the package's natural mix)")
    parser.add_argument("--n-eval", type=int, default=500, help="eval questions (balanced across question types)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        import easy_vqa  # noqa: F401
    except ImportError:
        print("easyvqa: the easy-vqa package is missing: pip install -e '.[experiments]'", file=sys.stderr)
        return 2
    try:
        stats = convert(args.out, args.n_train, args.n_eval, args.seed, args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"easyvqa: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
