"""DGA / DoGE: gradient alignment with the target from extra backward passes (DoGE, Fan et al. 2024, arXiv
2310.15393; DGA, Fan et al. 2024, arXiv 2410.02498)."""

from __future__ import annotations

import numpy as np
import torch

from rbvl.mixing.base import Cost, MixContext, Mixer, MixingError, Timer, input_tokens, publishes


def doge_update(
    p: np.ndarray,
    alignment: np.ndarray,
    avg_norm: float,
    lr: float,
    mu: float,
    dw_min: float,
    dw_max: float,
    smoothing: float,
) -> tuple[np.ndarray, np.ndarray]:
    """DoGE's multiplicative update; returns (new p, scores).

    scores_i = clip(lr · ⟨g_i, g_target⟩ / mean_j ‖g_j‖, lr·dw_min, lr·dw_max);
    p ← (1 − s)·softmax(log p + scores / μ) + s/m.
    """
    scores = np.clip(lr * alignment / (avg_norm + 1e-6), lr * dw_min, lr * dw_max)
    logits = np.log(p) + scores / mu
    new = np.exp(logits - logits.max())
    new = new / new.sum()
    return (1 - smoothing) * new + smoothing / len(p), scores


class DGAMixer(Mixer):
    """Gradient-alignment mixing, the naive way to get the signal R&B reads for free.

    Every `update_every` optimizer steps: for each domain i, one extra forward + backward on `batch_size` fresh
    samples of domain i (a reader separate from training), and one on `batch_size` target samples, each giving the
    gradient of its token-mean loss over the trainable parameters (clipped to `max_grad_norm`, as DoGE clips). Then
    the DoGE update (`doge_update`; Fan et al. 2024, the authors' `update_domain_weights`, out-of-domain target
    form): scores_i = clip(lr·⟨g_i, g_target⟩ / mean‖g_j‖), p ← softmax(log p + scores/μ), smoothed. DGA (Fan,
    Grangier & Ablin 2024) applies the same alignment online as sampling weights, which is what p is here. Defaults
    are DoGE's config: μ = 0.01, dw_min = 0, dw_max = 5, smoothing 0, max_grad_norm 5, an update every step. The
    gradients are taken with `torch.autograd.grad`, so the training gradients are never touched.
    """

    name = "dga"

    def __init__(self, n_domains: int, cfg, ctx: MixContext):
        if ctx.domain_batch is None or ctx.target_batch is None or ctx.per_sample_loss is None:
            raise MixingError("dga needs domain_batch, target_batch and per_sample_loss in MixContext")
        self.m, self.cfg = n_domains, cfg
        self.p = np.full(n_domains, 1.0 / n_domains)
        self.costs = Cost(ctx.flops_per_token)
        self.draws = 0  # batches drawn from the held-out readers so far (the readers are seeded by it)

    @property
    def proportions(self) -> list[float]:
        return self.p.tolist()

    def observe(self, inputs, meta, loss_sum, tokens, token_loss=None) -> None:
        pass

    def _grad(self, ctx: MixContext, inputs: dict, params: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        loss_sum, tokens = ctx.per_sample_loss(inputs)
        loss = loss_sum.sum() / tokens.sum().clamp(min=1)  # token mean, as DoGE's per-domain loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(grads, params)]
        )
        norm = flat.norm()
        if self.cfg.max_grad_norm > 0 and norm > self.cfg.max_grad_norm:
            flat = flat * (self.cfg.max_grad_norm / (norm + 1e-6))
        n = input_tokens(inputs)
        self.costs.add(forward=n, backward=n)
        return flat, loss.item()

    @publishes
    def step(self, step: int, ctx: MixContext) -> dict | None:
        if step % self.cfg.update_every:
            return None
        with Timer(self.costs):
            params = [p for p in ctx.model.parameters() if p.requires_grad]
            was_training = ctx.model.training
            ctx.model.eval()  # no dropout in the measurement
            grads, losses = [], []
            for d in range(self.m):
                inputs, _ = ctx.domain_batch(d, self.cfg.batch_size)
                g, loss = self._grad(ctx, inputs, params)
                grads.append(g)
                losses.append(loss)
            inputs, _ = ctx.target_batch(self.cfg.batch_size)
            g_target, target_loss = self._grad(ctx, inputs, params)
            ctx.model.train(was_training)
            self.draws += 1
            train = torch.stack(grads).double()  # (m, P)
            alignment = (train @ g_target.double()).numpy()  # (m,)
            avg_norm = train.norm(dim=1).mean().item()
            lr = ctx.lr() if ctx.lr is not None else 1e-4  # DoGE's fallback when no scheduler
            c = self.cfg
            self.p, scores = doge_update(self.p, alignment, avg_norm, lr, c.mu, c.dw_min, c.dw_max, c.smoothing)
            self.costs.updates += 1
        return {
            "p": self.p.tolist(),
            "alignment": alignment.tolist(),
            "scores": scores.tolist(),
            "loss": losses,
            "target_loss": target_loss,
        }

    def state_dict(self) -> dict:
        return {"p": self.p.tolist(), "draws": self.draws, "cost": self.costs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.draws = np.asarray(state["p"]), int(state["draws"])
        self.costs.load_state_dict(state["cost"])

    @property
    def cost(self) -> dict:
        return self.costs.as_dict()
