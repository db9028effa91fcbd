"""`rbvl-regroup`: regroup a dataset into semantic domains (per-cluster WebDataset shards + manifest.json).

    rbvl-regroup --input data/llava.json --image-root data/images --eval data/eval.json \\
        --embedder open_clip:ViT-B-32/laion2b_s34b_b79k --k 4,8,16,32 --out shards/
    rbvl-regroup --config regroup.yaml --k 8              # flags override the YAML
    rbvl-regroup --config regroup.yaml k=8 seed=1         # so do key=value overrides, as in `rbvl train`

The options are the fields of `rbvl.regroup.RegroupOptions` (the flags below are generated from them); the logic
lives in `rbvl.regroup`; this file parses arguments and reports fatal errors as one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rbvl import __version__
from rbvl.config import ConfigError, add_flags
from rbvl.regroup.options import RegroupOptions

PROG = "rbvl-regroup"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other fatal error of this tool
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Every field of `RegroupOptions` as a flag; flags not given stay absent so the YAML value stands."""
    p = _Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", default=None, help="YAML file with any of the options below (flags override it)")
    p.add_argument("--version", action="version", version=f"{PROG} (rbvl {__version__})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override options, e.g. k=8 seed=1")
    add_flags(p, RegroupOptions, defaults={"num_workers": "min(4, CPUs)"})
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    items = args.pop("overrides", [])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers inside DataLoader workers
    from rbvl.records import RecordsError
    from rbvl.regroup import RegroupError, load_options
    from rbvl.runtime import fsfault
    from rbvl.runtime.runlock import LockError

    bad = [i for i in items if "=" not in i]
    if bad:
        print(f"{PROG}: error: unexpected argument '{bad[0]}' (options are --flags or key=value)", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}  # a scheduler's SIGTERM stops like Ctrl-C
    try:
        opts = load_options(config, args, items)  # checked before torch and friends are imported: mistakes fail fast
        from rbvl.regroup import regroup
        from rbvl.regroup.pipeline import close_distributed

        regroup(opts)
        close_distributed()  # under torchrun; a no-op on one process
    except (RegroupError, ConfigError, RecordsError, LockError, OSError) as e:
        msg = fsfault.describe(e) if isinstance(e, OSError) else " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or _Stopped by a signal: regroup has removed its partial output
        sig = e.signum if isinstance(e, _Stopped) else signal.SIGINT
        print(
            f"{PROG}: stopped by {signal.Signals(sig).name}; no partial output left; the embedding cache is kept, "
            "so rerunning the same command resumes where embedding stopped",
            file=sys.stderr,
        )
        return 128 + sig
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and other schedulers send before a kill


class _Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM / SIGUSR1, so regroup unwinds (and cleans up) as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, _frame):
    raise _Stopped(signum)


if __name__ == "__main__":
    sys.exit(main())
