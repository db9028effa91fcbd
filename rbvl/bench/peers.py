"""R&B against the peer mixers, measured alike: part 3 of `rbvl bench balance`.

    rbvl bench balance --slice-layers 0 --peer-steps 250 --peer-rounds 2      # the peers only (plus the 7B table)
    rbvl bench balance --peer-manifest experiments/out/digits/shards/k5/manifest.json

Every strategy trains the same model (`--peer-recipe`, default the tiny demo recipe) with `rbvl.train.train`, on the
same manifest (default: a generated 4-domain one), batch, optimizer and seed; only `mixing.strategy` changes. Each
peer runs with its authors' defaults (rbvl.config: DGA's m + 1 extra forward + backward passes every step, Aioli's
4 × 4 LearnParams steps per domain in rounds of 250, DoReMi's reference forward on every batch, ODM's EXP3 every step).

What is measured, in the same run, for every strategy:
- wall clock per optimizer step over the `--peer-steps` steps after `--peer-warmup` (the loop's own step_time, as
  `rbvl bench train` reads it: data, forward, backward, optimizer, and the mixer's step with any extra passes), the
  median over `--peer-rounds` alternating rounds, and its ratio to stratified's;
- the mixer's extra work over the whole run as the mixer counts it (`mixer.cost`): forward and backward tokens beyond
  training's, as a share of the training tokens, and FLOPs = 2·params·(forward + 2·backward) tokens against training's
  2·params·3·tokens. R&B's extra FLOPs are the tracker's analytic count (`GradientTracker.extra_flops`).

A peer's extra passes are a fixed share of the training tokens whatever the model's size, so its FLOPs share carries
over to the recipe's model unchanged; R&B's share at the recipe's scale is part 1's. DoReMi's figure leaves out
training its reference model (one more full run). Aioli's eval-loss measurements scale with the eval set; the table
prints the eval tokens one measurement reads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rbvl.bench._timing import alternate, medians, paired_ratio, quiet_training
from rbvl.bench.train import time_rbvl_train, timed_overrides
from rbvl.config import load_config
from rbvl.data.synthetic import write_tiny_manifest
from rbvl.train import train

STRATEGIES = ("stratified", "rnb", "odm", "dga", "doremi", "aioli")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny_rnb.yaml"


def add_arguments(p) -> None:
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="part 3: R&B against odm, dga, doremi and aioli in real training runs (--no-peers skips it)",
    )
    p.add_argument("--peer-recipe", default=str(DEFAULT_RECIPE), help="model and training settings of part 3")
    p.add_argument("--peer-manifest", help="regroup manifest for part 3 (default: a generated 4-domain one)")
    p.add_argument("--peer-steps", type=int, default=250, help="timed steps per run (250: one whole Aioli round)")
    p.add_argument("--peer-warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--peer-rounds", type=int, default=2, help="alternating rounds of every strategy")
    p.add_argument("--peer-strategies", default=",".join(STRATEGIES), help="comma-separated subset")


def check_arguments(args) -> list[str]:
    """The strategies to run (stratified first if not named), or SystemExit naming the bad option: called before
    any part of the bench runs, so a typo does not wait for parts 1 and 2."""
    strategies = [s.strip() for s in args.peer_strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"--peer-strategies: unknown {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
    if "stratified" not in strategies:
        strategies.insert(0, "stratified")  # every overhead is against it
    if min(args.peer_steps, args.peer_warmup, args.peer_rounds) < 1:
        raise SystemExit("--peer-steps, --peer-warmup and --peer-rounds must be at least 1")
    if args.peer_manifest and not Path(args.peer_manifest).is_file():
        raise SystemExit(f"--peer-manifest {args.peer_manifest}: no such file")
    return strategies


def peer_costs(args) -> dict:
    """Train every strategy `--peer-rounds` times; returns step times, overheads and each mixer's counted work."""
    strategies = check_arguments(args)
    quiet_training()
    with tempfile.TemporaryDirectory(prefix="rbvl-bench-peers-") as tmp:
        tmp = Path(tmp)
        manifest = args.peer_manifest or write_tiny_manifest(tmp / "shards", n_domains=4, n_train=64, n_eval=16)
        # 0 loader workers: lag 0, so Aioli's LearnParams mixtures reach the very next batch
        base = timed_overrides(manifest, args.peer_warmup, args.peer_steps, workers=0)
        reference = tmp / "reference"
        if "doremi" in strategies:  # DoReMi's reference model: a stratified run of the same length, not timed
            train(load_config(args.peer_recipe, [*base, f"output_dir={reference}", "mixing.strategy=stratified"]))
        summaries: dict[str, dict] = {}

        def measure(s: str, r: int) -> float:
            extra = [f"mixing.reference={reference}"] if s == "doremi" else []
            extra += _balance_within(args.peer_recipe, args.peer_warmup + args.peer_steps) if s == "rnb" else []
            cfg = load_config(
                args.peer_recipe, [*base, *extra, f"output_dir={tmp / f'{r}-{s}'}", f"mixing.strategy={s}"]
            )
            seconds, summaries[s] = time_rbvl_train(cfg, args.peer_warmup, return_summary=True)
            return seconds / args.peer_steps

        def print_round(r: int, step_s: dict[str, list[float]]) -> None:
            times = "  ".join(f"{s} {step_s[s][-1] * 1000:.1f} ms" for s in strategies)
            print(f"peers round {r + 1}/{args.peer_rounds}: {times}", flush=True)

        step_s = alternate(strategies, args.peer_rounds, measure, order="rotate", after_round=print_round)
        eval_tokens = int(sum(summaries["stratified"]["eval"].get("tokens_per_domain") or [0]))
        m = len(summaries["stratified"]["eval"]["loss_per_domain"])
    median = medians(step_s)
    rows = {}
    for s in strategies:
        summary, cost = summaries[s], summaries[s].get("cost") or {}
        tokens, flops = summary["train_tokens"], summary["train_flops"]
        rows[s] = {
            "step_s": median[s],
            "step_s_rounds": step_s[s],
            "wall_overhead": median[s] / median["stratified"] - 1,
            # the same ratio within each round, then the median: robust to the machine drifting between rounds
            "wall_overhead_paired": paired_ratio(step_s[s], step_s["stratified"]) - 1,
            "extra_forward_share": cost.get("forward_tokens", 0) / tokens if tokens else None,
            "extra_backward_share": cost.get("backward_tokens", 0) / tokens if tokens else None,
            "extra_flops_share": cost.get("flops", 0) / flops if flops else None,
            "mixer_s": cost.get("seconds"),
            "updates": cost.get("updates"),
        }
    return {
        "recipe": str(args.peer_recipe),
        "manifest": str(args.peer_manifest or "generated (4 domains)"),
        "domains": m,
        "steps": args.peer_steps,
        "warmup": args.peer_warmup,
        "rounds": args.peer_rounds,
        "eval_tokens": eval_tokens,
        "strategies": rows,
    }


