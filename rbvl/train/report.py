"""Where metrics go besides metrics.jsonl: `logging.report_to: [tensorboard, wandb, mlflow]`.

    logging.report_to=[tensorboard,wandb]     # WANDB_MODE=offline, WANDB_PROJECT, WANDB_ENTITY as wandb reads them
    logging.report_to=[mlflow]                # MLFLOW_TRACKING_URI (default: a file store in OUTPUT_DIR/mlruns)

metrics.jsonl is always written and is what rbvl reads back (plots, compare, resume). The others mirror it: one
scalar per number, per-domain lists as `kind/key/domain`. wandb and mlflow are optional installs; asking for one
that is not installed is one line at the start. A resumed run continues the same wandb / mlflow run (its id is
kept in the run folder).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

BACKENDS = ("tensorboard", "wandb", "mlflow")


class ReportError(RuntimeError):
    """A reporting backend that cannot start (not installed); the message is the one line the user sees."""


def open_reporters(names, run_dir: Path, config: dict, run_name: str) -> list:
    """One reporter per name in `names` (from `logging.report_to`), each started."""
    makers = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
    return [makers[name](Path(run_dir), config, run_name) for name in names]


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReportError(
            f"logging.report_to names {extra}, which is not installed: pip install {extra} (or drop it from report_to)"
        ) from None


def _saved_id(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


class TensorBoard:
    """TensorBoard event files in OUTPUT_DIR/tensorboard; per-domain lists as one chart with a line per domain."""

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, kind: str, step: int, flat: dict, grouped: dict) -> None:
        for key, per_domain in grouped.items():
            self.writer.add_scalars(f"{kind}/{key}", per_domain, step)
        for key, value in flat.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run (honours WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY; project defaults to `rbvl`), files in OUTPUT_DIR."""

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        wandb = _require("wandb", "wandb")
        id_file = run_dir / ".wandb-run-id"
        run_id = _saved_id(id_file) or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rbvl"), name=run_name, id=run_id, resume="allow",
            dir=str(run_dir), config=config,
        )  # fmt: skip
        id_file.write_text(run_id)

    def scalars(self, kind: str, step: int, flat: dict, grouped: dict) -> None:
        row = {f"{kind}/{k}": v for k, v in flat.items()}
        row.update({f"{kind}/{k}/{d}": v for k, per in grouped.items() for d, v in per.items()})
        self.run.log(row, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: text}, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    """An MLflow run (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; default: a file store in OUTPUT_DIR/mlruns)."""

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        self.mlflow = _require("mlflow", "mlflow-skinny")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder: no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
            self.mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "rbvl"))
        id_file = run_dir / ".mlflow-run-id"
        resumed = _saved_id(id_file)
        self.run = self.mlflow.start_run(run_id=resumed, run_name=None if resumed else run_name)
        id_file.write_text(self.run.info.run_id)
        if not resumed:  # params are write-once in MLflow
            self.mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def scalars(self, kind: str, step: int, flat: dict, grouped: dict) -> None:
        row = {f"{kind}/{k}": v for k, v in flat.items()}
        row.update({f"{kind}/{k}/{d}": v for k, per in grouped.items() for d, v in per.items()})
        self.mlflow.log_metrics(row, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.mlflow.log_text(text, f"{tag}/step-{step}.md")

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
