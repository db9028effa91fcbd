"""From domain gradients to proportions: the Gram matrix G and the paper's update p = softmax(λ · G q / ‖G q‖)."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def gram(domain_grads: torch.Tensor) -> torch.Tensor:
    """G_ij = g_i · g_j for the (m, P) domain gradients, in float64."""
    g = domain_grads.double()
    return g @ g.T  # (m, m)


def update_proportions(G, q=None, lam: float = 3.0, *, prev=None, floor: float = 0.0, smoothing: float = 0.0):
    """p = softmax(λ · G q / ‖G q‖): domains whose gradients align with the target mixture q get more weight."""
    return update_proportions_with_info(G, q, lam, prev=prev, floor=floor, smoothing=smoothing)[0]


def update_proportions_with_info(G, q=None, lam: float = 3.0, *, prev=None, floor: float = 0.0, smoothing: float = 0.0):
    """`update_proportions`, plus a dict for logging: ‖G q‖, the domains with no gradient, why an update was skipped.

    Degenerate cases keep p finite and on the simplex: a non-finite G or ‖G q‖ = 0 (nothing of the target was
    seen) keeps `prev` (uniform when None) and says so; a domain never seen has a zero row in G, so its score is 0
    and it keeps a defined share. `floor` makes p ← floor + (1 − m · floor) · p, so every p_i ≥ floor; `smoothing` s
    gives (1 − s) · p_new + s · prev. Both are off by default, as in the paper.
    """
    G = torch.as_tensor(G, dtype=torch.float64)
    m = G.shape[0]
    q = torch.full((m,), 1.0 / m, dtype=torch.float64) if q is None else torch.as_tensor(q, dtype=torch.float64)
    q = q / q.sum() if q.sum() > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
    fallback = torch.full((m,), 1.0 / m, dtype=torch.float64) if prev is None else torch.as_tensor(prev).double()
    unseen = [i for i in range(m) if G[i, i] == 0]
    info = {"gq_norm": 0.0, "degenerate": None, "unseen": unseen}
    if not torch.isfinite(G).all():
        info["degenerate"] = "non-finite Gram matrix"
        log.warning("balance: the Gram matrix is not finite; p keeps its previous value")
        return fallback.clone(), info
    gq = G @ q  # (m,)
    norm = gq.norm().item()
    info["gq_norm"] = norm
    if norm == 0 or not math.isfinite(norm):
        info["degenerate"] = "G q = 0 (no gradient aligned with the target in this window)"
        log.warning("balance: ‖G q‖ = 0, p keeps its previous value")
        return fallback.clone(), info
    if unseen:
        log.info("balance: domains %s have never been seen (score 0)", unseen)
    p = torch.softmax(lam * gq / norm, dim=0)
    if smoothing > 0 and prev is not None:
        p = (1 - smoothing) * p + smoothing * torch.as_tensor(prev, dtype=torch.float64)
    if floor > 0:  # p_i ≥ floor for every i: a floor's worth of uniform mass, the rest as computed
        floor = min(floor, 1.0 / m)
        p = floor + (1 - m * floor) * p / p.sum()
    return p / p.sum(), info
