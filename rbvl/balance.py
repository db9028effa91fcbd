"""R&B Balance: per-domain gradients from the ordinary backward pass, their Gram matrix, and new proportions.

This module imports torch alone, so any training loop can use it:

    tracker = GradientTracker(model, n_domains=m, params="lora")
    for step, batch in enumerate(loader, 1):
        tracker.set_domains(batch["domain_ids"])      # one domain id per sample, before the forward pass
        model(**inputs).loss.backward()               # hooks add each domain's gradient part for the tracked layers
        optimizer.step(); optimizer.zero_grad()
        if step % K == 0:
            G = gram(tracker.domain_grads())          # (m, m) from the window's mean domain gradients
            p = update_proportions(G, q, lam=3.0)     # softmax(λ · G q / ‖G q‖)
            tracker.reset()

Why it is cheap: for a linear map y = x Wᵀ, ∂ℓ/∂W = Σ_t δ_t a_tᵀ over tokens t (δ: output gradient, a: input).
A domain's part is the same product over that domain's tokens, so a forward hook keeps `a`, a tensor hook on
the output receives `δ` during the backward pass training already does, and one weight-gradient-sized matmul per
tracked layer (each token belongs to exactly one domain) adds every domain's part. No extra forward or backward
pass, no per-example autograd; memory is m × (tracked parameters).

Tracked parameters: the paper tracked the model's last layer (`params="head"`: the LM head and the multimodal
projector's last linear). rbvl's default, `params="lora"`, tracks the LoRA adapters — the weights LoRA training
actually updates — a deliberate extension: G then compares the domains in the very directions the optimizer moves.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["GradientTracker", "gram", "update_proportions", "update_proportions_with_info", "Balancer"]


# ---------------------------------------------------------------------------------------------------------------------
# Tracking per-domain gradients
# ---------------------------------------------------------------------------------------------------------------------


class GradientTracker:
    """Accumulates each domain's gradient of the tracked linear layers' weights, read off the normal backward pass.

    Args:
        model: any nn.Module (a PEFT model, a DDP-wrapped model's `.module`, a plain transformers model).
        n_domains: m.
        params: `"lora"` (every LoRA adapter linear), `"head"` (LM head + projector's last linear), or a list of
            regexes matched with `re.search` against module names (nn.Linear modules only).
    """

    def __init__(self, model: nn.Module, n_domains: int, params: str | Sequence[str] = "lora"):
        self.m = n_domains
        self.enabled = True
        self.modules = select_modules(model, params)  # [(name, nn.Linear)]
        dev = self.modules[0][1].weight.device
        self.sums = [
            torch.zeros(n_domains, *mod.weight.shape, dtype=torch.float32, device=dev) for _, mod in self.modules
        ]
        self.counts = torch.zeros(n_domains, dtype=torch.float64)
        self._sample_domains: torch.Tensor | None = None  # (B,)
        self._image_domains: torch.Tensor | None = None  # (n_images,)
        self._handles = [mod.register_forward_hook(self._make_hook(i)) for i, (_, mod) in enumerate(self.modules)]
        self._modules_trainable = [mod.weight.requires_grad for _, mod in self.modules]
        self._handles += [
            mod.weight.register_hook(self._make_weight_hook(i))
            for i, (_, mod) in enumerate(self.modules)
            if mod.weight.requires_grad
        ]
        self._calls = [0] * len(self.modules)  # forward calls that will see a backward, this micro-batch
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}  # index → (skipped domain, sum of the others)

    # -- public API -----------------------------------------------------------------------------------------------

    def set_domains(self, domain_ids, image_domain_ids=None) -> None:
        """Domain id of each sample of the next (micro-)batch; `image_domain_ids` for modules that see images."""
        ids = torch.as_tensor(domain_ids, dtype=torch.long).flatten().cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.m):
            raise ValueError(f"domain ids must lie in [0, {self.m}), got {ids.tolist()}")
        self._sample_domains = ids
        self._calls = [0] * len(self.modules)
        self._pending.clear()
        self._image_domains = None if image_domain_ids is None else torch.as_tensor(image_domain_ids).long().flatten()
        if self.enabled:
            self.counts += torch.bincount(ids, minlength=self.m).double()

    def domain_grads(self) -> torch.Tensor:
        """(m, P): each domain's mean gradient over the window (sum / its sample count); unseen domains give 0."""
        flat = torch.cat([s.flatten(1) for s in self.sums], dim=1)  # (m, P)
        counts = self.counts.to(flat.device, torch.float32)
        return torch.where(counts[:, None] > 0, flat / counts.clamp(min=1)[:, None], torch.zeros_like(flat))

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.counts.zero_()

    def sync(self) -> None:
        """Across DDP ranks: average the sums (as DDP averages `.grad`) and add the counts; no-op on one process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for s in self.sums:
            torch.distributed.all_reduce(s)
            s /= world
        counts = self.counts.to(self.sums[0].device)
        torch.distributed.all_reduce(counts)
        self.counts = counts.cpu()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @property
    def tracked_names(self) -> list[str]:
        return [name for name, _ in self.modules]

    @property
    def n_params(self) -> int:
        return sum(mod.weight.numel() for _, mod in self.modules)

    def flops_per_token(self) -> int:
        """Upper bound of the extra FLOPs per token: a domain-split weight-gradient product (2 · in · out) per layer."""
        return sum(2 * mod.weight.numel() for _, mod in self.modules)

    def flops(self, domain_ids, tokens_per_sample: int) -> int:
        """Extra FLOPs of one micro-batch: trainable layers skip the largest domain (read off autograd's gradient)."""
        ids = torch.as_tensor(domain_ids).flatten()
        largest = int(torch.bincount(ids).max()) if ids.numel() else 0
        total = 0
        for (_, mod), trainable in zip(self.modules, self._modules_trainable, strict=True):
            samples = ids.numel() - largest if trainable else ids.numel()
            total += 2 * mod.weight.numel() * samples * tokens_per_sample
        return total

    def state_dict(self) -> dict:
        return {
            "sums": [s.cpu().clone() for s in self.sums],
            "counts": self.counts.clone(),
            "names": self.tracked_names,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.tracked_names:
            raise ValueError("tracker state was saved for other tracked layers")
        for s, saved in zip(self.sums, state["sums"], strict=True):
            s.copy_(saved)
        self.counts = state["counts"].clone().double()

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _make_hook(self, index: int):
        def forward_hook(module, args, output):
            if not self.enabled or not torch.is_grad_enabled() or not output.requires_grad:
                return
            a = args[0].detach()  # (B, T, in) or (N, in): the layer's input, after LoRA's dropout
            domains = self._domains_for(a.shape[0], self.modules[index][0])
            self._calls[index] += 1

            def grad_hook(delta):  # delta: (B, T, out), the gradient of the loss w.r.t. this layer's output
                self._accumulate(index, a, delta, domains)

            output.register_hook(grad_hook)

        return forward_hook

    def _make_weight_hook(self, index: int):
        def weight_hook(grad):  # this backward's gradient of the whole weight, before it is added to .grad
            pending = self._pending.pop(index, None)
            if pending is not None:
                skipped, partial = pending
                self.sums[index][skipped] += grad.float() - partial

        return weight_hook

    def _domains_for(self, batch_dim: int, name: str) -> torch.Tensor:
        if self._sample_domains is None:
            raise RuntimeError("GradientTracker: call set_domains(domain_ids) before the forward pass")
        if batch_dim == self._sample_domains.numel():
            return self._sample_domains
        if self._image_domains is not None and batch_dim == self._image_domains.numel():
            return self._image_domains
        raise RuntimeError(
            f"GradientTracker: {name} sees a batch of {batch_dim}, but set_domains gave "
            f"{self._sample_domains.numel()} sample ids"
            + ("" if self._image_domains is None else f" and {self._image_domains.numel()} image ids")
        )

    @torch.no_grad()
    def _accumulate(self, index: int, a: torch.Tensor, delta: torch.Tensor, domains: torch.Tensor) -> None:
        """Add each domain's δᵀa. When autograd computes this weight's gradient anyway (a trainable weight used once
        in the micro-batch), the largest domain's part is that gradient minus the others: it costs nothing."""
        acc = self.sums[index]  # (m, out, in)
        domains = domains.to(a.device)
        present, sizes = torch.unique(domains, return_counts=True)
        skipped = None
        if self._modules_trainable[index] and self._calls[index] == 1:
            skipped = int(present[sizes.argmax()])
        partial = torch.zeros_like(acc[0]) if skipped is not None else None
        for d in present.tolist():
            if d == skipped:
                continue
            rows = (domains == d).nonzero().flatten()
            a_d = a.index_select(0, rows).reshape(-1, a.shape[-1]).float()  # (n_d · T, in)
            delta_d = delta.index_select(0, rows).reshape(-1, delta.shape[-1]).float()  # (n_d · T, out)
            part = delta_d.T @ a_d  # (out, in)
            acc[d] += part
            if partial is not None:
                partial += part
        if skipped is not None:
            self._pending[index] = (skipped, partial)


def select_modules(model: nn.Module, params: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers that `params` names (see GradientTracker)."""
    linears = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if params == "lora":
        found = [(n, mod) for n, mod in linears if re.search(r"\.lora_(A|B)\.[^.]+$", n)]
        if not found:
            raise ValueError("params='lora' but the model has no LoRA adapters (wrap it with peft.get_peft_model)")
        return found
    if params == "head":
        from rbvl.families import head_patterns  # the family table: LM head + the projector's last linear

        patterns = head_patterns(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [
            (n, mod)
            for n, mod in linears
            if "original_module" not in n  # PEFT's frozen copy beside a modules_to_save module
            and (mod is head or any(re.search(p, n) for p in patterns))
        ]
        if not found:
            raise ValueError(
                f"params='head' found no LM head or projector linear in this model (looked for {patterns})"
            )
        return found
    if isinstance(params, str):
        params = [params]
    found = []
    for pattern in params:
        hits = [(n, mod) for n, mod in linears if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"balance.params pattern {pattern!r} matches no nn.Linear module")
        found += [h for h in hits if h not in found]
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Gram matrix and proportions
# ---------------------------------------------------------------------------------------------------------------------


def gram(domain_grads: torch.Tensor) -> torch.Tensor:
    """G_ij = g_i · g_j for the (m, P) domain gradients, in float64."""
    g = domain_grads.double()
    return g @ g.T  # (m, m)


def update_proportions(G, q=None, lam: float = 3.0, *, prev=None, floor: float = 0.0, smoothing: float = 0.0):
    """p = softmax(λ · G q / ‖G q‖): domains whose gradients align with the target mixture q get more weight."""
    return update_proportions_with_info(G, q, lam, prev=prev, floor=floor, smoothing=smoothing)[0]


def update_proportions_with_info(G, q=None, lam: float = 3.0, *, prev=None, floor: float = 0.0, smoothing: float = 0.0):
    """`update_proportions`, plus a dict for logging: ‖G q‖, the unseen domains, and why an update was skipped.

    Degenerate cases keep p finite and on the simplex: a non-finite G or ‖G q‖ = 0 (nothing of the target was
    seen) keeps `prev` (uniform when None) and says so; an unseen domain has a zero row in G, so its score is 0
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
        log.info("balance: domains %s had no samples in this window (score 0)", unseen)
    p = torch.softmax(lam * gq / norm, dim=0)
    if smoothing > 0 and prev is not None:
        p = (1 - smoothing) * p + smoothing * torch.as_tensor(prev, dtype=torch.float64)
    if floor > 0:  # p_i ≥ floor for every i: a floor's worth of uniform mass, the rest as computed
        floor = min(floor, 1.0 / m)
        p = floor + (1 - m * floor) * p / p.sum()
    return p / p.sum(), info


class Balancer:
    """The every-K-steps bookkeeping, shared by `rbvl train` and the Trainer integration.

    After optimizer step s (counting from 1): if s > warmup_steps and (s − warmup_steps) % update_every == 0, the
    window's domain gradients (all-reduced across ranks) give G and a new p, and the tracker restarts. Steps up to
    `warmup_steps` sample uniformly and their gradients are discarded at the warmup boundary, so every update sees
    exactly K steps of data. `lag`: an update after step s applies to batches of steps > s + lag
    (`proportions_at`), which makes the data drawn independent of how far a loader prefetches.
    """

    def __init__(
        self,
        n_domains: int,
        target=None,
        update_every: int = 20,
        lam: float = 3.0,
        warmup_steps: int = 0,
        floor: float = 0.0,
        smoothing: float = 0.0,
        lag: int = 0,
    ):
        self.m = n_domains
        self.target = None if target is None else [float(x) for x in target]
        self.update_every, self.lam, self.warmup_steps = update_every, lam, warmup_steps
        self.floor, self.smoothing, self.lag = floor, smoothing, lag
        self.proportions = [1.0 / n_domains] * n_domains
        self.history: list[tuple[int, list[float]]] = []

    @classmethod
    def from_config(cls, n_domains: int, config, target=None, lag: int = 0) -> Balancer:
        """From anything with BalanceConfig's fields (rbvl.config.BalanceConfig; duck-typed, so torch stays the only
        import here)."""
        return cls(
            n_domains,
            target=target,
            update_every=config.update_every,
            lam=config.lam,
            warmup_steps=config.warmup_steps,
            floor=config.floor,
            smoothing=config.smoothing,
            lag=lag,
        )

    def step(self, global_step: int, tracker: GradientTracker) -> dict | None:
        if global_step <= self.warmup_steps:
            if global_step == self.warmup_steps:
                tracker.reset()
            return None
        if (global_step - self.warmup_steps) % self.update_every:
            return None
        tracker.sync()
        grads = tracker.domain_grads()  # (m, P)
        G = gram(grads)  # (m, m)
        p, info = update_proportions_with_info(
            G, self.target, self.lam, prev=self.proportions, floor=self.floor, smoothing=self.smoothing
        )
        info.update(
            gram=G.tolist(),
            eigenvalues=torch.linalg.eigvalsh(G).tolist() if torch.isfinite(G).all() else None,
            counts=tracker.counts.tolist(),
        )
        tracker.reset()
        self.proportions = p.tolist()
        self.history.append((global_step, self.proportions))
        info["p"] = self.proportions
        return info

    def proportions_at(self, step: int) -> list[float]:
        """The p for batches of optimizer step `step` (1-based): the newest update made at a step < step − lag."""
        p = [1.0 / self.m] * self.m
        for s, value in self.history:
            if s + self.lag < step:
                p = value
        return p

    def state_dict(self) -> dict:
        return {"proportions": self.proportions, "history": [[s, p] for s, p in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.proportions = list(state["proportions"])
        self.history = [(int(s), list(p)) for s, p in state["history"]]
