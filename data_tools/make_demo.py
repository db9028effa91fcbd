"""Make rbvl's offline demo data: a small multimodal instruction set in LLaVA JSON, from real handwritten digits.

    python -m data_tools.make_demo demo/data            # demo/data/{train,eval}.json, images/, stats.json

The images are scikit-learn's 1,797 real 8×8 digit scans (`load_digits`), written as 32×32 PNGs. Five instruction
types, each with a few phrasings, form the original `domain` labels: `digit_name`, `parity`, `arithmetic` (a one-line
reasoning trace), `text_math` (text only) and `compare`; some digit_name records have a second turn. The train
mixture is imbalanced and the eval mixture balanced, so how the domains are mixed matters. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from pathlib import Path

TRAIN_MIX = {"digit_name": 0.40, "text_math": 0.25, "parity": 0.15, "arithmetic": 0.12, "compare": 0.08}
EVAL_MIX = dict.fromkeys(TRAIN_MIX, 0.2)

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
    out: str | Path, seed: int = 0, n_train: int = 2000, n_eval: int = 250, eval_fraction: float = 0.1
) -> dict:
    """Write the demo dataset into `out`; returns the per-split, per-domain counts (also in stats.json)."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    rng = random.Random(seed)
    order = list(range(len(digits.target)))
    rng.shuffle(order)
    n_held = int(len(order) * eval_fraction)
    pools = {"eval": sorted(order[:n_held]), "train": sorted(order[n_held:])}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(digits.target)):
        (out / "images" / f"digit_{i:04d}.png").write_bytes(png_bytes(digits.images[i]))

    stats = {}
    for split, n, mix in (("train", n_train, TRAIN_MIX), ("eval", n_eval, EVAL_MIX)):
        domains = [d for d, share in mix.items() for _ in range(round(n * share))]
        rng.shuffle(domains)
        records = [
            make_record(d, f"{split}-{d}-{j:06d}", pools[split], digits.target, rng) for j, d in enumerate(domains)
        ]
        (out / f"{split}.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        stats[split] = {d: domains.count(d) for d in mix}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats


def png_bytes(scan) -> bytes:
    """An 8×8 scan (0..16, ink high) → 32×32 RGB PNG, dark ink on white, no metadata chunks."""
    import numpy as np
    from PIL import Image

    gray = (255 - scan * (255 / 16)).round().astype(np.uint8)
    image = Image.fromarray(gray).resize((32, 32), Image.NEAREST).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_record(domain: str, rid: str, pool: list[int], targets, rng: random.Random) -> dict:
    phrase = rng.choice(PHRASES[domain])
    if domain == "text_math":
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+*")
        result = a + b if op == "+" else a * b
        return {
            "id": rid,
            "domain": domain,
            "conversations": _turns(phrase.format(a=a, b=b, op=op), f"{a} {op} {b} = {result}."),
        }
    index = rng.choice(pool)
    digit = int(targets[index])
    if domain == "digit_name":
        turns = _turns(phrase, str(digit), image=True)
        if rng.random() < 0.1:
            turns += _turns("And is it odd or even?", "odd" if digit % 2 else "even")
    elif domain == "parity":
        turns = _turns(phrase, "odd" if digit % 2 else "even", image=True)
    elif domain == "arithmetic":
        k, op = rng.randint(1, 5), rng.choice(["plus", "times"])
        result = digit + k if op == "plus" else digit * k
        sign = "+" if op == "plus" else "*"
        turns = _turns(
            phrase.format(op=op, k=k), f"The digit is {digit}, and {digit} {sign} {k} = {result}.", image=True
        )
    else:  # compare
        k = rng.randint(1, 8)
        turns = _turns(phrase.format(k=k), "yes" if digit > k else "no", image=True)
    return {"id": rid, "domain": domain, "image": f"images/digit_{index:04d}.png", "conversations": turns}


def _turns(question: str, answer: str, image: bool = False) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000, help="train records")
    parser.add_argument("--n-eval", type=int, default=250, help="eval records")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of the scans held out for eval")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(f"make_demo: error: {out} is not empty (pass --overwrite to replace it)", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    stats = make_demo(out, args.seed, args.n_train, args.n_eval, args.eval_fraction)
    for split, counts in stats.items():
        print(f"{split}: {sum(counts.values())} records  " + "  ".join(f"{d}={n}" for d, n in counts.items()))
    print(f"written to {out}/ (train.json, eval.json, images/, stats.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