def print_peers(p: dict, full: dict | None = None) -> None:
    print(
        f"  Peers, measured alike: {Path(p['recipe']).name}, m = {p['domains']}, {p['steps']} timed steps after "
        f"{p['warmup']}, {p['rounds']} alternating round(s); one eval measurement reads {p['eval_tokens']:,} tokens"
    )
    print(
        f"  {'':12s}{'step (median)':>14s}{'vs stratified':>15s}{'per round':>11s}{'extra fwd':>11s}{'extra bwd':>11s}"
        f"{'extra FLOPs':>13s}{'mixer s':>9s}"
    )
    for s, r in p["strategies"].items():
        share = r["extra_flops_share"]
        print(
            f"  {s:12s}{r['step_s'] * 1000:11.1f} ms{100 * r['wall_overhead']:+13.1f} %"
            f"{100 * r['wall_overhead_paired']:+9.1f} %"
            f"{_pct(r['extra_forward_share']):>11s}{_pct(r['extra_backward_share']):>11s}{_pct(share, 4):>13s}"
            f"{'–' if r['mixer_s'] is None else format(r['mixer_s'], '.2f'):>9s}"
        )
    print(
        "  (vs stratified: ratio of the medians; per round: median of the ratios within a round; extra fwd / bwd:\n"
        "   tokens beyond training's, as a share of training's; FLOPs likewise, forward + 2·backward)"
    )
    if full:
        print(
            f"  At the recipe's scale R&B adds {100 * full['exact']['flops_fraction']:.4f} % (exact) / "
            f"{100 * full['sketched']['flops_fraction']:.4f} % (sketched) FLOPs; a peer's share above carries over."
        )


def _pct(x, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _balance_within(recipe: str, max_steps: int) -> list[str]:
    """R&B overrides that put a Balance update inside a short run (a window longer than the run is refused): the
    recipe's own settings when they fit, else update_every = min(the recipe's, max_steps) with no warmup."""
    balance = load_config(recipe).balance
    if balance.warmup_steps + balance.update_every <= max_steps:
        return []
    return [f"balance.update_every={min(balance.update_every, max_steps)}", "balance.warmup_steps=0"]
