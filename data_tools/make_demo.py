"""Make rbvl's offline demo data: a small multimodal instruction set in LLaVA JSON, from real handwritten digits.

    python -m data_tools.make_demo demo/data            # demo/data/{train,eval}.json, images/, stats.json
    python -m data_tools.make_demo demo/data --seed 1 --n-train 4000 --n-eval 500 --overwrite

The images are scikit-learn's 1,797 real 8×8 digit scans (`load_digits`), written as 32×32 RGB PNGs (dark ink on
white) to images/digit_XXXX.png. A seeded permutation holds out a share of the scans for eval, so no eval image is
seen in training, and the records deal the images out in shuffled passes, so each is used as rarely as possible.

Five instruction types, each with a few phrasings, form the original `domain` labels: `digit_name` ("7"), `parity`
("odd"), `arithmetic` (a one-line reasoning trace), `text_math` (text only, no image) and `compare` ("yes"/"no");
a tenth of the digit_name records have a second turn. The train mixture is imbalanced (TRAIN_MIX) and the eval
mixture balanced, so how the domains are mixed matters. stats.json, written last, counts the records per split and
domain. Same seed and arguments, same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TRAIN_MIX = {"digit_name": 0.40, "text_math": 0.25, "parity": 0.15, "arithmetic": 0.12, "compare": 0.08}
EVAL_MIX = dict.fromkeys(TRAIN_MIX, 0.2)
MULTI_TURN_SHARE = 0.1  # of digit_name records, which get a second exchange about parity

PHRASES = {
    "digit_name": [
        "What digit is shown in this image?",
        "Which number is written here?",
        "Name the handwritten digit.",
        "What number does this scan show?",
    ],
    "parity": [
        "Is the handwritten digit odd or even?",
        "Odd or even: which is this digit?",
        "Tell me whether this number is odd or even.",
    ],
    "arithmetic": [
        "What is this digit {op} {k}?",
        "Compute the digit in the image {op} {k}.",
        "Take the number shown and apply {op} {k}. What is the result?",
    ],
    "text_math": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Solve: {a} {op} {b} = ?"],
    "compare": [
        "Is this digit greater than {k}?",
        "Is the number shown larger than {k}?",
        "Answer yes or no: is the digit above {k}?",
    ],
}


def make_demo(
    out: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 250,
    eval_fraction: float = 0.1,
    overwrite: bool = False,
) -> dict:
    """Write the demo dataset into `out` and return its stats (also written, last, to stats.json).

    Raises:
        FileExistsError: `out` exists and is not an empty folder, and `overwrite` is off.
        ValueError: a count or the eval fraction is out of range.
    """
    from sklearn.datasets import load_digits

    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be at least 1, got {n_train} and {n_eval}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    out = Path(out)
    _prepare(out, overwrite)
    digits = load_digits()
    rng = random.Random(seed)
    pools = split_images(len(digits.target), eval_fraction, rng)
    (out / "images").mkdir(parents=True)
    for i, scan in enumerate(digits.images):
        (out / "images" / f"digit_{i:04d}.png").write_bytes(png_bytes(scan))

    records = {}
    for split, n, mix in (("train", n_train, TRAIN_MIX), ("eval", n_eval, EVAL_MIX)):
        domains = [d for d, count in apportion(n, mix).items() for _ in range(count)]
        rng.shuffle(domains)
        images = deal(pools[split], rng)
        rows = [make_record(d, f"{split}-{d}-{j:06d}", images, digits.target, rng) for j, d in enumerate(domains)]
        _write_json(out / f"{split}.json", rows)
        records[split] = {d: domains.count(d) for d in mix}
    stats = {
        "seed": seed,
        "records": records,
        "images": {split: len(pool) for split, pool in pools.items()},
        "source": "sklearn.datasets.load_digits (8x8 scans, upscaled to 32x32 RGB PNG)",
    }
    _write_json(out / "stats.json", stats)
    return stats


def _prepare(out: Path, overwrite: bool) -> None:
    """Make sure `out` is an empty folder or absent; clear it first if `overwrite`."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass --overwrite to replace it)")
        if out.is_file():
            out.unlink()
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def split_images(n_images: int, eval_fraction: float, rng: random.Random) -> dict[str, list[int]]:
    """A seeded permutation of the scan indices; the first `eval_fraction` of it is held out for eval."""
    order = list(range(n_images))
    rng.shuffle(order)
    n_held = min(n_images - 1, max(1, round(n_images * eval_fraction)))  # neither split empty
    return {"train": sorted(order[n_held:]), "eval": sorted(order[:n_held])}


