"""The `rbvl` command: parse arguments, call the library.

rbvl train RECIPE.yaml [key=value ...]     fine-tune with LoRA and R&B (or another mixing strategy)
rbvl validate RECIPE.yaml [key=value ...]  check a recipe without running it
rbvl eval RUN_DIR [--checkpoint N]         per-domain eval loss of a run's checkpoint
rbvl compare RUN_DIR RUN_DIR ...           per-domain eval losses of runs side by side
rbvl bench regroup | balance | stream | train   speed figures, measured side by side in one run
rbvl export CHECKPOINT --merge OUT         merge the LoRA adapter into a standalone model
rbvl gallery SHARDS_DIR                    (re)build SHARDS_DIR/gallery/index.html, the clusters by eye
rbvl experiment EXPERIMENT.yaml            a grid of runs (domains × strategy × seed) and its report
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from rbvl import __version__
from rbvl.bench import BENCHMARKS


class CliError(RuntimeError):
    """An error worth one line to the user."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        args = parser.parse_args(argv[:2])
        args.rest = argv[2:]  # the benchmark parses its own options
    else:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _extra_arguments(parser, args, extra)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("rbvl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known errors become one line; anything else keeps its traceback
        if _is_user_error(e) and not args.verbose:
            code = getattr(e, "exit_code", None)  # a preempted run: its own line, exit 128 + the signal's number
            if not (code and os.environ.get("RANK", "0") != "0"):  # every rank stops at the same step: rank 0 says so
                # one write: under torchrun every rank says it, and two writes (text, newline) interleave
                line = str(e) if code else f"rbvl: error: {_one_line(e)}"
                sys.stderr.write(line + "\n")
            return code or 2
        raise


def _extra_arguments(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """Arguments the parser left over. `key=value` after an option (`rbvl validate R.yaml --config-only k=v`) join
    the overrides; anything else is argparse's error (exit 2), with a hint where a recipe key came as a flag."""
    takes_overrides = getattr(args, "overrides", None) is not None
    if takes_overrides and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
        return
    flag = next((e for e in extra if e.startswith("--")), None)
    hint = f" (recipe keys go as key=value: {flag[2:].partition('=')[0]}=...)" if flag and takes_overrides else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbvl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rbvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    sub = parser.add_subparsers(metavar="COMMAND")
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too (rbvl train X.yaml -v)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    for name, func, text in (
        ("train", cmd_train, "fine-tune a model with LoRA and a mixing strategy (R&B by default)"),
        ("validate", cmd_validate, "check a recipe (and overrides) without running it"),
    ):
        p = sub.add_parser(name, help=text, description=text, parents=[verbose])
        p.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/); validate takes several")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. balance.lam=5")
        p.add_argument("--help-config", action="store_true", help="list every recipe key with its default and meaning")
        p.set_defaults(func=func)
    sub.choices["validate"].add_argument(
        "--config-only", action="store_true", help="check the values alone, not whether this machine has the manifest and model"
    )  # fmt: skip

    p = sub.add_parser("eval", help="per-domain eval loss of a run's checkpoint", parents=[verbose])
    p.add_argument("run_dir", help="a run folder or one of its checkpoint-N folders")
    p.add_argument("--checkpoint", type=int, metavar="N", help="RUN_DIR/checkpoint-N (default: the newest)")
    p.add_argument("--manifest", help="regroup manifest (default: the run's)")
    p.add_argument("--max-samples", type=int, default=0, help="per domain (0 = all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="per-domain eval losses of runs, side by side", parents=[verbose])
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="merge a LoRA checkpoint into a standalone model + processor", parents=[verbose])
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint-N, or RUN_DIR for its newest (a full fine-tune's is copied)")
    p.add_argument("--merge", required=True, metavar="OUT", help="folder to write the merged model into")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the merged folder to the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "gallery", help="(re)build the cluster gallery (gallery/index.html) of a regroup output", parents=[verbose]
    )
    p.add_argument("shards", help="the regroup output folder (holding manifest.json)")
    p.add_argument("--nearest", type=int, default=12, help="cards per cluster nearest its centroid (default 12)")
    p.add_argument("--random", type=int, default=12, help="cards per cluster drawn at random (default 12)")
    p.add_argument("--sample", type=int, default=10_000, help="rows behind silhouettes and projection (default 10000)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the k sweep and projection PNGs")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser(
        "experiment", help="run a grid of runs (domains × strategy × seed) and write its report", parents=[verbose]
    )
    p.add_argument("experiment", help="EXPERIMENT.yaml (see experiments/)")
    p.add_argument("--out", help="report folder (default: the file's `out`)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from results.jsonl, run nothing")
    p.add_argument("--readme", help="also rewrite this README's results block for the experiment (README.md)")
    p.add_argument("--plan", action="store_true", help="print the runs it would make (groups × seeds) and stop")
    p.set_defaults(func=cmd_experiment)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side", parents=[verbose])
    bench_sub = bench.add_subparsers(metavar="WHAT")
    for name, (module, text) in BENCHMARKS.items():
        # The benchmark modules import torch and friends: build their options only when they run (rbvl/bench/).
        p = bench_sub.add_parser(name, help=text, description=text, add_help=False, parents=[verbose])
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_bench, module=module, bench_name=name)
    for command in sub.choices.values():  # `rbvl train --version` too (each benchmark parses its own flags)
        command.add_argument("--version", action="version", version=f"rbvl {__version__}")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    """`rbvl validate recipes/*.yaml [key=value ...]`: every recipe given, each with the same overrides."""
    from rbvl.config import ConfigError, check_runnable, load_config
    from rbvl.config.resolve import offline_problems

    if args.help_config:
        return _print_config_help()
    if args.recipe is None:
        raise CliError("give a recipe: rbvl validate RECIPE.yaml [key=value ...]")
    recipes = [args.recipe] + [o for o in args.overrides if "=" not in o]
    overrides = [o for o in args.overrides if "=" in o]
    failed = 0
    for recipe in recipes:
        try:
            cfg = load_config(recipe, overrides)
            check_runnable(cfg)
            problems = [] if args.config_only else offline_problems(cfg)  # does this machine have manifest + model?
            if problems:
                raise ConfigError("; ".join(problems))
        except ConfigError as e:
            if len(recipes) == 1:
                raise
            print(f"rbvl: error: {recipe}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{recipe}: ok (model={cfg.model.name}, mixing={cfg.mixing.strategy}, max_steps={cfg.max_steps}, "
            f"manifest={cfg.manifest or '-'})"
        )
    return 2 if failed else 0


