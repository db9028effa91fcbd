"""What a cluster does to a run: strict metrics, divergence, silent no-ops, preemption (issue 20, training side)."""

import json
import math

import torch

from rbvl.train.metrics import MetricsLogger


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"bare {name} in a metrics line")

    return json.loads(line, parse_constant=refuse)


def test_metrics_are_strict_json_at_any_depth(tmp_path):
    metrics = MetricsLogger(tmp_path, ["a", "b"], tensorboard=False)
    nan, inf = float("nan"), float("inf")
    metrics.log(
        "balance",
        3,
        gram=[[nan, 1.0], [inf, -inf]],
        loss_per_domain=torch.tensor([nan, 2.0]),
        nested={"x": (nan, 1)},
        loss=nan,
    )
    row = _strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["gram"] == [[None, 1.0], [None, None]]
    assert row["loss_per_domain"][0] is None and math.isclose(row["loss_per_domain"][1], 2.0)
    assert row["nested"] == {"x": [None, 1]} and row["loss"] is None