def apportion(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `n` records by the shares in `mix` (largest remainder), so the counts add up to exactly `n`."""
    total = sum(mix.values())
    exact = {d: n * share / total for d, share in mix.items()}
    counts = {d: int(x) for d, x in exact.items()}
    by_remainder = sorted(mix, key=lambda d: (counts[d] - exact[d], list(mix).index(d)))
    for d in by_remainder[: n - sum(counts.values())]:
        counts[d] += 1
    return counts


def deal(pool: list[int], rng: random.Random) -> Iterator[int]:
    """Image indices in shuffled passes over `pool`: no image is used twice before every image is used once."""
    while True:
        deck = list(pool)
        rng.shuffle(deck)
        yield from deck


def png_bytes(scan: np.ndarray) -> bytes:
    """An 8×8 scan (0..16, ink high) → 32×32 RGB PNG, dark ink on white, nearest neighbour, no metadata chunks."""
    from PIL import Image

    gray = (255 - scan * (255 / 16)).round().astype(np.uint8)
    image = Image.fromarray(gray).resize((32, 32), Image.NEAREST).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_record(domain: str, rid: str, images: Iterator[int], targets: np.ndarray, rng: random.Random) -> dict:
    """One LLaVA record of `domain`; image records take the next scan from `images` and answer from its label."""
    phrase = rng.choice(PHRASES[domain])
    if domain == "text_math":
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+*")
        result = a + b if op == "+" else a * b
        turns = _turns(phrase.format(a=a, b=b, op=op), f"{a} {op} {b} = {result}.")
        return {"id": rid, "domain": domain, "conversations": turns}
    index = next(images)
    digit = int(targets[index])
    parity = "odd" if digit % 2 else "even"
    if domain == "digit_name":
        turns = _turns(phrase, str(digit), image=True)
        if rng.random() < MULTI_TURN_SHARE:
            turns += _turns("And is it odd or even?", parity)
    elif domain == "parity":
        turns = _turns(phrase, parity, image=True)
    elif domain == "arithmetic":
        k, op = rng.randint(1, 5), rng.choice(["plus", "times"])
        result, sign = (digit + k, "+") if op == "plus" else (digit * k, "*")
        answer = f"The digit is {digit}, and {digit} {sign} {k} = {result}."
        turns = _turns(phrase.format(op=op, k=k), answer, image=True)
    elif domain == "compare":
        k = rng.randint(1, 8)
        turns = _turns(phrase.format(k=k), "yes" if digit > k else "no", image=True)
    else:
        raise ValueError(f"unknown domain {domain!r}")
    return {"id": rid, "domain": domain, "image": f"images/digit_{index:04d}.png", "conversations": turns}


def _turns(question: str, answer: str, image: bool = False) -> list[dict[str, str]]:
    """One human/gpt exchange; `image` puts LLaVA's `<image>` placeholder on its own line before the question."""
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="output folder (the image root: record paths are relative to it)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the eval hold-out, phrasings and operands")
    parser.add_argument("--n-train", type=int, default=2000, help="train records (default 2000)")
    parser.add_argument("--n-eval", type=int, default=250, help="eval records (default 250)")
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of the scans held out for eval (default 0.1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        stats = make_demo(args.out, args.seed, args.n_train, args.n_eval, args.eval_fraction, args.overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"make_demo: error: {err}", file=sys.stderr)
        return 2
    for split, counts in stats["records"].items():
        line = "  ".join(f"{d}={n}" for d, n in counts.items())
        print(f"{split}: {sum(counts.values())} records on {stats['images'][split]} images  {line}")
    print(f"written to {args.out}/ (train.json, eval.json, images/, stats.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
