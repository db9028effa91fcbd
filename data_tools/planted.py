"""Known-answer settings built from reasoning-gym: domains whose right mixture is known, to test whether a mixer
finds it (issue: Balance must read signal, not noise).

    python -m data_tools.planted OUT --setting planted-dev             # or planted-test, coarse, random
    python -m data_tools.planted OUT --setting planted-dev --control    # the same rows, the noise answers left right

Settings (train shares are planted; eval is what the run is scored on):
  planted-dev / planted-test
      five useful task families, the first over-represented 6× in train; a rare family that holds 1/20 of a useful
      family's train rows but as many eval rows as the others (target-relevant and scarce); and a `noise` domain
      whose train answers are permuted across its questions (unlearnable), its eval rows right and 2% of eval.
      dev and test use disjoint families: tune on dev, report test untouched.
      `--control`: the noise domain's answers stay right (what p_noise is compared with).
  coarse
      eight families labelled in pairs (`pair0` = two families ...): original domains that hide their structure,
      for Regroup to find.
  random
      the reasoning families with each row's domain drawn at random among 6 labels: a negative control in which no
      mixer should beat stratified.

Writes OUT/train.jsonl, OUT/eval.jsonl (rows: id, question, answer, domain; `rbvl-regroup --format jsonl --preset
text` reads them) and OUT/stats.json (the rows per domain, which domain is noise, the families used). Same
arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from data_tools.reasoning import generate, run_tool

SETTINGS = {
    "planted-dev": dict(
        useful=("basic_arithmetic", "chain_sum", "gcd", "count_bits", "letter_counting"),
        rare="spell_backward",
        noise="lcm",
    ),
    "planted-test": dict(
        useful=("products", "leg_counting", "base_conversion", "simple_equations", "power_function"),
        rare="word_sequence_reversal",
        noise="fraction_simplification",
    ),
    "coarse": dict(
        pairs=(
            ("basic_arithmetic", "spell_backward"),
            ("chain_sum", "letter_counting"),
            ("gcd", "caesar_cipher"),
            ("count_bits", "leg_counting"),
        ),  # fmt: skip
    ),
    "random": dict(
        families=("basic_arithmetic", "chain_sum", "gcd", "count_bits", "letter_counting", "spell_backward")
    ),
}
OVER = 6  # the first useful family's train rows, × a useful family's
RARE = 20  # a useful family's train rows, ÷ the rare family's
NOISE_EVAL_SHARE = 0.02


def build(out: str | Path, setting: str, per_task_train: int = 200, per_task_eval: int = 40, seed: int = 0,
          control: bool = False, overwrite: bool = False) -> dict:  # fmt: skip
    """Write the setting into `out`; returns its stats (also OUT/stats.json).

    Raises:
        ValueError: an unknown setting, counts below 1, or --control outside the planted settings.
        FileExistsError: `out` holds files and `overwrite` is off.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting '{setting}'; one of {', '.join(SETTINGS)}")
    if control and not setting.startswith("planted"):
        raise ValueError("--control applies to the planted settings only (it leaves the noise domain's answers right)")
    if per_task_train < RARE or per_task_eval < 1:
        raise ValueError(
            f"--per-task-train must be >= {RARE} (the rare family gets 1/{RARE} of it) and --per-task-eval >= 1"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    spec = SETTINGS[setting]
    rng = random.Random(seed)
    seen: set[str] = set()
    train, evals, stats = [], [], {"setting": setting, "control": control, "seed": seed}

    def rows(task: str, i: int, n_train: int, n_eval: int, domain: str | None = None):
        base = seed * 10_000_000 + i * 100_000
        t, e = generate(task, n_train, base, seen, "train"), generate(task, n_eval, base + 50_000, seen, "eval")
        for r in t + e:
            r["domain"] = domain or task
        return t, e

    if setting.startswith("planted"):
        for i, task in enumerate(spec["useful"]):
            t, e = rows(task, i, per_task_train * (OVER if i == 0 else 1), per_task_eval)
            train, evals = train + t, evals + e
        t, e = rows(spec["rare"], 10, per_task_train // RARE, per_task_eval)
        train, evals = train + t, evals + e
        n_noise_eval = max(1, round(NOISE_EVAL_SHARE * len(evals) / (1 - NOISE_EVAL_SHARE)))
        t, e = rows(spec["noise"], 11, per_task_train, n_noise_eval, domain="noise")
        if not control:  # the answers permuted across the questions: nothing to learn from them
            answers = [r["answer"] for r in t]
            rng.shuffle(answers)
            for r, a in zip(t, answers):
                r["answer"] = a
        train, evals = train + t, evals + e
        stats.update(noise=spec["noise"], rare=spec["rare"], over_represented=spec["useful"][0])
    elif setting == "coarse":
        for j, pair in enumerate(spec["pairs"]):
            for i, task in enumerate(pair):
                t, e = rows(task, 2 * j + i, per_task_train, per_task_eval, domain=f"pair{j}")
                train, evals = train + t, evals + e
        stats["pairs"] = {f"pair{j}": list(pair) for j, pair in enumerate(spec["pairs"])}
    else:
        labels = [f"random{j}" for j in range(6)]
        for i, task in enumerate(spec["families"]):
            t, e = rows(task, i, per_task_train, per_task_eval)
            for r in t + e:
                r["family"], r["domain"] = r["domain"], rng.choice(labels)
            train, evals = train + t, evals + e
    rng.shuffle(train)
    for split, data in (("train", train), ("eval", evals)):
        with (out / f"{split}.jsonl").open("w") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts: dict[str, int] = {}
        for r in data:
            counts[r["domain"]] = counts.get(r["domain"], 0) + 1
        stats[split] = dict(sorted(counts.items()))
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    parser.add_argument("--control", action="store_true", help="planted: leave the noise domain's answers right")
    parser.add_argument("--per-task-train", type=int, default=200, help="train rows of a useful family")
    parser.add_argument("--per-task-eval", type=int, default=40, help="eval rows per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return run_tool("planted", lambda: build(args.out, args.setting, args.per_task_train, args.per_task_eval,
                                             args.seed, args.control, args.overwrite))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
