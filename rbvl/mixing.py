"""Mixers: the strategies that set the domain proportions p during training, behind one interface.

    mixer = build_mixer(cfg.mixing.strategy, m, target=q, cfg_mixing=cfg.mixing, ctx=ctx, initial=p0)
    for step in range(1, max_steps + 1):
        for micro-batch:                                          # forward, then:
            mixer.observe(inputs, meta, loss_sum, tokens, token_loss=token_loss)
        optimizer.step()
        info = mixer.step(step, ctx)                               # after optimizer step `step` (1-based)
        if info and "p" in info:
            schedule.publish(info["p"], after_batch=last_index)    # the stream draws from the new p
    mixer.cost  # {"forward_tokens", "backward_tokens", "flops", "seconds", ...}: every strategy measured alike

Strategies (`mixing.strategy`): `stratified` / `natural` / `manual` (static: p never changes) and the peers R&B is
compared with, each written from its paper and the authors' public code:

- `odm`: Online Data Mixing (Albalak et al. 2023, arXiv 2312.02406): EXP3 over domains, training loss as reward.
- `dga`: gradient alignment (DoGE, Fan et al. 2024, arXiv 2310.15393; DGA, Fan et al. 2024, arXiv 2410.02498): extra
  backward passes on fresh batches of each domain and of the target, multiplicative update from the alignments.
- `doremi`: DoReMi (Xie et al. 2023, arXiv 2305.10429): clipped excess loss against a reference model,
  exponentiated-gradient update with smoothing.
- `aioli`: Aioli (Chen et al. 2024, arXiv 2411.05735): rounds of LearnParams (short sweeps of perturbed mixtures,
  eval-loss measurements, a solved interaction matrix), then an exponentiated-gradient update.

R&B itself (`rnb`) is the Balancer in rbvl/balance.py: it reads the Gram matrix off the ordinary backward pass.

Cost accounting is the same for every strategy: tokens through extra forward passes, tokens through extra backward
passes, FLOPs = flops_per_token · (forward_tokens + 2 · backward_tokens) (`flops_per_token` = forward FLOPs per token,
about 2 · parameters; a backward pass costs about twice a forward), and the wall-clock seconds spent inside the mixer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

STATIC = ("stratified", "natural", "manual")
PEERS = ("odm", "dga", "doremi", "aioli")


class MixingError(ValueError):
    """A mixer that cannot run with what it was given; the message names the setting."""


# ---------------------------------------------------------------------------------------------------------------------
# The interface the training loop calls
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MixContext:
    """What a mixer may use from the run; the training loop fills it in.

    Attributes:
        model: the (PEFT) model being trained.
        device: where inputs go.
        domain_batch: (d, n) → (inputs, meta): n fresh training samples of domain d from a separate seeded reader
            (never consumed by training; resumable, so a resumed run draws the same batches).
        target_batch: n → (inputs, meta): n samples of the eval (target) set, domains drawn by q.
        per_sample_loss: inputs → (loss_sum (B,), tokens (B,)) with grad: summed token loss and label tokens.
        evaluate: () → {"loss": q-weighted, "loss_per_domain": [...], "tokens_per_domain": [...]} on the eval set.
        flops_per_token: forward FLOPs per token of `model` (≈ 2 · parameters).
        load_reference: run_dir → frozen model from that run's final checkpoint (DoReMi's reference).
        lr: () → the current learning rate (DoGE scales its scores by it).
    """

    model: Any = None
    device: torch.device | str = "cpu"
    domain_batch: Callable[[int, int], tuple[dict, Any]] | None = None
    target_batch: Callable[[int], tuple[dict, Any]] | None = None
    per_sample_loss: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] | None = None
    evaluate: Callable[[], dict] | None = None
    flops_per_token: float = 0.0
    load_reference: Callable[[str], Any] | None = None
    lr: Callable[[], float] | None = None


@runtime_checkable
class Mixer(Protocol):
    """What every strategy provides (static ones included)."""

    name: str

    @property
    def proportions(self) -> list[float]:
        """Current p (length m, on the simplex)."""

    def observe(self, inputs: dict, meta: Any, loss_sum: torch.Tensor, tokens: torch.Tensor, token_loss=None) -> None:
        """After each training micro-batch's forward: `meta.domain_ids` (B,), detached `loss_sum` (B,) and `tokens`
        (B,); `token_loss` (B, T−1) detached per-token loss (0 where masked), optional (DoReMi clips per token)."""

    def step(self, step: int, ctx: MixContext) -> dict | None:
        """After optimizer step `step` (1-based): a log dict, with "p" when p changed, else None."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def cost(self) -> dict:
        """{"forward_tokens", "backward_tokens", "flops", "seconds", "updates"} spent by the mixer so far."""