def cmd_train(args) -> int:
    from rbvl.config import load_config

    if args.help_config:
        return _print_config_help()
    if args.recipe is None:
        raise CliError("give a recipe: rbvl train RECIPE.yaml [key=value ...] (recipes/ holds examples)")
    cfg = load_config(args.recipe, args.overrides)
    _note_empty_eval(cfg.manifest)
    from rbvl.train import train

    summary = train(cfg)
    samples = summary.get("samples", {})
    if samples.get("truncated") or samples.get("dropped"):  # visible at the end, not only in metrics.jsonl
        print(
            f"rbvl train: of {samples['drawn']} samples drawn (this rank), {samples['truncated']} were truncated to "
            f"data.max_length={cfg.data.max_length} and {samples['dropped']} dropped; per log line in metrics.jsonl",
            file=sys.stderr,
        )
    return 0


def _note_empty_eval(manifest: str) -> None:
    """Say it up front when the manifest has no eval records (eval loss is then reported as null)."""
    from rbvl import manifest as manifest_file

    try:
        clusters = manifest_file.read(manifest)["clusters"]
        n_eval = sum(int(c.get("n_eval", 0)) for c in clusters)
    except Exception:  # noqa: BLE001 - a broken manifest gets its own error from training
        return
    if n_eval == 0:
        print(
            f"rbvl: note: {manifest} has no eval records: Balance targets uniform proportions and the eval loss "
            "is reported as null (regroup with --eval to measure it)",
            file=sys.stderr,
        )


