"""Aioli (Chen et al. 2024, arXiv 2411.05735): rounds of LearnParams (short sweeps of perturbed mixtures, eval-loss
measurements, a solved interaction matrix), then an exponentiated-gradient update."""

from __future__ import annotations

import numpy as np

from rbvl.mixing.base import Cost, MixContext, Mixer, MixingError, Timer, domain_ids, publishes, rng_state


def perturbed_mixture(j: int, m: int, one_hot_factor: float) -> np.ndarray:
    """Aioli's LearnParams mixture for domain j: f on j, (1 − f)/(m − 1) on every other domain."""
    w = np.full(m, (1 - one_hot_factor) / max(1, m - 1))
    w[j] = one_hot_factor
    return w


def aioli_solve(graph: np.ndarray, one_hot_factor: float) -> np.ndarray:
    """A from the measured loss drops: graph[i, j] = Σ_l A[i, l]·W[j, l] with W's rows the perturbed mixtures, so
    A[i] = W⁻¹ graph[i] (the authors' `learn_params_subroutine`); f = 1 leaves graph as it is."""
    m = len(graph)
    if one_hot_factor == 1 or m == 1:
        return graph.copy()
    mix = np.stack([perturbed_mixture(j, m, one_hot_factor) for j in range(m)])  # (m, m)
    return np.stack([np.linalg.solve(mix, row) for row in graph])


def aioli_weights(
    a: np.ndarray, q: np.ndarray, eta: float, normalize: bool, ema: float | None, prev_ema, prev_weights
) -> tuple[np.ndarray, np.ndarray]:
    """One Aioli update; returns (weights (unnormalised), the smoothed matrix).

    normalise A (shift so min ≥ 0, divide by the sum) when asked; ema: Ā ← (1 − ema)·A + ema·Ā_prev and
    w = exp(η · m·qᵀĀ); without ema the update compounds: w ← w_prev · exp(η · m·qᵀA). With uniform q, m·qᵀA is the
    column sum the authors use (loss drop of every eval domain from training on domain j).
    """
    a = a.copy()
    if normalize:
        if a.min() < 0:
            a -= a.min()
        if a.sum() > 0:
            a /= a.sum()
    m = len(q)
    if ema is not None:
        smoothed = a if prev_ema is None else (1 - ema) * a + ema * prev_ema
        return np.exp(eta * m * q @ smoothed), smoothed
    base = np.ones(m) if prev_weights is None else prev_weights
    return base * np.exp(eta * m * q @ a), a


