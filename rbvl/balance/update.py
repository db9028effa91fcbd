"""From domain gradients to proportions: the Gram matrix G, its unbiased diagonal, and the update G → p.

The paper's update is p = softmax(λ · G q / ‖G q‖), replacing p every window. The options here (`update`,
`temperature`; the Balancer adds an EMA of G) and the estimator of G are derived in docs/balance.md.
"""

from __future__ import annotations

import logging
import math
import operator

import torch

log = logging.getLogger(__name__)

UPDATES = ("replace", "mirror")
TEMPERATURES = ("fixed", "sqrt_m")


def gram(domain_grads: torch.Tensor) -> torch.Tensor:
    """G_ij = g_i · g_j for the (m, P) domain gradients, in float64."""
    g = domain_grads.double()
    return g @ g.T  # (m, m)


def unbiased_diagonal(sum_sq, sq_sums, tokens, tokens_sq) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) U-statistic estimates of ‖g_i‖² over micro-batches, and (m,) bool: where it is defined.

    With s_ik domain i's gradient sum in micro-batch k and T_ik its tokens (T_i = Σ_k T_ik), micro-batches drawn
    independently with E[s_ik] = T_ik g_i give E[s_ik · s_il] = T_ik T_il ‖g_i‖² for k ≠ l, hence

        G_ii = Σ_{k≠l} s_ik · s_il / Σ_{k≠l} T_ik T_il = (‖Σ_k s_ik‖² − Σ_k ‖s_ik‖²) / (T_i² − Σ_k T_ik²),

    unbiased, while the plug-in ‖Σ_k s_ik‖² / T_i² adds Σ_k E‖s_ik − T_ik g_i‖² / T_i² (tr Σ_i / n_i). Defined
    when at least two micro-batches hold domain i (the denominator is then > 0); elsewhere 0 and `ok` is False.

    Args:
        sum_sq: (m,) ‖Σ_k s_ik‖² (the window's sum, squared).
        sq_sums: (m,) Σ_k ‖s_ik‖².
        tokens: (m,) T_i.
        tokens_sq: (m,) Σ_k T_ik².
    """
    sum_sq, sq_sums, tokens, tokens_sq = (
        torch.as_tensor(x, dtype=torch.float64) for x in (sum_sq, sq_sums, tokens, tokens_sq)
    )
    den = tokens**2 - tokens_sq
    ok = den > 0
    return torch.where(ok, (sum_sq - sq_sums) / torch.where(ok, den, 1.0), 0.0), ok


GRAM_ESTIMATORS = ("unbiased", "plugin", "shrunk")


def shrink_gram(plugin_gram: torch.Tensor, unbiased_diag: torch.Tensor) -> torch.Tensor:
    """(m, m) the Gram of the shrunk domain gradients c_i ĝ_i: G̃_ij = c_i c_j ĝ_i · ĝ_j, c_i = Ĝ_ii / (ĝ_i · ĝ_i).

    ĝ_i · ĝ_i (the plug-in) estimates ‖g_i‖² + tr Σ_i / T_i and the unbiased Ĝ_ii estimates ‖g_i‖², so c_i is the
    share of the window gradient's squared norm that is signal. It is the Wiener (posterior-mean) factor for
    g_i ~ N(0, τ_i² I) observed with noise N(0, σ_i² I / T_i): E[g_i | ĝ_i] = τ_i² / (τ_i² + σ_i² / T_i) · ĝ_i, with
    τ_i² d and σ_i² d / T_i read off the two diagonals. A domain whose window gradient is mostly sampling noise (its
    answers cannot be learned; it was starved in the window) gets c_i ≈ 0 and a score near 0 instead of a noisy one
    that softmax turns into weight. c_i is clipped to [0, 1] (Ĝ_ii can be negative or exceed the plug-in when it fell
    back to an earlier window's value); a domain with no gradient keeps c_i = 1 (nothing to shrink).
    """
    plugin = plugin_gram.diagonal()
    c = torch.where(plugin > 0, unbiased_diag.to(plugin) / plugin.clamp(min=torch.finfo(plugin.dtype).tiny), 1.0)
    c = c.clamp(0.0, 1.0)
    return plugin_gram * c[:, None] * c[None, :]


def checked_count(what: str, value, low: int, note: str = "") -> int:
    """`value` as an int >= `low` (a numpy or 0-dim torch integer counts; a bool or a float does not), or a
    ValueError naming `what` (and `note`, what the count means)."""
    is_int = not isinstance(value, bool) and hasattr(value, "__index__")
    if not is_int or operator.index(value) < low:
        raise ValueError(f"{what} must be an int >= {low}{note}, got {value!r}")
    return operator.index(value)


def update_proportions(G, q=None, lam: float = 3.0, **options):
    """p = softmax(λ · G q / ‖G q‖): domains whose gradients align with the target mixture q get more weight."""
    return update_proportions_with_info(G, q, lam, **options)[0]


def checked_target(q, m: int) -> list[float] | None:
    """The target mixture q as m floats (None stays None: uniform), or a ValueError saying what is wrong with it: one
    share per domain id, each finite and ≥ 0, not all zero (they need not sum to 1)."""
    if q is None:
        return None
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().reshape(-1).tolist()
    if isinstance(q, (str, bytes, dict)) or not hasattr(q, "__len__"):
        raise ValueError(f"target: a list of {m} shares, one per domain id in order, got {type(q).__name__} {q!r}")
    try:
        values = [float(x) for x in q]
    except (TypeError, ValueError):
        raise ValueError(f"target: a list of {m} numbers, one share per domain id in order, got {q!r}") from None
    if len(values) != m:
        raise ValueError(f"target has {len(values)} shares for {m} domains (one per domain id 0..{m - 1})")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"target shares must be finite and >= 0, got {values}")
    if not any(values):  # an empty eval set's counts, say: no mixture to aim at
        raise ValueError(f"target shares are all 0: give some domain a share (target=None is uniform), got {values}")
    return values


def update_proportions_with_info(
    G,
    q=None,
    lam: float = 3.0,
    *,
    prev=None,
    floor: float = 0.0,
    smoothing: float = 0.0,
    update: str = "replace",
    eta: float = 0.0,
    temperature: str = "fixed",
    pull: float = 0.0,
    anchor=None,
    never_seen=None,
):
    """`update_proportions`, plus a dict for logging: ‖G q‖, the domains with no gradient, why an update was skipped.

    The score is the unit vector u = G q / ‖G q‖ (the first-order gain of each domain for the target loss,
    L(θ − η Σ_j p_j g_j; q) ≈ L − η qᵀ G p).

    - `update="replace"` (the paper, Ge et al. 2025): p = softmax(c · λ · u), forgetting the previous p.
    - `update="mirror"`: one mirror-descent (exponentiated-gradient) step from the previous p on the linear gain
      uᵀp, p = argmax_p c · η · uᵀp − KL(p ‖ p_prev) ∝ p_prev · exp(c · η · u) (Kivinen & Warmuth 1997; PiKE takes
      such a step because jumps of p upset Adam's moments). η = `eta`, or λ when `eta` is 0. Evidence accumulates
      over windows: a score that keeps its sign keeps moving p, so pair it with `floor` or `pull`.
    - `pull` γ (mirror only): the step starts from p_prev^(1−γ) · anchor^γ (`anchor`: where Balance started, uniform
      when None) instead of p_prev, so log p is an exponential average of the scores, log p − log anchor =
      η Σ_s (1 − γ)^s u_{t−s}: a score that keeps its sign moves log p to η u / γ, and scores of random sign (a window's
      noise) no longer add up to a random walk (their spread stays η σ / √(γ (2 − γ))). γ = 1 is `replace` around
      the anchor with λ = η; γ = 0 is the plain mirror step.
    - `temperature`: c = 1 (`fixed`), or c = √m (`sqrt_m`). u is a unit vector, so its entries have root mean
      square 1/√m and the paper's logits shrink like λ/√m; with `sqrt_m` the logits' root mean square is λ for
      any m (their spread about their mean is at most λ; the paper's λ = 3 at m = 64 is λ = 0.375 here).

    Degenerate cases keep p finite and on the simplex: a non-finite G or ‖G q‖ = 0 (nothing of the target was
    seen) keeps `prev` (uniform when None) and says so. A domain with a zero row in G scores 0 (`unseen` in the
    info). Where that is for want of data, the caller names it in `never_seen` (the Balancer does: no token of it in
    any window so far), and it keeps its share of `prev` (uniform when None) while the rule divides the rest among
    the others: a score of 0 would cut its share against positive scores, and so draw it still less, for no reason in
    its gradient. (A zero row for a domain that was seen, e.g. the shrunk G of a domain that is all noise, is a score.) `floor` makes p ← floor + (1 − m · floor) · p, so every p_i ≥ floor; `smoothing` s
    gives (1 − s) · p_new + s · prev. Both are off by default, as in the paper.
    """
    if update not in UPDATES or temperature not in TEMPERATURES:
        raise ValueError(f"update must be one of {UPDATES} and temperature one of {TEMPERATURES}")
    if not 0.0 <= pull <= 1.0:
        raise ValueError(f"pull must be in [0, 1], got {pull}")
    if not (lam >= 0 and eta >= 0):  # a negative step would turn the rule around: weight to the domains that hurt
        raise ValueError(f"lam and eta must be >= 0, got lam={lam}, eta={eta}")
    G = torch.as_tensor(G, dtype=torch.float64)
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(
            f"G must be a square (m, m) matrix of the domains' gradient dot products, got {tuple(G.shape)}"
        )
    m = G.shape[0]
    q = checked_target(q, m)
    q = torch.full((m,), 1.0 / m, dtype=torch.float64) if q is None else torch.as_tensor(q, dtype=torch.float64)
    q = q / q.sum() if q.sum() > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
    fallback = (
        torch.full((m,), 1.0 / m, dtype=torch.float64) if prev is None else torch.as_tensor(prev, dtype=torch.float64)
    )
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
    never_seen = sorted(set(never_seen or ()))
    if never_seen:
        log.info("balance: domains %s have never been drawn: they keep their share", never_seen)
    c = math.sqrt(m) if temperature == "sqrt_m" else 1.0
    if update == "mirror":
        logits = fallback.log() + c * (eta or lam) * gq / norm  # log p_prev + η u
        if pull > 0:  # (1 − γ) log p_prev + γ log anchor + η u
            start = (
                torch.full((m,), 1.0 / m, dtype=torch.float64)
                if anchor is None
                else torch.as_tensor(anchor, dtype=torch.float64)
            )
            logits = logits - pull * (fallback.log() - start.log())
    else:
        logits = c * lam * gq / norm
    p = torch.softmax(logits, dim=0)
    if 0 < len(never_seen) < m:  # no data, no move: they keep their share, the others divide the rest by the rule
        kept = torch.zeros(m, dtype=torch.bool)
        kept[never_seen] = True
        p = torch.where(
            kept, fallback / fallback.sum(), p / p[~kept].sum() * (1 - fallback[kept].sum() / fallback.sum())
        )
    if smoothing > 0 and prev is not None:
        p = (1 - smoothing) * p + smoothing * torch.as_tensor(prev, dtype=torch.float64)
    if floor > 0:  # p_i ≥ floor for every i: a floor's worth of uniform mass, the rest as computed
        floor = min(floor, 1.0 / m)
        p = floor + (1 - m * floor) * p / p.sum()
    return p / p.sum(), info


def diagnostics(G, q=None, plugin_diag=None) -> dict:
    """What to log about a window's (m, m) G (unbiased diagonal): per domain, ‖g_i‖ = √max(G_ii, 0) (`grad_norm`),
    the cosine of g_i with the target gradient Σ_j q_j g_j, (G q)_i / (‖g_i‖ √(qᵀ G q)) (`alignment`, None where a
    norm is not positive), and with `plugin_diag` the estimator's noise, plug-in minus unbiased G_ii (`gram_noise`)."""
    G = torch.as_tensor(G, dtype=torch.float64)
    m = G.shape[0]
    q = checked_target(q, m)
    q = torch.full((m,), 1.0 / m, dtype=torch.float64) if q is None else torch.as_tensor(q, dtype=torch.float64)
    q = q / q.sum() if q.sum() > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
    norms = G.diagonal().clamp(min=0).sqrt()
    target = float(q @ G @ q)
    gq = G @ q
    ok = (norms > 0) & (target > 0) & torch.isfinite(gq)
    cos = (gq / (norms * math.sqrt(max(target, 0.0))).clamp(min=1e-300)).clamp(-1, 1)
    out = {"grad_norm": norms.tolist(), "alignment": [c if k else None for c, k in zip(cos.tolist(), ok.tolist())]}
    if plugin_diag is not None:
        out["gram_noise"] = (torch.as_tensor(plugin_diag, dtype=torch.float64) - G.diagonal()).tolist()
    return out
