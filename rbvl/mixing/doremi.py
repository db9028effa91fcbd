"""DoReMi (Xie et al. 2023, arXiv 2305.10429): clipped excess loss against a reference model, exponentiated-gradient
update with smoothing."""

from __future__ import annotations

import numpy as np
import torch

from rbvl.mixing.base import Cost, MixContext, Mixer, Timer, domain_ids, input_tokens, publishes, token_losses


def doremi_update(p: np.ndarray, scores: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """p ← (1 − c)·softmax(log p + η·λ) + c/m (DoReMi Algorithm 1; the authors' `update_domain_weights`)."""
    logits = np.log(p) + eta * scores
    new = np.exp(logits - logits.max())
    new = new / new.sum()
    return (1 - smoothing) * new + smoothing / len(p)


class DoReMiMixer(Mixer):
    """DoReMi (Xie et al. 2023): up-weight the domains where the model trails a reference model most.

    For each training micro-batch, the frozen reference model (`mixing.reference`: a finished run, e.g. stratified,
    on the same domains) runs one extra forward pass on the same inputs. Per domain i seen in the step, the excess
    loss λ_i = mean over domain i's label tokens of max(ℓ_θ − ℓ_ref, 0) (clipped per token, as the authors' code;
    per sample when the loop passes no `token_loss`); a domain absent from the step keeps its previous λ_i. After
    every optimizer step: p ← (1 − c)·softmax(log p + η·λ) + c/m with η = 1, c = 1e-3 (the paper's values). DoReMi
    used these weights to reweight a proxy model's loss and then averaged them over training; here, as in online
    variants, they are the sampling proportions (the running average is logged as `p_avg`). The reference forward
    pass is part of the cost, and so is training the reference run (reported separately by `rbvl experiment`).
    """

    name = "doremi"

    def __init__(self, n_domains: int, cfg, reference, flops_per_token: float = 0.0):
        self.m, self.cfg, self.reference = n_domains, cfg, reference
        if reference is not None:
            reference.eval()
            for param in reference.parameters():
                param.requires_grad_(False)
        self.p = np.full(n_domains, 1.0 / n_domains)
        self.scores = np.zeros(n_domains)
        self.p_sum, self.n_updates = np.zeros(n_domains), 0
        self.costs = Cost(flops_per_token)  # the reference has the trained model's shape
        self._reset_window()

    def _reset_window(self):
        self.excess = np.zeros(self.m)
        self.tokens = np.zeros(self.m)

    @property
    def proportions(self) -> list[float]:
        return self.p.tolist()

    @torch.no_grad()
    def observe(self, inputs, meta, loss_sum, tokens, token_loss=None) -> None:
        with Timer(self.costs):
            ref_loss, mask = token_losses(self.reference, inputs)  # (B, T−1)
            self.costs.add(forward=input_tokens(inputs))
            d = domain_ids(meta)
            if token_loss is not None:
                excess = ((token_loss.float() - ref_loss).clamp(min=0) * mask).sum(1)  # (B,)
            else:
                excess = (loss_sum.float() - (ref_loss * mask).sum(1)).clamp(min=0)  # (B,) per-sample clip
            np.add.at(self.excess, d.numpy(), excess.double().cpu().numpy())
            np.add.at(self.tokens, d.numpy(), tokens.double().cpu().numpy())

    @publishes
    def step(self, step: int, ctx: MixContext) -> dict | None:
        with Timer(self.costs):
            seen = self.tokens > 0
            self.scores = np.where(seen, self.excess / np.maximum(self.tokens, 1), self.scores)
            self._reset_window()
            if step % self.cfg.update_every:
                return None
            self.p = doremi_update(self.p, self.scores, self.cfg.eta, self.cfg.smoothing)
            self.p_sum += self.p
            self.n_updates += 1
            self.costs.updates += 1
            return {
                "p": self.p.tolist(),
                "excess_loss": self.scores.tolist(),
                "p_avg": (self.p_sum / self.n_updates).tolist(),
            }

    def state_dict(self) -> dict:
        return {
            "p": self.p.tolist(),
            "scores": self.scores.tolist(),
            "p_sum": self.p_sum.tolist(),
            "n_updates": self.n_updates,
            "window": [self.excess.tolist(), self.tokens.tolist()],
            "cost": self.costs.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.p, self.scores = np.asarray(state["p"]), np.asarray(state["scores"])
        self.p_sum, self.n_updates = np.asarray(state["p_sum"]), int(state["n_updates"])
        self.excess, self.tokens = (np.asarray(x, dtype=np.float64) for x in state["window"])
        self.costs.load_state_dict(state["cost"])

    @property
    def cost(self) -> dict:
        return self.costs.as_dict()
