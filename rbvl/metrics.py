"""Run metrics: one JSON line per event in `metrics.jsonl`, mirrored to TensorBoard.

A row is `{"kind": "train" | "eval" | "balance", "step": N, ...scalars or lists}`. Lists (proportions, per-domain
losses) are written to TensorBoard as one scalar per domain under a shared tag, so they plot as a family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, domain_names: list[str], tensorboard: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.names = domain_names
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None:
            return
        for key, value in row.items():
            if key in ("kind", "step"):
                continue
            if isinstance(value, list) and len(value) == len(self.names) and all(_is_num(v) for v in value):
                self.tb.add_scalars(f"{kind}/{key}", dict(zip(self.names, value)), step)
            elif _is_num(value):
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint's step, so the file reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _plain(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
