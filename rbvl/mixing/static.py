"""Static strategies: `stratified` (uniform over domains), `natural` (by domain size), `manual` (named weights).

p is set once, at step 0, and never changes; `initial_proportions` is also where every adaptive strategy starts.
"""

from __future__ import annotations

import numpy as np

from rbvl.data import DataError
from rbvl.mixing.base import STATIC, Cost, MixContext, Mixer, simplex


def initial_proportions(strategy: str, domains, weights: dict | None = None) -> list[float]:
    """p at step 0: by size (`natural`), from named weights (`manual`), else uniform (`stratified`, `rnb`, the peers).

    Args:
        strategy: `mixing.strategy`.
        domains: the manifest's `Domains` (rbvl.data.load_domains).
        weights: `mixing.weights`, {domain name or index: weight} (`manual` only).
    """
    m = len(domains)
    if strategy == "natural":
        p = np.array([d.n_train for d in domains.domains], dtype=float)
    elif strategy == "manual":
        p = np.zeros(m)
        for key, w in (weights or {}).items():
            p[_domain_index(str(key), domains.names)] = float(w)
        if p.sum() <= 0:
            raise DataError("mixing.weights give every domain weight 0")
    else:
        p = np.ones(m)
    return (p / p.sum()).tolist()


def _domain_index(key: str, names: list[str]) -> int:
    if key in names:
        return names.index(key)
    if key.isdigit() and int(key) < len(names):
        return int(key)
    raise DataError(f"mixing.weights names unknown domain '{key}' (domains: {', '.join(names)})")


class StaticMixer(Mixer):
    """`stratified` / `natural` / `manual`: p is fixed; nothing to observe, no cost."""

    def __init__(self, name: str, p: list[float]):
        if name not in STATIC:
            raise ValueError(f"{name!r} is not a static strategy ({', '.join(STATIC)})")
        self.name, self.p = name, simplex(p)

    @property
    def proportions(self) -> list[float]:
        return list(self.p)

    def step(self, step: int, ctx: MixContext, skipped: bool = False) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {"p": self.p}

    def load_state_dict(self, state: dict) -> None:
        if state:  # rbvl 0.3 saved no state for a static run
            self.p = list(state["p"])

    @property
    def cost(self) -> dict:
        return Cost().as_dict()