def build_mixer(
    strategy: str,
    n_domains: int,
    target: list[float] | None,
    cfg_mixing: Any,
    ctx: MixContext,
    initial: list[float] | None = None,
    seed: int = 0,
) -> Mixer:
    """The mixer for `strategy`; `initial` = p at step 0 (static strategies and odm start there; the others start
    uniform, as their papers); `seed` seeds the mixer's own RNG (aioli's sweep order)."""
    q = _simplex(target if target is not None else [1.0] * n_domains)
    if strategy in STATIC:
        return StaticMixer(strategy, initial if initial is not None else [1.0] * n_domains)
    if strategy == "odm":
        return ODMMixer(n_domains, cfg_mixing.odm, initial)
    if strategy == "dga":
        return DGAMixer(n_domains, cfg_mixing.dga, ctx)
    if strategy == "doremi":
        if not getattr(cfg_mixing, "reference", ""):
            raise MixingError("mixing.strategy=doremi needs mixing.reference=RUN_DIR (a finished reference run)")
        if ctx.load_reference is None:
            raise MixingError("doremi: the training loop gave no load_reference in MixContext")
        reference = ctx.load_reference(cfg_mixing.reference)
        return DoReMiMixer(n_domains, cfg_mixing.doremi, reference, flops_per_token=ctx.flops_per_token)
    if strategy == "aioli":
        if ctx.evaluate is None:
            raise MixingError("aioli needs evaluate in MixContext (its LearnParams measure eval losses)")
        return AioliMixer(n_domains, cfg_mixing.aioli, q, ctx, seed=seed)
    raise MixingError(f"mixing.strategy={strategy!r} has no mixer here (rnb is the Balancer in rbvl/balance.py)")


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Cost:
    """Extra work a mixer did, measured the same way for every strategy."""

    flops_per_token: float = 0.0
    forward_tokens: int = 0
    backward_tokens: int = 0
    seconds: float = 0.0
    updates: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, forward: int = 0, backward: int = 0) -> None:
        self.forward_tokens += int(forward)
        self.backward_tokens += int(backward)

    def as_dict(self) -> dict:
        flops = self.flops_per_token * (self.forward_tokens + 2 * self.backward_tokens)
        return {
            "forward_tokens": self.forward_tokens,
            "backward_tokens": self.backward_tokens,
            "flops": flops,
            "seconds": self.seconds,
            "updates": self.updates,
            **self.extra,
        }

    def state_dict(self) -> dict:
        return {k: v for k, v in self.as_dict().items() if k != "flops"}

    def load_state_dict(self, state: dict) -> None:
        self.forward_tokens, self.backward_tokens = int(state["forward_tokens"]), int(state["backward_tokens"])
        self.seconds, self.updates = float(state["seconds"]), int(state["updates"])


class _Timer:
    """Adds the wall-clock time of a `with` block to a Cost."""

    def __init__(self, cost: Cost):
        self.cost = cost

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.cost.seconds += time.perf_counter() - self.t0


def input_tokens(inputs: dict) -> int:
    """Tokens a forward pass over `inputs` processes (attention mask when there is one)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())


def token_losses(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token loss (B, T−1) (0 where masked) and its mask (B, T−1), as the training loss defines it."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits  # (B, T, V)
    labels = inputs["labels"][:, 1:]  # (B, T−1)
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss, labels != -100


def _simplex(p) -> list[float]:
    a = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    if not np.isfinite(a).all() or a.sum() <= 0:
        raise MixingError(f"proportions {list(p)} are not non-negative with a positive sum")
    return (a / a.sum()).tolist()


def _domain_ids(meta) -> torch.Tensor:
    ids = meta["domain_ids"] if isinstance(meta, dict) else meta.domain_ids
    return torch.as_tensor(ids).long().cpu()


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


class StaticMixer:
    """`stratified` / `natural` / `manual`: p is fixed; nothing to observe, no cost."""

    def __init__(self, name: str, p: list[float]):
        self.name, self.p, self.costs = name, _simplex(p), Cost()

    @property
    def proportions(self) -> list[float]:
        return list(self.p)

    def observe(self, inputs, meta, loss_sum, tokens, token_loss=None) -> None:
        pass

    def step(self, step: int, ctx: MixContext) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {"p": self.p}

    def load_state_dict(self, state: dict) -> None:
        self.p = list(state["p"])

    @property
    def cost(self) -> dict:
        return self.costs.as_dict()


# ---------------------------------------------------------------------------------------------------------------------
# ODM: EXP3 with the training loss as reward
# ---------------------------------------------------------------------------------------------------------------------


def odm_eps(t: int, k: int) -> float:
    """ε_t = min(1/K, sqrt(ln K / (K·t))): EXP3's exploration rate at iteration t (ODM, Algorithm 1)."""
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def exp3_proportions(rewards: np.ndarray, eps_prev: float, eps: float) -> np.ndarray:
    """π_i = (1 − K·ε_t) · exp(ε_{t−1} R̂_i) / Σ_j exp(ε_{t−1} R̂_j) + ε_t."""
    k = len(rewards)
    z = eps_prev * np.asarray(rewards, dtype=np.float64)
    w = np.exp(z - z.max())
    return (1 - k * eps) * w / w.sum() + eps


