"""What the benchmarks share: alternating rounds, medians and ratios of them, thread and logging setup.

Every bench measures its sides (arms, modes, strategies) in rounds within one process, each side once per round, so
that drift in the machine's speed hits every side alike; a side's figure is its median over the rounds, and a
comparison is the ratio of two medians, or the median of the ratios within each round (robust to drift between rounds).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence

import torch

ORDERS = ("fixed", "rotate", "mirror")


def alternate(
    sides: Sequence[str],
    rounds: int,
    measure: Callable[[str, int], float],
    order: str = "fixed",
    warmup: int = 0,
    after_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """`measure(side, r)` for every side in every round r; returns each side's figures, round by round.

    order: "fixed" (the sides as given, every round), "rotate" (round r starts at side r mod n), "mirror" (as given in
    odd rounds, reversed in even ones). The first `warmup` rounds run but are not kept; `after_round(r, figures)`
    follows every kept round.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: choose from {', '.join(ORDERS)}")
    figures: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(warmup + rounds):
        if order == "rotate":
            turn = list(sides[r % len(sides) :]) + list(sides[: r % len(sides)])
        elif order == "mirror" and r % 2 == 0:
            turn = list(reversed(sides))
        else:
            turn = list(sides)
        for side in turn:
            value = measure(side, r)
            if r >= warmup:
                figures[side].append(value)
        if after_round is not None and r >= warmup:
            after_round(r, figures)
    return figures


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    """Each side's median over its rounds."""
    return {side: statistics.median(values) for side, values in figures.items()}


def paired_ratio(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The median over rounds of x / y within each round."""
    return statistics.median(x / y for x, y in zip(xs, ys))


def median_interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float, float] | None:
    """A distribution-free interval for the median of what `values` sample (e.g. the per-round ratios): the j-th
    smallest and j-th largest value, for the largest j whose coverage, 1 − 2·P(Binomial(n, ½) < j), is still at least
    `level`; returns (low, high, coverage), or None when even the smallest and largest cover less (four rounds or
    fewer: the smallest and largest of four cover 88 %, of five 94 %, of seven 98 %). It describes this run's rounds:
    two runs on a shared machine can land further apart than either interval is wide."""
    xs, n = sorted(values), len(values)
    best = None
    for j in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        if coverage < level:
            break
        best = (xs[j - 1], xs[n - j], coverage)
    return best


def verdict(interval: tuple[float, float, float] | None, goal: float, more: str = "--rounds") -> str:
    """Whether a ratio's interval says it meets `goal` (at least) in this run: met, not met, or not decided at this
    run's noise (`more`: the option that adds rounds)."""
    if interval is None:
        return f"too few rounds to decide (5 at least: {more})"
    low, high, _ = interval
    if low >= goal:
        return "met"
    if high < goal:
        return "not met"
    return f"not decided at this noise (more {more} narrow the interval)"


def ratio_line(ratio: float, goal: float) -> str:
    """The closing line of a two-sided bench: the ratio of the medians and the goal it is held to."""
    return f"  ratio {ratio:.3f}   (goal >= {goal})"


def set_threads(n: int) -> None:
    """torch's intra-op threads in this process (0 leaves torch's default)."""
    if n:
        torch.set_num_threads(n)


def quiet_training() -> None:
    """Training runs inside a bench log warnings only, and tokenizers stay single-threaded in loader workers."""
    logging.getLogger("rbvl").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
