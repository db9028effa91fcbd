"""`rbvl-regroup`: regroup a dataset into semantic domains (per-cluster WebDataset shards + manifest.json).

    rbvl-regroup --input data/llava.json --image-root data/images --eval data/eval.json \\
        --embedder open_clip:ViT-B-32/laion2b_s34b_b79k --k 4,8,16,32 --out shards/
    python -m data_tools.regroup --config regroup.yaml --k 8          # flags override the YAML

The logic lives in `rbvl.regroup`; this file parses arguments and reports fatal errors as one line.
"""

from __future__ import annotations

import argparse
import os
import sys

from rbvl.regroup.options import RegroupOptions

PROG = "rbvl-regroup"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other fatal error of this tool
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    """Every option of `RegroupOptions` as a flag; flags not given stay absent so the YAML value stands."""
    p = _Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    doc = _field_docs()
    p.add_argument("--config", default=None, help="YAML file with any of the options below (flags override it)")
    p.add_argument("--input", nargs="+", help=doc["input"])
    p.add_argument("--eval", nargs="+", help=doc["eval"])
    p.add_argument("--out", help=doc["out"])
    p.add_argument("--image-root", help=doc["image_root"])
    p.add_argument("--format", help=doc["format"])
    p.add_argument("--preset", help=doc["preset"])
    p.add_argument("--text-fields", help=doc["text_fields"] + " (comma-separated)")
    p.add_argument("--label-field", help=doc["label_field"])
    p.add_argument("--with-trajectory", action="store_true", help=doc["with_trajectory"])
    p.add_argument("--embedder", help=doc["embedder"] + f" (default {RegroupOptions.embedder})")
    p.add_argument("--combine", choices=["mean", "concat", "image", "text"], help=doc["combine"])
    p.add_argument("--k", help=doc["k"] + " (default 4,8,16,32)")
    p.add_argument("--seed", type=int, help=doc["seed"])
    p.add_argument("--num-workers", type=int, help=doc["num_workers"] + " (default min(4, cpus))")
    p.add_argument("--batch-size", type=int, help=doc["batch_size"])
    p.add_argument("--chunk-size", type=int, help=doc["chunk_size"])
    p.add_argument("--maxcount", type=int, help=doc["maxcount"])
    p.add_argument("--minibatch-above", type=int, help=doc["minibatch_above"])
    p.add_argument("--silhouette-sample", type=int, help=doc["silhouette_sample"])
    p.add_argument("--device", help=doc["device"])
    p.add_argument("--resume", type=_bool, nargs="?", const=True, help=doc["resume"] + " (default on)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="always re-embed from scratch")
    p.add_argument("--overwrite", action="store_true", help=doc["overwrite"])
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--no-gallery", dest="gallery", action="store_false", help="skip gallery/index.html")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _field_docs() -> dict[str, str]:
    """The attribute docstrings of RegroupOptions (documented once, where each field is defined)."""
    import ast
    import inspect

    import rbvl.regroup.options as mod

    tree = ast.parse(inspect.getsource(mod))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "RegroupOptions":
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[a.target.id] = str(b.value.value)
    return docs


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers inside DataLoader workers
    from rbvl.records import RecordsError
    from rbvl.regroup import RegroupError, load_options, regroup
    from rbvl.regroup.pipeline import close_distributed

    try:
        regroup(load_options(config, args))
        close_distributed()  # under torchrun; a no-op on one process
    except (RegroupError, RecordsError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rerun the same command to resume the embedding)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
