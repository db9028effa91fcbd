"""ODM: Online Data Mixing (Albalak et al. 2023, arXiv 2312.02406): EXP3 over domains, the training loss as reward."""

from __future__ import annotations

import math

import numpy as np

from rbvl.mixing.base import Cost, MixContext, Mixer, Timer, domain_ids, publishes, simplex


def odm_eps(t: int, k: int) -> float:
    """ε_t = min(1/K, sqrt(ln K / (K·t))): EXP3's exploration rate at iteration t (ODM, Algorithm 1)."""
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def exp3_proportions(rewards: np.ndarray, eps_prev: float, eps: float) -> np.ndarray:
    """π_i = (1 − K·ε_t) · exp(ε_{t−1} R̂_i) / Σ_j exp(ε_{t−1} R̂_j) + ε_t."""
    k = len(rewards)
    z = eps_prev * np.asarray(rewards, dtype=np.float64)
    w = np.exp(z - z.max())
    return (1 - k * eps) * w / w.sum() + eps


class ODMMixer(Mixer):
    """Online Data Mixing (Albalak et al. 2023): each domain is an EXP3 arm, its reward the training loss.

    After every optimizer step, for each domain i that had samples in the step (mixed mini-batches, as the authors'
    `mixed_minibatches` runs): L_i = its token-mean training loss, and the smoothed importance-weighted reward
    R̂_i ← α·R̂_i + (1 − α)·L_i / π_i. Every `update_every` steps after `warmup_steps`:
    ε_t = min(1/K, sqrt(ln K / (K·t))), π_i = (1 − K ε_t)·softmax(ε_{t−1}·R̂)_i + ε_t (ODM Algorithm 1; the authors'
    `Exp3WeightUpdater` computes exactly this, their smoothed-mean runs add α). Defaults as the authors' scripts:
    update every step; they warmed up 2,000 of 100,000 steps on the original weights (`warmup_steps` here, 0 by
    default) and ran α = 0.5 for their final 1B model (`alpha`, default 0.9 as the paper's text). No extra passes:
    the loss is the one the training step already computed.
    """

    name = "odm"

    def __init__(self, n_domains: int, cfg, initial: list[float] | None = None):
        self.k, self.cfg = n_domains, cfg
        self.p = np.asarray(simplex(initial if initial is not None else [1.0] * n_domains))
        self.rewards = np.zeros(n_domains)
        self.eps, self.eps_prev = 1.0 / n_domains, None
        self.costs = Cost()
        self._reset_window()

    def _reset_window(self):
        self.loss_sum = np.zeros(self.k)
        self.tokens = np.zeros(self.k)

    @property
    def proportions(self) -> list[float]:
        return self.p.tolist()

    def observe(self, inputs, meta, loss_sum, tokens, token_loss=None) -> None:
        with Timer(self.costs):
            d = domain_ids(meta).numpy()
            np.add.at(self.loss_sum, d, loss_sum.detach().double().cpu().numpy())
            np.add.at(self.tokens, d, tokens.detach().double().cpu().numpy())

    @publishes
    def step(self, step: int, ctx: MixContext) -> dict | None:
        with Timer(self.costs):
            seen = self.tokens > 0
            losses = np.where(seen, self.loss_sum / np.maximum(self.tokens, 1), 0.0)
            a = self.cfg.alpha
            reward = self.cfg.reward_scale * losses / self.p
            self.rewards = np.where(seen, a * self.rewards + (1 - a) * reward, self.rewards)
            self._reset_window()
            self.eps_prev, self.eps = self.eps, odm_eps(step, self.k)
            if step <= self.cfg.warmup_steps or step % self.cfg.update_every:
                return None
            self.p = exp3_proportions(self.rewards, self.eps_prev, self.eps)
            self.costs.updates += 1
            return {"p": self.p.tolist(), "rewards": self.rewards.tolist(), "eps": self.eps, "loss": losses.tolist()}

    def state_dict(self) -> dict:
        return {
            "p": self.p.tolist(),
            "rewards": self.rewards.tolist(),
            "eps": self.eps,
            "eps_prev": self.eps_prev,
            "window": [self.loss_sum.tolist(), self.tokens.tolist()],
            "cost": self.costs.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.p, self.rewards = np.asarray(state["p"]), np.asarray(state["rewards"])
        self.eps, self.eps_prev = state["eps"], state["eps_prev"]
        self.loss_sum, self.tokens = (np.asarray(x, dtype=np.float64) for x in state["window"])
        self.costs.load_state_dict(state["cost"])

    @property
    def cost(self) -> dict:
        return self.costs.as_dict()