class AioliMixer(Mixer):
    """Aioli (Chen et al. 2024): measure how training on each domain moves every domain's eval loss, then mix.

    Training is cut into rounds of `update_steps` optimizer steps. Each round opens with LearnParams: for each of
    `lp_rounds` sweeps, the domains in a seeded random order, `lp_steps` steps on domain j's perturbed mixture
    (`one_hot_factor` on j, the rest spread evenly), then an eval-loss measurement; graph[:, j] += L_before − L_after.
    The averaged graph is solved for the interaction matrix A (`aioli_solve`), and the rest of the round trains on
    p ∝ exp(η · qᵀĀ) (`aioli_weights`; uniform q gives the authors' column sum). The LearnParams steps are ordinary
    training steps; the measurements are extra forward passes over the eval set (the cost). Defaults are the
    authors' Aioli-unrestricted script: η = 0.2, rounds of 250 steps (of 5,000), 4 sweeps × 4 steps,
    one_hot_factor 0.625, ema 0.1, normalised A.

    With DataLoader workers, the stream applies a new p `lag` batches late, so a LearnParams segment partly trains
    on the previous mixture; run aioli with `data.num_workers=0` (lag 0) for the authors' exact schedule. The
    mixtures actually drawn are logged (`drawn`) either way.
    """

    name = "aioli"

    def __init__(self, n_domains: int, cfg, q: list[float], ctx: MixContext, seed: int = 0):
        self.m, self.cfg, self.q, self.ctx = n_domains, cfg, np.asarray(q), ctx
        if cfg.update_steps <= self.lp_duration:
            raise MixingError(
                f"mixing.aioli.update_steps ({cfg.update_steps}) must exceed the LearnParams steps "
                f"(lp_rounds · lp_steps · m = {self.lp_duration})"
            )
        self.rng = np.random.default_rng(seed)
        self.costs = Cost(ctx.flops_per_token)
        self.weights = np.ones(n_domains)
        self.ema_graph = None
        self.prev_loss = None  # eval loss per domain before the current LearnParams segment
        self._new_round()
        self.p = perturbed_mixture(self.order[0], n_domains, cfg.one_hot_factor)

    @property
    def lp_duration(self) -> int:
        return self.cfg.lp_rounds * self.cfg.lp_steps * self.m

    def _new_round(self):
        self.order = np.concatenate([self.rng.permutation(self.m) for _ in range(self.cfg.lp_rounds)]).tolist()
        self.graph = np.zeros((self.m, self.m))
        self.drawn = np.zeros(self.m)

    @property
    def proportions(self) -> list[float]:
        return (self.p / self.p.sum()).tolist()

    def observe(self, inputs, meta, loss_sum, tokens, token_loss=None) -> None:
        if self.prev_loss is None:  # the first micro-batch: the model is still as it started, measure L_0
            with Timer(self.costs):
                self.prev_loss = self._measure(self.ctx)
        np.add.at(self.drawn, domain_ids(meta).numpy(), 1)

    def _measure(self, ctx: MixContext) -> np.ndarray:
        result = ctx.evaluate()
        self.costs.add(forward=int(sum(result.get("tokens_per_domain") or [0])))
        prev = self.prev_loss if self.prev_loss is not None else np.zeros(self.m)
        return np.array([x if x is not None else prev[i] for i, x in enumerate(result["loss_per_domain"])])

    @publishes
    def step(self, step: int, ctx: MixContext) -> dict | None:
        if self.prev_loss is None:
            raise MixingError("aioli: step() before any observe(); the loop must observe every micro-batch")
        c = self.cfg
        pos = (step - 1) % c.update_steps + 1  # 1..update_steps within the round
        with Timer(self.costs):
            if pos <= self.lp_duration and pos % c.lp_steps == 0:  # a LearnParams segment ends
                seg = pos // c.lp_steps - 1
                loss = self._measure(ctx)
                self.graph[:, self.order[seg]] += self.prev_loss - loss
                self.prev_loss = loss
                info = {"segment": seg, "eval_loss": loss.tolist(), "drawn": self.drawn.tolist()}
                self.drawn = np.zeros(self.m)
                if seg + 1 < len(self.order):
                    self.p = perturbed_mixture(self.order[seg + 1], self.m, c.one_hot_factor)
                    return {"p": self.proportions, **info}
                a = aioli_solve(self.graph / c.lp_rounds, c.one_hot_factor)
                ema = c.ema if c.ema > 0 else None
                self.weights, self.ema_graph = aioli_weights(
                    a, self.q, c.eta, c.normalize_a, ema, self.ema_graph, self.weights if ema is None else None
                )
                self.p = self.weights / self.weights.sum()
                self.costs.updates += 1
                return {"p": self.proportions, "interaction": a.tolist(), **info}
            if pos == c.update_steps:  # round ends: the loss here is the next round's L_0
                self.prev_loss = self._measure(ctx)
                self._new_round()
                self.p = perturbed_mixture(self.order[0], self.m, c.one_hot_factor)
                return {"p": self.proportions, "eval_loss": self.prev_loss.tolist()}
        return None

    def state_dict(self) -> dict:
        return {
            "p": self.p.tolist(),
            "weights": self.weights.tolist(),
            "ema_graph": None if self.ema_graph is None else self.ema_graph.tolist(),
            "prev_loss": None if self.prev_loss is None else self.prev_loss.tolist(),
            "order": list(self.order),
            "graph": self.graph.tolist(),
            "drawn": self.drawn.tolist(),
            "rng": rng_state(self.rng),
            "cost": self.costs.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.p, self.weights = np.asarray(state["p"]), np.asarray(state["weights"])
        self.ema_graph = None if state["ema_graph"] is None else np.asarray(state["ema_graph"])
        self.prev_loss = None if state["prev_loss"] is None else np.asarray(state["prev_loss"])
        self.order, self.graph = list(state["order"]), np.asarray(state["graph"])
        self.drawn = np.asarray(state["drawn"])
        self.rng.bit_generator.state = state["rng"]
        self.costs.load_state_dict(state["cost"])

    @property
    def cost(self) -> dict:
        return self.costs.as_dict()
