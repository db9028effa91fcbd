"""The `rbvl` command: parse arguments, call the library.

rbvl train RECIPE.yaml [key=value ...]     fine-tune with LoRA and R&B (or another mixing strategy)
rbvl validate RECIPE.yaml [key=value ...]  check a recipe without running it
rbvl eval RUN_DIR [--checkpoint N]         per-domain eval loss of a run's checkpoint
rbvl compare RUN_DIR RUN_DIR ...           per-domain eval losses of runs side by side
rbvl bench regroup|balance|stream ...  speed figures, measured side by side in one run
rbvl export CHECKPOINT --merge OUT         merge the LoRA adapter into a standalone model
"""

from __future__ import annotations

import argparse
import logging
import sys

from rbvl import __version__


class CliError(RuntimeError):
    """An error worth one line to the user."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        args = parser.parse_args(argv[:2])
        args.rest = argv[2:]  # the benchmark parses its own options
    else:
        args = parser.parse_args(argv)
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
            print(f"rbvl: error: {e}", file=sys.stderr)
            return 2
        raise


BENCHMARKS = {
    "regroup": ("rbvl.regroup.bench", "regroup pipeline throughput vs raw encode_image; k-means times"),
    "balance": ("rbvl.bench_balance", "training step time with Balance on vs off; analytic FLOPs"),
    "stream": ("rbvl.bench_stream", "mixture stream + collate vs a raw webdataset pipeline (same decode, workers)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbvl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rbvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    sub = parser.add_subparsers(metavar="COMMAND")

    for name, func, text in (
        ("train", cmd_train, "fine-tune a model with LoRA and a mixing strategy (R&B by default)"),
        ("validate", cmd_validate, "check a recipe (and overrides) without running it"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("recipe", help="recipe YAML (see recipes/); validate takes several")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. balance.lam=5")
        p.add_argument("--help-config", action="store_true", help="list every recipe key with its default and meaning")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="per-domain eval loss of a run's checkpoint")
    p.add_argument("run_dir", help="a run folder or one of its checkpoint-N folders")
    p.add_argument("--manifest", help="regroup manifest (default: the run's)")
    p.add_argument("--max-samples", type=int, default=0, help="per domain (0 = all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="per-domain eval losses of runs, side by side")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="merge a LoRA checkpoint into a standalone model + processor")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint-N")
    p.add_argument("--merge", required=True, metavar="OUT", help="folder to write the merged model into")
    p.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    bench_sub = bench.add_subparsers(metavar="WHAT")
    for name, (module, text) in BENCHMARKS.items():
        # The benchmark modules import torch and friends: build their options only when they run.
        p = bench_sub.add_parser(name, help=text, description=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_bench, module=module, bench_name=name)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    """`rbvl validate recipes/*.yaml [key=value ...]`: every recipe given, each with the same overrides."""
    from rbvl.config import ConfigError, load_config

    if args.help_config:
        return _print_config_help()
    recipes = [args.recipe] + [o for o in args.overrides if "=" not in o]
    overrides = [o for o in args.overrides if "=" in o]
    failed = 0
    for recipe in recipes:
        try:
            cfg = load_config(recipe, overrides)
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
    cfg = load_config(args.recipe, args.overrides)
    from rbvl.train import train

    train(cfg)
    return 0


def cmd_eval(args) -> int:
    from rbvl.evaluate import evaluate_run

    evaluate_run(args.run_dir, manifest=args.manifest, max_samples=args.max_samples)
    return 0


def cmd_compare(args) -> int:
    from rbvl.evaluate import compare_runs

    print(compare_runs(args.run_dirs))
    return 0


def cmd_export(args) -> int:
    from rbvl.export import export_merged

    out = export_merged(args.checkpoint, args.merge)
    print(f"merged model written to {out}")
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


def _is_user_error(e: Exception) -> bool:
    from rbvl.config import ConfigError

    user_errors: tuple[type, ...] = (ConfigError, CliError, FileNotFoundError, NotADirectoryError)
    try:
        from rbvl.model import ModelError

        user_errors += (ModelError,)
    except ImportError:
        pass
    try:
        from rbvl.records import RecordsError

        user_errors += (RecordsError,)
    except ImportError:
        pass
    try:
        from rbvl.checkpoint import CheckpointError

        user_errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        from rbvl.data import DataError

        user_errors += (DataError,)
    except ImportError:
        pass
    return isinstance(e, user_errors)


if __name__ == "__main__":
    sys.exit(main())
