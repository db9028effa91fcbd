"""A pretrained base for the CPU settings: the tiny LLaVA trained in full on reasoning-gym families no setting uses.

The paper fine-tunes pretrained models; a cell that starts from random weights spends its steps learning tokens and
formats, and every mixer looks alike there. This builds one base, once, that the `*_pretrained` experiments
fine-tune with LoRA, so that mixing decides what the adapter learns rather than how the model learns to speak.

    pip install -e '.[experiments]'
    python -m data_tools.base experiments/data/base                  # ~15 min on 2 cores
    python -m data_tools.base OUT --steps 200 --per-task-train 300   # a quick one

Writes OUT/data/{train,eval}.jsonl (the families of BASE_TASKS, disjoint from every setting's), OUT/shards (grouped by
family, no embedder), OUT/run (the `rbvl train` run: lora.enabled=false, the natural mixture, its metrics and plots),
OUT/model (the final weights and tokenizer as a `save_pretrained` folder: `model.name=OUT/model`) and, last,
OUT/base.json (what it was trained on, for how long, and its final eval loss; the experiment reports quote it).
Same arguments, same bytes in OUT/data; the weights are the run's, seeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from data_tools import planted, reasoning

# Twelve short-question families (≤ 300 characters, answers ≤ 50) that generate in under a millisecond. None of them is
# in any setting: the base learns the format of a reasoning answer, not the settings' families.
BASE_TASKS = (
    "decimal_arithmetic",
    "count_primes",
    "bitwise_arithmetic",
    "calendar_arithmetic",
    "time_intervals",
    "dice",
    "family_relationships",
    "number_filtering",
    "complex_arithmetic",
    "decimal_chain_sum",
    "sentence_reordering",
    "syllogism",
)
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_tiny_rnb.yaml"


def setting_families() -> set[str]:
    """Every reasoning-gym family a setting trains or evaluates on (reasoning, planted-*, coarse, random)."""
    used = set(reasoning.TASKS)
    for spec in planted.SETTINGS.values():
        for key in ("useful", "families"):
            used.update(spec.get(key, ()))
        used.update(spec[key] for key in ("rare", "noise") if key in spec)
        used.update(task for pair in spec.get("pairs", ()) for task in pair)
    return used


def build(out: str | Path, steps: int = 6000, per_task_train: int = 4000, per_task_eval: int = 20, seed: int = 0,
          lr: float = 1e-3, overwrite: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Generate the data, train the base and save it into `out`; returns OUT/base.json's content.

    Raises:
        ValueError: a count below 1, or a base family that a setting uses.
        FileExistsError: `out` holds files and `overwrite` is off.
    """
    clash = sorted(set(BASE_TASKS) & setting_families())
    if clash:
        raise ValueError(f"base families {', '.join(clash)} are also a setting's: the base must not have seen them")
    if steps < 1 or per_task_train < 1 or per_task_eval < 1:
        raise ValueError("--steps, --per-task-train and --per-task-eval must be >= 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for name in ("base.json", "data", "shards", "run", "model"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    from rbvl.config import load_config
    from rbvl.experiment.run import write_label_manifest
    from rbvl.model.load import load_model, save_base
    from rbvl.regroup import RegroupOptions
    from rbvl.train import checkpoint as ckpt
    from rbvl.train import train

    stats = reasoning.convert(out / "data", BASE_TASKS, per_task_train, per_task_eval, seed, minilm=False)
    data = out / "data"
    write_label_manifest(
        RegroupOptions(input=[str(data / "train.jsonl")], eval=[str(data / "eval.jsonl")], format="jsonl",
                       preset="text", out=str(out / "shards"), num_workers=0, progress=False, seed=seed)
    )  # fmt: skip
    overrides = [
        f"manifest={out / 'shards' / 'manifest.json'}",
        f"output_dir={out / 'run'}",
        f"max_steps={steps}",
        f"seed={seed}",
        f"model.init_seed={seed}",
        "lora.enabled=false",  # the whole language model trains: this is pretraining, not the fine-tune
        "mixing.strategy=natural",
        "data.num_workers=0",
        "data.max_length=256",
        f"optim.lr={lr}",
        f"optim.warmup_steps={max(1, steps // 50)}",
        f"train.save_every={steps}",
        f"eval.every={steps}",
        "logging.tensorboard=false",
        f"logging.progress={'true' if progress else 'false'}",
    ]
    cfg = load_config(RECIPE, overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    final = ckpt.latest(out / "run")
    model, processor = load_model(dataclasses.replace(cfg.model, name=str(final)))
    save_base(model, processor, out / "model")
    info = {
        "model": str(out / "model"),
        "from": f"{cfg.model.name} (init_seed {seed}), trained in full",
        "families": list(BASE_TASKS),
        "rows": {"train": sum(stats["train"].values()), "eval": sum(stats["eval"].values())},
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "lr": lr,
        "max_length": cfg.data.max_length,
        "eval_loss": summary["eval"].get("loss") if summary.get("eval") else None,
        "wall_s": round(wall, 1),
    }
    (out / "base.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps of 16 rows")
    parser.add_argument("--per-task-train", type=int, default=4000, help="train rows of the first family (fewer later)")
    parser.add_argument("--per-task-eval", type=int, default=20, help="eval rows per family")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    def make() -> dict:
        info = build(args.out, args.steps, args.per_task_train, args.per_task_eval, args.seed, args.lr,
                     args.overwrite, not args.no_progress)  # fmt: skip
        return {"train": info["rows"]["train"], "eval": info["rows"]["eval"]}

    return reasoning.run_tool("base", make)


if __name__ == "__main__":
    sys.exit(main())
