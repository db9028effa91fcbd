"""Run metrics: one JSON line per event in `metrics.jsonl`, mirrored to TensorBoard.

A row is `{"kind": "train" | "eval" | "balance", "step": N, ...scalars or lists}`. Lists (proportions, per-domain
losses) are written to TensorBoard as one scalar per domain under a shared tag, so they plot as a family.

Each row is appended with one write and flushed, so a run killed mid-write leaves at most a torn last line: readers
drop it with a warning (a torn line elsewhere is skipped and named too), and a resumed run rewrites the file
without it before appending.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class MetricsLogger:
    """metrics.jsonl (strict JSON, one row per log call), mirrored to the `logging.report_to` backends."""

    def __init__(
        self, run_dir: str | Path, domain_names: list[str], report_to=("tensorboard",), enabled: bool = True,
        config: dict | None = None, run_name: str | None = None,
    ):  # fmt: skip
        self.path = Path(run_dir) / "metrics.jsonl"
        self.names = domain_names
        self.enabled = enabled
        self.reporters = []
        if enabled:
            from rbvl.train.report import open_reporters

            self.reporters = open_reporters(report_to, Path(run_dir), config or {}, run_name or Path(run_dir).name)

    @classmethod
    def for_run(cls, cfg, names: list[str], enabled: bool) -> MetricsLogger:
        from rbvl.config import to_dict

        return cls(cfg.output_dir, names, report_to(cfg.logging), enabled, to_dict(cfg), Path(cfg.output_dir).name)

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")  # one write: a kill leaves a whole row or a torn last line
            f.flush()
        if not self.reporters:
            return
        flat, grouped = {}, {}
        for key, value in row.items():
            if key in ("kind", "step"):
                continue
            if (
                isinstance(value, list)
                and len(value) == len(self.names)
                and all(_is_num(v) or v is None for v in value)
            ):
                # per domain; a domain with no value at this step (none of its samples drawn since the last row) is
                # left out, the others are reported
                per_domain = {name: v for name, v in zip(self.names, value, strict=True) if v is not None}
                if per_domain:
                    grouped[key] = per_domain
            elif _is_num(value):
                flat[key] = value
        for reporter in self.reporters:
            reporter.scalars(kind, step, flat, grouped)

    def text(self, tag: str, text: str, step: int) -> None:
        """A block of text (sample generations) for the backends that show text."""
        for reporter in self.reporters:
            reporter.text(tag, text, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint's step, so the file reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in _read_rows(self.path) if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)  # a kill here leaves the old file or the new one, never half of it

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def report_to(logging_cfg) -> list[str]:
    """`logging.report_to`, less tensorboard when `logging.tensorboard` is false (the older switch)."""
    given = logging_cfg.report_to
    names = [n for n in ([given] if isinstance(given, str) else given) if n != "none"]
    return [n for n in names if n != "tensorboard" or logging_cfg.tensorboard]


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in _read_rows(path) if kind is None or r["kind"] == kind]


def mixture_summary(run_dir: str | Path) -> dict | None:
    """What a run's mixer did with p, from its metrics.jsonl (None when it never logged p: a static mixture).

    `updates` (how many times p was set), `p_mean` (each domain's p averaged over the updates: where the mixer put
    its weight), `p_final`, and `p_l1_median`: the median L1 change of p per update (0 = p stays; 2 = all the mass
    moves). Balance logs the change (`p_l1_change`); for a peer that logs p alone it comes from consecutive p.
    """
    rows = [r for r in read_metrics(run_dir) if r["kind"] not in ("train", "eval") and isinstance(r.get("p"), list)]
    if not rows:
        return None
    changes = [r["p_l1_change"] for r in rows if isinstance(r.get("p_l1_change"), (int, float))]
    if not changes:
        changes = [sum(abs(a - b) for a, b in zip(x["p"], y["p"])) for x, y in zip(rows, rows[1:])]
    m = len(rows[-1]["p"])
    ps = [r["p"] for r in rows if len(r["p"]) == m]
    return {
        "updates": len(rows),
        "p_mean": [sum(p[i] for p in ps) / len(ps) for i in range(m)],
        "p_final": rows[-1]["p"],
        "p_l1_median": sorted(changes)[len(changes) // 2] if changes else None,
    }


def _read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; lines that do not parse (a torn last line after a kill) are dropped, named."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "kind" not in row:
            where = "its torn last line" if n == len(lines) else f"line {n}, which does not parse"
            log.warning("%s: dropping %s (%d characters)", path, where, len(line))
            continue
        rows.append(row)
    return rows


def _plain(value):
    """A JSON-ready copy of `value`: tensors and arrays become lists, and a non-finite float at any depth (inside the
    Gram matrix, a per-domain loss) becomes null, so every line parses under strict JSON (no bare NaN or Infinity)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WindowStats:
    """Per-domain training loss between two log lines, from the per-token loss the step already computed.

    The sums stay on the loss's device and are read once per log line (`pop`), so a micro-batch never waits on the
    device; only the (B,) ids and token counts travel to it, without blocking.
    """

    def __init__(self, n_domains: int):
        self.m = n_domains
        self.input_tokens = 0  # tokens this rank's forward passes processed since step 0 (not reset: the run's FLOPs)
        self.reset()

    def reset(self):
        dev = self.stats.device if hasattr(self, "stats") else None  # stays where the losses are
        self.stats = torch.zeros(3, self.m, dtype=torch.float64, device=dev)  # (loss sum, tokens, samples) per domain
        self.steps = 0

    @torch.no_grad()
    def add(
        self, loss_sum: torch.Tensor, tokens: torch.Tensor, domain_ids: torch.Tensor, input_tokens: int = 0
    ) -> None:
        """One micro-batch: loss_sum, tokens, domain_ids are (B,) per sample (the loop counts `steps` itself)."""
        self.input_tokens += int(input_tokens)
        dev = loss_sum.device
        if self.stats.device != dev:
            self.stats = self.stats.to(dev, non_blocking=True)
        d = domain_ids.to(dev, torch.long, non_blocking=True)
        tokens = tokens.to(dev, torch.float64, non_blocking=True)
        rows = torch.stack([loss_sum.double(), tokens, torch.ones_like(tokens)])  # (3, B)
        self.stats.T.index_put_((d,), rows.T, accumulate=True)  # (3, m) += by domain; serial on the CPU

    def pop(self, dist) -> dict:
        stats = self.stats.to(dist.device)
        dist.all_reduce(stats)
        loss_sum, tokens, samples = stats.cpu()  # the one read of the window: at the log line
        steps = self.steps
        self.reset()
        per_domain = torch.where(tokens > 0, loss_sum / tokens.clamp(min=1), torch.full_like(tokens, float("nan")))
        return {
            "loss": (loss_sum.sum() / tokens.sum().clamp(min=1)).item(),
            "loss_per_domain": [None if math.isnan(x) else x for x in per_domain.tolist()],
            "samples_per_domain": samples.tolist(),
            "steps": steps,
        }

    def state_dict(self) -> dict:
        return {"stats": self.stats.cpu().clone(), "steps": self.steps, "input_tokens": self.input_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.stats = state["stats"].clone().double()
        self.steps = int(state["steps"])
        self.input_tokens = int(state["input_tokens"])


def format_eval(step: int, names: list[str], result: dict) -> str:
    # a domain with no label token left (data.max_length) shows as n/a rather than vanishing from the line
    parts = [f"{n}={v:.3f}" if v is not None else f"{n}=n/a" for n, v in zip(names, result["loss_per_domain"])]
    cut = [f"{result[k]} {k}" for k in ("truncated", "dropped") if result.get(k)]
    cut = f" ({', '.join(cut)} to data.max_length)" if cut else ""
    return f"eval @ {step}: mixture {result['loss']:.4f} | " + " ".join(parts) + cut