def cmd_eval(args) -> int:
    from rbvl.evaluate import evaluate_run

    run_dir = args.run_dir
    if args.checkpoint is not None:
        from pathlib import Path

        run_dir = Path(run_dir) / f"checkpoint-{args.checkpoint}"
        if not run_dir.is_dir():
            found = sorted(p.name for p in Path(args.run_dir).glob("checkpoint-*"))
            raise CliError(f"--checkpoint {args.checkpoint}: no {run_dir} (the run has {', '.join(found) or 'none'})")
    evaluate_run(run_dir, manifest=args.manifest, max_samples=args.max_samples)
    return 0


def cmd_compare(args) -> int:
    from rbvl.evaluate import compare_runs

    print(compare_runs(args.run_dirs))
    return 0


def cmd_export(args) -> int:
    from rbvl.model.export import export_merged
    from rbvl.runtime import fsfault

    try:
        out = export_merged(args.checkpoint, args.merge)
    except OSError as e:
        if not fsfault.is_fault(e):
            raise
        raise CliError(fsfault.describe(e)) from None
    print(f"merged model written to {out}")
    if args.push_to_hub:
        from rbvl.model.export import push_to_hub

        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as e:  # noqa: BLE001 - network, auth, a taken name: one line; the local folder stays
            raise CliError(
                f"--push-to-hub {args.push_to_hub}: {type(e).__name__}: {_one_line(e)} ({out} is kept)"
            ) from None
        print(f"pushed to {url}")
    return 0


def cmd_gallery(args) -> int:
    from rbvl.regroup.errors import RegroupError
    from rbvl.regroup.gallery import write_gallery
    from rbvl.runtime import fsfault

    try:
        page = write_gallery(args.shards, n_nearest=args.nearest, n_random=args.random, sample=args.sample,
                             plots=args.plots)  # fmt: skip
    except RegroupError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        if not fsfault.is_fault(e):
            raise
        raise CliError(fsfault.describe(e)) from None
    print(f"gallery written to {page}")
    return 0


def cmd_experiment(args) -> int:
    from rbvl.experiment import run_experiment

    report = run_experiment(
        args.experiment, out=args.out, report_only=args.report_only, readme=args.readme, dry_run=args.plan
    )
    if not args.plan:
        print(f"report: {report}")
    return 0


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(args.module)
    parser = argparse.ArgumentParser(
        prog=f"rbvl bench {args.bench_name}", description=module.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    module.add_arguments(parser)
    module.run(parser.parse_args(args.rest))
    return 0


def _print_config_help() -> int:
    from rbvl.config import describe

    for key, type_name, default, doc in describe():
        print(f"{key:28s} {type_name:22s} {default!r:>14}  {doc}")
    return 0


def _one_line(e: Exception) -> str:
    """The error's own message: one raised in a DataLoader worker arrives wrapped in the worker's traceback, whose
    last line is `module.ErrorClass: message`."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = re.sub(rf"^[\w.]*{type(e).__name__}: ", "", text.strip().splitlines()[-1])
    return text


def _is_user_error(e: Exception) -> bool:
    """Errors worth one line. Only modules already imported can have raised theirs (importing the others, such as
    transformers behind rbvl.model, would cost seconds on every mistyped key)."""
    user_errors: list[type] = [CliError, FileNotFoundError, NotADirectoryError]
    for module, name in (
        ("rbvl.config", "ConfigError"),
        ("rbvl.runtime.runlock", "LockError"),
        ("rbvl.model", "ModelError"),
        ("rbvl.model.families", "FamilyError"),
        ("rbvl.records", "RecordsError"),
        ("rbvl.train.checkpoint", "CheckpointError"),
        ("rbvl.data", "DataError"),
        ("rbvl.balance.layers", "TrackingError"),
        ("rbvl.train.guard", "Preempted"),
        ("rbvl.train.guard", "Diverged"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            user_errors.append(cls)
    return isinstance(e, tuple(user_errors))


if __name__ == "__main__":
    sys.exit(main())
