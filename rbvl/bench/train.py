"""`rbvl bench train`: the training loop's speed against a plain Hugging Face `Trainer`, side by side in one process.

    rbvl bench train                                      # tiny demo model, a generated 3-domain manifest
    rbvl bench train --manifest demo/shards/manifest.json --rounds 6 --steps 30 --threads 1

Four arms train the same model (the recipe's model + LoRA, built afresh for every run), on the same data, with the
same batch size, optimizer (AdamW, lr, weight decay, grad-norm clip), precision and loader workers:

    stratified     `rbvl.train.train` with mixing.strategy=stratified
    rnb            `rbvl.train.train` with mixing.strategy=rnb (the GradientTracker on every step, Balance updates)
    balance_hf     `rbvl.integrations.hf.BalanceTrainer`
    trainer        a plain `transformers.Trainer`
    rnb_linears    (only when named in --arms) rnb with each tracked LoRA linear on its own autograd function, as
                   before a LoRA layer's A and B ran as one (GradientTracker.pair_lora = False)

The two Trainer arms read a map-style dataset of the manifest's training samples, decoded once up front, through
the same `rbvl.data.collate.Encoder`; `rbvl train` reads the shards through `MixtureStream` (tar reading, PNG decoding and
collation in its loader workers), as it does in real use.

What is timed: the loop from the end of optimizer step `warmup` to the end of step `warmup + steps`, i.e. `steps`
whole steps (data, forward, loss, backward, clip, optimizer, scheduler, Balance bookkeeping and updates, logging
every `warmup` steps), never model building, the first steps (worker start-up), eval, checkpoints or plots.
- `rbvl train` runs with log_every = warmup, max_steps = warmup + steps, eval.every = save_every = 0, TensorBoard,
  plots and the progress bar off. Its `train` rows in metrics.jsonl carry `step_time`, the mean wall time per step
  since the previous row (taken with `perf_counter` at the log line); the timed span is the sum of
  step_time × steps over the rows after step `warmup`. (The final eval and checkpoint that `train` always does at
  max_steps come after the last row, so they are outside the span.)
- The Trainer arms log every `warmup` steps too (to nowhere: report_to=none), save and evaluate never; a callback
  takes `perf_counter` at `on_step_end`, which the Trainer calls after each optimizer step, before logging.
Balance updates: `balance.update_every` is min(the recipe's, steps) with balance.warmup_steps = 0, so at least one
update falls inside every timed span, for both `rnb` and `balance_hf` (`--update-every` overrides).

Rounds alternate the arms (in a rotated order each round), so drift in the machine's speed hits every arm alike;
each arm's figure is the median samples/s over the rounds. The ratios the issue sets goals for are printed beside
them, as the ratio of the medians and as the median of the ratios within each round (`paired_ratios`); they are
reported, not asserted (timings on a shared machine are noisy). Beside each per-round median stands a distribution-free
90 % interval for it (`paired_intervals`: order statistics of the per-round ratios; five rounds at least), and for a
ratio with a goal, whether that interval says the goal is met, not met, or not decided at this run's noise. On a shared
2-core VM the per-round ratios of two identical loops spread by ±20 %, so 21 rounds still leave an interval about
0.1 wide: a few percent is beyond the arms there. So a last part (`--tracker-rounds`, rbvl/bench/step.py) times the
tracker within one process: one model, the same micro-batches, blocks of steps with the tracker attached and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from rbvl.balance import GradientTracker
from rbvl.bench._timing import alternate, median_interval, medians, paired_ratio, quiet_training, set_threads, verdict
from rbvl.bench.step import print_step_cost, tracker_step_cost
from rbvl.config import load_config
from rbvl.data import decode, load_domains, read_shard
from rbvl.data.collate import Encoder
from rbvl.data.synthetic import write_tiny_manifest
from rbvl.model import apply_lora, load_model
from rbvl.train import train
from rbvl.train.metrics import read_metrics
from rbvl.train.optim import fused_adamw

ARMS = ("stratified", "rnb", "balance_hf", "trainer", "rnb_linears")
DEFAULT_ARMS = ARMS[:4]
RATIOS = (  # (numerator, denominator, goal or None)
    ("stratified", "trainer", 1.0),
    ("rnb", "stratified", 0.97),
    ("balance_hf", "trainer", 0.95),
    ("rnb", "rnb_linears", None),
)
# rnb / stratified's goal, held here to the per-micro-batch tracking alone (the in-process part)
TRACKER_GOAL = next(goal for a, b, goal in RATIOS if (a, b) == ("rnb", "stratified"))
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny_rnb.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="model, LoRA, optimizer, data and balance settings")
    p.add_argument("--manifest", help="a regroup manifest.json (default: a generated 3-domain one in a temp folder)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (loader start-up, allocator)")
    p.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="rounds; each runs every arm once (5 at least for an interval; on a 2-core CPU a round of the four "
        "default arms takes about 20 s)",
    )
    p.add_argument("--batch", type=int, help="samples per optimizer step (default: the recipe's train.batch_size)")
    p.add_argument("--workers", type=int, help="loader workers for every arm (default: the recipe's data.num_workers)")
    p.add_argument("--update-every", type=int, help="Balance update interval (default: min(recipe's, --steps))")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--tracker-rounds",
        type=int,
        default=15,
        help="last part: rounds of the tracker's cost timed within one process (rbvl/bench/step.py; on a 2-core "
        "CPU about 0.4 s a round); 0 skips it",
    )
    p.add_argument("--tracker-block", type=int, default=6, help="optimizer steps per side in each of those rounds")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--json", help="also write the result to this file")


def run(args) -> dict:
    set_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise SystemExit("--steps, --warmup and --rounds must be at least 1")
    if args.tracker_rounds < 0 or args.tracker_block < 1:
        raise SystemExit("--tracker-rounds must be at least 0 and --tracker-block at least 1")
    quiet_training()

    with tempfile.TemporaryDirectory(prefix="rbvl-bench-train-") as tmp:
        tmp = Path(tmp)
        manifest = Path(args.manifest) if args.manifest else write_bench_manifest(tmp / "shards")
        cfg = load_config(args.recipe, [f"manifest={manifest}"])
        batch = args.batch or cfg.train.batch_size
        workers = cfg.data.num_workers if args.workers is None else args.workers
        update_every = args.update_every or min(cfg.balance.update_every, args.steps)
        overrides = [
            *timed_overrides(manifest, args.warmup, args.steps, workers),
            f"train.batch_size={batch}",
            "train.grad_accum=1",
            "eval.max_samples=1",
            f"balance.update_every={update_every}",
            "balance.warmup_steps=0",
        ]
        samples = load_samples(manifest) if {"balance_hf", "trainer"} & set(arms) or args.tracker_rounds else []

        def measure(arm: str, r: int) -> float:
            out = tmp / f"round{r}-{arm}"
            if arm in ("stratified", "rnb", "rnb_linears"):
                strategy = "rnb" if arm == "rnb_linears" else arm
                run_cfg = load_config(args.recipe, [*overrides, f"output_dir={out}", f"mixing.strategy={strategy}"])
                GradientTracker.pair_lora = arm != "rnb_linears"
                try:
                    seconds = time_rbvl_train(run_cfg, args.warmup)
                finally:
                    GradientTracker.pair_lora = True
            else:
                run_cfg = load_config(args.recipe, [*overrides, f"output_dir={out}"])
                seconds = time_trainer(run_cfg, samples, balance=arm == "balance_hf", warmup=args.warmup)
            return batch * args.steps / seconds

        def print_round(r: int, rates: dict[str, list[float]]) -> None:
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{a} {rates[a][-1]:7.1f}" for a in arms), flush=True)

        rates = alternate(arms, args.rounds, measure, order="rotate", after_round=print_round)
        step_cost = None
        if args.tracker_rounds:
            step_cfg = load_config(args.recipe, [*overrides, f"output_dir={tmp / 'in-process'}"])
            step_cost = tracker_step_cost(step_cfg, samples, args.tracker_rounds, args.tracker_block, batch)

    median = medians(rates)
    ratios = {f"{a}/{b}": median[a] / median[b] for a, b, _ in RATIOS if a in median and b in median}
    # the same ratios taken within each round, then the median: robust to the machine's speed drifting between rounds
    paired = {f"{a}/{b}": paired_ratio(rates[a], rates[b]) for a, b, _ in RATIOS if a in rates and b in rates}
    # how far the per-round ratios let that median be trusted: a 90 % interval, distribution-free
    intervals = {
        f"{a}/{b}": median_interval([x / y for x, y in zip(rates[a], rates[b])])
        for a, b, _ in RATIOS
        if a in rates and b in rates
    }
    result = {
        "setup": {
            "recipe": str(args.recipe),
            "manifest": str(args.manifest or "generated"),
            "batch": batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "workers": workers,
            "update_every": update_every,
            "threads": torch.get_num_threads(),
        },
        "samples_per_s": rates,
        "median_samples_per_s": median,
        "ratios": ratios,
        "paired_ratios": paired,
        "paired_intervals": intervals,
        "loadavg": list(os.getloadavg()),
        "tracker_in_process": step_cost,
    }
    print_result(result, cfg.model.name)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def print_result(result: dict, model_name: str) -> None:
    setup, rates, median = result["setup"], result["samples_per_s"], result["median_samples_per_s"]
    ratios, paired, load = result["ratios"], result["paired_ratios"], result["loadavg"]
    intervals = result["paired_intervals"]
    print(
        f"rbvl bench train — {model_name}, batch {setup['batch']}, {setup['steps']} timed steps after "
        f"{setup['warmup']}, {setup['rounds']} rounds, {setup['workers']} loader worker(s), {setup['threads']} torch "
        f"thread(s), Balance every {setup['update_every']} steps; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for arm in rates:
        spread = f"{min(rates[arm]):.1f}–{max(rates[arm]):.1f}"
        print(f"  {arm:<11} {median[arm]:8.1f} samples/s (median; rounds {spread})")
    for a, b, goal in RATIOS:
        if f"{a}/{b}" in ratios:
            key = f"{a}/{b}"
            interval = intervals[key]
            spread = "" if interval is None else f" in [{interval[0]:.3f}, {interval[1]:.3f}] ({interval[2]:.0%})"
            target = "" if goal is None else f"; goal ≥ {goal:.2f}×: {verdict(interval, goal)}"
            print(f"  {a + ' / ' + b:<24} {ratios[key]:6.3f}×   (per round, median {paired[key]:.3f}×{spread}{target})")
    if result.get("tracker_in_process"):
        print_step_cost(result["tracker_in_process"], goal=TRACKER_GOAL)


# ---------------------------------------------------------------------------------------------------------------------
# The arms
# ---------------------------------------------------------------------------------------------------------------------


def timed_overrides(manifest, warmup: int, steps: int, workers: int) -> list[str]:
    """Recipe overrides for a run `time_rbvl_train` can time: a train row (with its step_time) every `warmup` steps up
    to warmup + steps; no checkpoints, periodic eval, TensorBoard, plots or progress bar inside the span."""
    return [
        f"manifest={manifest}",
        f"max_steps={warmup + steps}",
        f"train.log_every={warmup}",
        "train.save_every=0",
        "eval.every=0",
        f"data.num_workers={workers}",
        "logging.tensorboard=false",
        "logging.plots=false",
        "logging.progress=false",
    ]


def time_rbvl_train(cfg, warmup: int, return_summary: bool = False):
    """Seconds `rbvl train` spent on steps warmup+1 … max_steps, from the step_time of its metrics rows (and the
    run's summary, with `return_summary`)."""
    summary = train(cfg)
    seconds, previous = 0.0, 0
    for row in read_metrics(cfg.output_dir, "train"):  # rows at warmup, 2·warmup, …, max_steps
        if row["step"] > warmup:
            seconds += row["step_time"] * (row["step"] - previous)
        previous = row["step"]
    if previous != cfg.max_steps:
        raise RuntimeError(f"{cfg.output_dir}: the last train row is at step {previous}, not {cfg.max_steps}")
    return (seconds, summary) if return_summary else seconds


def time_trainer(cfg, samples: list[dict], balance: bool, warmup: int) -> float:
    """Seconds a (Balance)Trainer spent on steps warmup+1 … max_steps, from `on_step_end` times."""
    # Imported here: transformers' Trainer (accelerate) takes seconds to import, and only these two arms use it.
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from rbvl.integrations.hf import BalanceTrainer

    model, processor = load_model(cfg.model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = apply_lora(model, cfg.lora)
    chat = Encoder(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong)

    def collate(features: list[dict]) -> dict:
        return chat(features, [f["domain"] for f in features])[0]  # model inputs only

    ends: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.max_grad_norm,
        optim="adamw_torch_fused"
        if cfg.optim.fused and fused_adamw([p for p in model.parameters() if p.requires_grad])
        else "adamw_torch",
        warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=cfg.train.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        use_cpu=cfg.train.device == "cpu" or not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    kwargs = dict(model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=[Clock()])
    if balance:
        trainer = BalanceTrainer(**kwargs, n_domains=1 + max(s["domain"] for s in samples), balance=cfg.balance)
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)  # logs go nowhere, as rbvl's do (to a file)
    trainer.train()
    return ends[cfg.max_steps] - ends[warmup]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_samples(manifest: Path) -> list[dict]:
    """Every training sample of the manifest, decoded ({"conversation", "image", "domain"}): the Trainers' dataset."""
    rows = []
    for d, domain in enumerate(load_domains(manifest).domains):
        for shard in domain.train_shards:
            for raw in read_shard(shard):
                s = decode(raw)
                rows.append({"conversation": s["conversation"], "image": s["image"], "domain": d})
    return rows


def write_bench_manifest(root: Path, n_domains: int = 3, n_train: int = 64, n_eval: int = 4, seed: int = 0) -> Path:
    """A small regrouped shard set + manifest.json (rbvl.data.synthetic): domain 0 asks for an image's colour, domain 1 a
    sum (text only), domain d ≥ 2 a fixed phrase."""
    return write_tiny_manifest(root, n_domains=n_domains, n_train=n_train, n_eval=n_eval, seed=seed)