class ODMMixer:
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
        self.p = np.asarray(_simplex(initial if initial is not None else [1.0] * n_domains))
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
        with _Timer(self.costs):
            d = _domain_ids(meta).numpy()
            np.add.at(self.loss_sum, d, loss_sum.detach().double().cpu().numpy())
            np.add.at(self.tokens, d, tokens.detach().double().cpu().numpy())

    def step(self, step: int, ctx: MixContext) -> dict | None:
        with _Timer(self.costs):
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


# ---------------------------------------------------------------------------------------------------------------------
# DGA / DoGE: gradient alignment with the target, from extra backward passes
# ---------------------------------------------------------------------------------------------------------------------


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


class DGAMixer:
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

    def step(self, step: int, ctx: MixContext) -> dict | None:
        if step % self.cfg.update_every:
            return None
        with _Timer(self.costs):
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


# ---------------------------------------------------------------------------------------------------------------------
# DoReMi: excess loss against a reference model
# ---------------------------------------------------------------------------------------------------------------------


def doremi_update(p: np.ndarray, scores: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """p ← (1 − c)·softmax(log p + η·λ) + c/m (DoReMi Algorithm 1; the authors' `update_domain_weights`)."""
    logits = np.log(p) + eta * scores
    new = np.exp(logits - logits.max())
    new = new / new.sum()
    return (1 - smoothing) * new + smoothing / len(p)


class DoReMiMixer:
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
        with _Timer(self.costs):
            ref_loss, mask = token_losses(self.reference, inputs)  # (B, T−1)
            self.costs.add(forward=input_tokens(inputs))
            d = _domain_ids(meta)
            if token_loss is not None:
                excess = ((token_loss.float() - ref_loss).clamp(min=0) * mask).sum(1)  # (B,)
            else:
                excess = (loss_sum.float() - (ref_loss * mask).sum(1)).clamp(min=0)  # (B,) per-sample clip
            np.add.at(self.excess, d.numpy(), excess.double().cpu().numpy())
            np.add.at(self.tokens, d.numpy(), tokens.double().cpu().numpy())

    def step(self, step: int, ctx: MixContext) -> dict | None:
        with _Timer(self.costs):
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


# ---------------------------------------------------------------------------------------------------------------------
# Aioli: LearnParams rounds, interaction matrix, exponentiated gradient
# ---------------------------------------------------------------------------------------------------------------------


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


class AioliMixer:
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
            with _Timer(self.costs):
                self.prev_loss = self._measure(self.ctx)
        np.add.at(self.drawn, _domain_ids(meta).numpy(), 1)

    def _measure(self, ctx: MixContext) -> np.ndarray:
        result = ctx.evaluate()
        self.costs.add(forward=int(sum(result.get("tokens_per_domain") or [0])))
        prev = self.prev_loss if self.prev_loss is not None else np.zeros(self.m)
        return np.array([x if x is not None else prev[i] for i, x in enumerate(result["loss_per_domain"])])

    def step(self, step: int, ctx: MixContext) -> dict | None:
        if self.prev_loss is None:
            raise MixingError("aioli: step() before any observe(); the loop must observe every micro-batch")
        c = self.cfg
        pos = (step - 1) % c.update_steps + 1  # 1..update_steps within the round
        with _Timer(self.costs):
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
            "rng": _rng_state(self.rng),
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
