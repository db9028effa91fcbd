"""R&B Balance: per-domain gradients from the ordinary backward pass, their Gram matrix, and new proportions.

This module imports torch alone, so any training loop can use it:

    tracker = GradientTracker(model, n_domains=m, params="lora", sketch_dim=2**20)
    schedule = ProportionSchedule(m, lag=0)                 # p over optimizer steps; data loaders read it
    for step, (inputs, domain_ids) in enumerate(loader, 1):
        tracker.set_domains(domain_ids, tokens=label_tokens(inputs["labels"]))   # before the forward pass
        loss = model(**inputs).loss                          # = Σ_t ℓ_t / N, the mean over the N label tokens
        tracker.watch_loss(loss, normalizer=label_tokens(inputs["labels"]).sum())
        loss.backward()                                      # the tracked layers hand each domain its part
        optimizer.step(); optimizer.zero_grad()
        tracker.commit()                                     # the step joins the window (dropped if it overflowed)
        if step % K == 0:
            tracker.sync()                                   # sum every rank's window (DDP)
            G = tracker.gram()                               # (m, m): g_i · g_j
            p = update_proportions(G, q, lam=3.0)            # softmax(λ · G q / ‖G q‖)
            tracker.reset()
            schedule.publish(p, after_step=step)             # applies from step + 1 + lag

What g_i is. The gradient of domain i's token-mean loss over the window, g_i = (1 / T_i) Σ_{t ∈ i} ∇ℓ_t (T_i: the
window's label tokens of domain i): the per-domain loss that evaluation reports. The paper's update comes from a
first-order expansion of the target loss after a step on the mixture p', L(θ − η Σ_j p'_j g_j; D_q) ≈
L(θ; D_q) − η qᵀ G p' with G_ij = g_i · g_j and the target gradient Σ_i q_i g_i; so g_i must be the gradient of the
same per-domain loss that q weights. It does not depend on what shares a micro-batch, on gradient accumulation, on
the loss normaliser (`watch_loss` undoes it, and whatever scales the loss after it: 1/grad_accum, a GradScaler, a
Trainer's world-size factor), nor on answer length (a domain with 6× longer answers has 6× the tokens, not a 6×
larger gradient).

Why it is cheap. For a linear map y = x Wᵀ, ∂ℓ/∂W = Σ_t δ_t a_tᵀ (δ: output gradient, a: input). The tracked linears
run a small autograd function whose backward computes that weight gradient as the sum of per-domain parts
Σ_d δ_dᵀ a_d: the same matmul FLOPs, split by rows, so every domain's part comes with the gradient training needs
anyway. What is left is adding each part into its domain's accumulator, O(tracked params) per micro-batch and
domain present, not O(params × tokens). A frozen tracked layer (a frozen LM head under `params="head"`) has no
weight gradient to split, so it pays one weight-gradient product. No extra forward or backward pass.

Memory. Exact (`sketch_dim=0`): m × tracked params fp32 for the window, and each domain's last seen gradient in a
small sketch (FALLBACK_DIM numbers). Sketched: every layer's part goes into one count sketch of `sketch_dim` buckets
(entry (i, j) of a layer into bucket (a_i + b_j) mod N with sign s_i · t_j, hashes of its own per layer;
E[⟨S(A), S(B)⟩] = ⟨A, B⟩, so G stays unbiased), so memory is 2 × m × sketch_dim (window + last seen) whatever the
model. The hashes depend only on the seed and the layer shapes, so every rank sketches alike.

A domain with no samples in a window keeps its last seen gradient in G (stale, but the best estimate there is;
zero if it was never seen): its column still counts in G q, and its score stays defined. `update_proportions`
logs which domains were stale.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "GradientTracker",
    "ProportionSchedule",
    "Balancer",
    "gram",
    "label_tokens",
    "update_proportions",
    "update_proportions_with_info",
]


# Modules that see images (or tiles, or patch rows) rather than samples: their rows take `image_domain_ids`.
VISION_SIDE = r"(multi_modal_projector|vision_tower|vision_model|visual|mm_projector|connector|merger)"


def _row_groups(ids: torch.Tensor | None) -> list[tuple[int, slice | torch.Tensor]]:
    """[(domain, rows)] for the rows of each domain present: a slice where they are contiguous, else indices."""
    if ids is None or ids.numel() == 0:
        return []
    present = torch.unique(ids).tolist()
    groups = []
    for d in present:
        rows = (ids == d).nonzero().flatten()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        groups.append((d, slice(lo, hi) if hi - lo == rows.numel() else rows))
    return groups


def label_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B,) label tokens per sample that a causal LM loss averages over (labels shifted by one, as HF models do)."""
    return (labels[:, 1:] != ignore_index).sum(1)


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
        sketch_dim: 0 for exact accumulators (m × tracked params); N > 0 keeps each domain's gradient in an
            N-dimensional count sketch (m × N), unbiased inner products.
        seed: the sketch's hash seed (the same on every rank).
        guard_nonfinite: buffer each optimizer step's contribution and add it to the window only if it is finite
            (`commit`), so an fp16 step that overflowed (and that GradScaler skips) does not poison the window.
    """

    def __init__(
        self,
        model: nn.Module,
        n_domains: int,
        params: str | Sequence[str] = "lora",
        *,
        sketch_dim: int = 0,
        seed: int = 0,
        guard_nonfinite: bool = False,
    ):
        self.m = n_domains
        self.enabled = True
        self.modules = select_modules(model, params)  # [(name, nn.Linear)]
        self.sketch_dim, self.seed, self.guard = sketch_dim, seed, guard_nonfinite
        dev = self.modules[0][1].weight.device
        self.sketches = _plan_sketches([mod.weight.shape for _, mod in self.modules], sketch_dim, seed, dev)
        self.sums = self._zeros(dev)  # the window: Σ_t ∇ℓ_t per domain, [(m, *shape)] exact or [(m, N)] sketched
        self.tokens = torch.zeros(n_domains, dtype=torch.float64)  # (m,) label tokens per domain in the window
        # Each domain's last seen token-mean gradient, for windows that miss it: kept sketched (in the tracker's own
        # sketch, or, exact, in a small one of FALLBACK_DIM), so it never doubles the exact tracker's memory.
        shapes = [mod.weight.shape for _, mod in self.modules]
        fallback = min(self.n_params, max(FALLBACK_DIM, 8 * len(shapes)))
        self._fallback = self.sketches or _plan_sketches(shapes, fallback, seed + 1, dev)
        self.last = torch.zeros(n_domains, sketch_dim or self._fallback.dim, device=dev)  # (m, N)
        self.seen = torch.zeros(n_domains, dtype=torch.bool)  # (m,) ever seen
        self._step_sums = self._zeros(dev) if guard_nonfinite else None
        self._step_tokens = torch.zeros(n_domains, dtype=torch.float64)
        self._sample_domains: torch.Tensor | None = None  # (B,)
        self._image_domains: torch.Tensor | None = None  # (rows the vision side sees,)
        self._scale = 1.0  # Σ_t ∇ℓ_t = scale × (gradient backpropagated this micro-batch)
        self.skipped_steps = 0
        self.extra_flops = 0  # FLOPs spent on tracking so far (accumulating parts, sketching, frozen layers)
        self._originals: list | None = None
        self.attach()

    def _zeros(self, dev) -> list[torch.Tensor]:
        if self.sketches is None:
            return [torch.zeros(self.m, *mod.weight.shape, dtype=torch.float32, device=dev) for _, mod in self.modules]
        return [torch.zeros(self.m, self.sketch_dim, dtype=torch.float32, device=dev)]

    # -- public API -----------------------------------------------------------------------------------------------

    def set_domains(self, domain_ids, tokens=None, image_domain_ids=None) -> None:
        """Before a micro-batch's forward pass: the domain of each sample, and what its loss averages over.

        Args:
            domain_ids: (B,) domain id per sample.
            tokens: (B,) label tokens per sample (`label_tokens(labels)`); None counts each sample as one unit,
                for a loss that is a mean over samples.
            image_domain_ids: the domain of each row the vision side sees (one per image, or per tile / patch
                row), for tracked layers whose batch dimension is images rather than samples.
        """
        ids = torch.as_tensor(domain_ids, dtype=torch.long).flatten().cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.m):
            raise ValueError(f"domain ids must lie in [0, {self.m}), got {ids.tolist()}")
        self._sample_domains = ids
        self._image_domains = None if image_domain_ids is None else torch.as_tensor(image_domain_ids).long().flatten()
        # Which rows belong to which domain, worked out once per micro-batch for every tracked layer.
        self._groups = {"sample": _row_groups(ids), "image": _row_groups(self._image_domains)}
        self._scale = 1.0
        units = torch.ones(len(ids), dtype=torch.float64) if tokens is None else torch.as_tensor(tokens).double().cpu()
        if self.enabled:
            (self._step_tokens if self.guard else self.tokens).index_add_(0, ids, units.flatten())

    def watch_loss(self, loss: torch.Tensor, normalizer) -> torch.Tensor:
        """Declare that `loss` = Σ_t ℓ_t / normalizer over this micro-batch's label tokens; returns `loss`.

        Whatever scales `loss` before backward (1/grad_accum, a GradScaler, a world-size factor) is read off the
        gradient that reaches it, so the tracker always accumulates Σ_t ∇ℓ_t per domain.
        """
        if not (self.enabled and loss.requires_grad):
            return loss
        norm = float(normalizer)

        def hook(grad):
            self._scale = norm / float(grad) if float(grad) != 0 else 0.0

        loss.register_hook(hook)
        return loss

    def commit(self, skip: bool = False) -> bool:
        """After each optimizer step: the step's contribution joins the window; returns False if it was dropped.

        Dropped when `skip` (the optimizer skipped the step) or, with `guard_nonfinite`, when it is not finite.
        """
        if self._step_sums is None:
            if skip:
                log.warning("balance: a skipped step was already added to the window (guard_nonfinite is off)")
            return True
        tokens, self._step_tokens = self._step_tokens, torch.zeros_like(self._step_tokens)
        finite = all(bool(torch.isfinite(s).all()) for s in self._step_sums)
        if skip or not finite:
            self.skipped_steps += 1
            for s in self._step_sums:
                s.zero_()
            return False
        for acc, s in zip(self.sums, self._step_sums, strict=True):
            acc += s
            s.zero_()
        self.tokens += tokens
        return True

    def sync(self) -> None:
        """Across DDP ranks: sum the window's gradient sums and token counts (no-op on one process)."""
        self._commit_pending()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for s in self.sums:
            torch.distributed.all_reduce(s)
        tokens = self.tokens.to(self.sums[0].device)
        torch.distributed.all_reduce(tokens)
        self.tokens = tokens.cpu()

    def domain_grads(self) -> torch.Tensor:
        """(m, D): each domain's token-mean gradient over the window, 0 for a domain the window missed
        (D = tracked params, or sketch_dim)."""
        return torch.cat([g.flatten(1) for g in self._mean_grads()], dim=1)

    def gram(self) -> torch.Tensor:
        """(m, m) G_ij = g_i · g_j in float64, layer by layer (no (m, P) concatenation).

        A domain the window missed but an earlier one saw enters with its last seen gradient: its row and column
        come from the sketched store (exact entries among the domains the window saw).
        """
        self._commit_pending()
        means = self._mean_grads()
        G = torch.zeros(self.m, self.m, dtype=torch.float64)
        for g in means:
            g = g.flatten(1).double()  # (m, D_layer)
            G += (g @ g.T).cpu()
        stale = ((self.tokens == 0) & self.seen).to(self.last.device)
        if stale.any():
            S = torch.where(stale[:, None], self.last, self._sketch_rows(means)).double()  # (m, N)
            Gs = (S @ S.T).cpu()
            rows = stale.cpu()
            G[rows, :] = Gs[rows, :]
            G[:, rows] = Gs[:, rows]
        return G

    def _commit_pending(self) -> None:
        if self.guard and bool(self._step_tokens.any()):
            self.commit()

    def stale(self) -> list[int]:
        """Domains with no tokens in the current window (their last seen gradient stands in)."""
        return (self.tokens == 0).nonzero().flatten().tolist()

    def reset(self) -> None:
        """End the window: remember each seen domain's gradient, then zero the accumulators."""
        fresh = self.tokens > 0
        if fresh.any():
            rows = fresh.to(self.last.device)
            self.last[rows] = self._sketch_rows(self._mean_grads())[rows]
            self.seen |= fresh
        for s in self.sums:
            s.zero_()
        self.tokens.zero_()

    def attach(self) -> None:
        """Route the tracked layers through the tracker (done on construction; again after `remove`)."""
        if self._originals is not None:
            return
        for name, mod in self.modules:
            if getattr(mod.__dict__.get("forward"), "tracker", None) is not None:
                raise RuntimeError(f"{name} is already tracked by another GradientTracker: remove() that one first")
        self._originals = [mod.__dict__.get("forward") for _, mod in self.modules]
        for i, (_, mod) in enumerate(self.modules):
            mod.forward = self._make_forward(i, mod)

    def remove(self) -> None:
        """Give the tracked layers back their own forward (the accumulators stay; `attach` resumes tracking)."""
        if self._originals is None:
            return
        for (_, mod), orig in zip(self.modules, self._originals, strict=True):
            if orig is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = orig
        self._originals = None

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

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (window, last seen, step buffer)."""
        held = [*self.sums, self.last, *(self._step_sums or [])]
        return sum(t.numel() * t.element_size() for t in held)

    def allreduce_bytes(self) -> int:
        """Bytes each `sync` all-reduces."""
        return sum(t.numel() * t.element_size() for t in self.sums) + self.tokens.numel() * 8

    def flops(self, domain_ids, tokens_per_sample: int) -> int:
        """Extra FLOPs tracking adds to one micro-batch of these domains (analytic; what `extra_flops` counts).

        Per tracked layer and domain present: one scale-and-add of the part into its accumulator (exact), or the
        count sketch (bucket index, signs, scatter-add) — O(out · in), independent of tokens. A frozen tracked layer also
        pays its weight-gradient product, 2 · tokens · out · in.
        """
        ids = torch.as_tensor(domain_ids).flatten()
        present = int(torch.unique(ids).numel())
        total = 0
        for i, (_, mod) in enumerate(self.modules):
            total += present * self._part_flops(i, mod.weight)
            if not mod.weight.requires_grad:
                total += 2 * mod.weight.numel() * ids.numel() * tokens_per_sample
        return total

    def state_dict(self) -> dict:
        if any(bool(s.any()) for s in self._step_sums or []) or bool(self._step_tokens.any()):
            raise RuntimeError("GradientTracker: commit() the step before saving the tracker")
        return {
            "sums": [s.cpu().clone() for s in self.sums],
            "tokens": self.tokens.clone(),
            "last": self.last.cpu().clone(),
            "seen": self.seen.clone(),
            "names": self.tracked_names,
            "sketch_dim": self.sketch_dim,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "extra_flops": self.extra_flops,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.tracked_names:
            raise ValueError("tracker state was saved for other tracked layers")
        if (state.get("sketch_dim", 0), state.get("seed", self.seed)) != (self.sketch_dim, self.seed):
            raise ValueError(
                f"tracker state was saved with sketch_dim={state.get('sketch_dim', 0)}, seed={state.get('seed')}; "
                f"this tracker has sketch_dim={self.sketch_dim}, seed={self.seed}"
            )
        for dst, src in zip(self.sums, state["sums"], strict=True):
            dst.copy_(src)
        self.last.copy_(state["last"])
        self.tokens = state["tokens"].clone().double()
        self.seen = state["seen"].clone().bool()
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.extra_flops = int(state.get("extra_flops", 0))

    # -- inside the backward pass -----------------------------------------------------------------------------------

    def _mean_grads(self) -> list[torch.Tensor]:
        """Per accumulator: window sums / tokens (0 where the window has no tokens)."""
        out = []
        for s in self.sums:
            tokens = self.tokens.to(s.device, torch.float32).view(-1, *[1] * (s.dim() - 1))
            out.append(s / tokens.clamp(min=1))
        return out

    def _sketch_rows(self, means: list[torch.Tensor]) -> torch.Tensor:
        """(m, N): the domains' gradients in the store's sketch (the tracker's own sketch is already one)."""
        if self.sketches is not None:
            return means[0]
        out = torch.zeros_like(self.last)
        for index, g in enumerate(means):
            for d in range(self.m):
                _sketch_into(out[d], self._fallback, index, g[d])
        return out

    def _make_forward(self, index: int, mod: nn.Linear):
        def forward(x):
            if not (self.enabled and torch.is_grad_enabled() and (x.requires_grad or mod.weight.requires_grad)):
                return F.linear(x, mod.weight, mod.bias)
            domains = self._domains_for(x.shape[0], self.modules[index][0])
            return _TrackedLinear.apply(x, mod.weight, mod.bias, self, index, domains)

        forward.tracker = self
        return forward

    def _domains_for(self, batch_dim: int, name: str) -> list[tuple[int, slice | torch.Tensor]]:
        if self._sample_domains is None:
            raise RuntimeError("GradientTracker: call set_domains(domain_ids) before the forward pass")
        vision_side = re.search(VISION_SIDE, name) is not None
        if vision_side and self._image_domains is not None and batch_dim == self._image_domains.numel():
            return self._groups["image"]
        if vision_side and self._image_domains is None:
            raise RuntimeError(
                f"GradientTracker: {name} sees images, not samples: pass image_domain_ids (the domain of each of its "
                f"{batch_dim} rows) to set_domains"
            )
        if batch_dim == self._sample_domains.numel():
            return self._groups["sample"]
        if self._image_domains is not None and batch_dim == self._image_domains.numel():
            return self._groups["image"]
        raise RuntimeError(
            f"GradientTracker: {name} sees a batch of {batch_dim}, but set_domains gave "
            f"{self._sample_domains.numel()} sample ids"
            + ("" if self._image_domains is None else f" and {self._image_domains.numel()} image ids")
        )

    def _part_flops(self, index: int, weight: torch.Tensor) -> int:
        if self.sketches is None or self.sketches[index] is None:
            return 2 * weight.numel()  # scale + add
        return 6 * weight.numel()  # scale; bucket index (add, mod); two signs; scatter-add

    @torch.no_grad()
    def _add_part(self, index: int, domain: int, part: torch.Tensor) -> None:
        """part: (out, in), domain's share of this call's weight gradient as backpropagated; stored as Σ_t ∇ℓ_t."""
        target = self._step_sums if self._step_sums is not None else self.sums
        weight = self.modules[index][1].weight
        self.extra_flops += self._part_flops(index, weight)
        if self.sketches is None:
            target[index][domain].add_(part, alpha=self._scale)
        else:
            _sketch_into(target[0][domain], self.sketches, index, part * self._scale)


def _sketch_into(out: torch.Tensor, plans: _Plans, index: int, part: torch.Tensor) -> None:
    """Add the sketch of layer `index`'s (out, in) `part` into the (N,) vector `out`.

    One count sketch over every tracked weight: entry (i, j) of layer l goes to bucket (a_i + b_j) mod N with sign
    s_i · t_j, with seeded hashes a, b and signs s, t of its own per layer. Every layer spreads over all N buckets
    and collisions are pairwise independent, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ with the variance of one N-bucket count
    sketch, (‖A‖²‖B‖² + ⟨A, B⟩²) / N, however the gradient's energy is spread over the layers (per-layer slices of
    the N numbers err like the slice of the layer that holds the most energy). Rows are taken in chunks so the
    temporaries stay small; about five passes over the part.
    """
    plan = plans[index]
    if plan is None:  # the sketch is no smaller than the tracked weights: each layer exact in its own slice
        offset = plans.offsets[index]
        out[offset : offset + part.numel()] += part.flatten()
        return
    a, s_a, b, s_b = plan
    n = out.numel()
    step = max(1, CHUNK // part.shape[1])
    for r in range(0, part.shape[0], step):
        rows = slice(r, r + step)
        buckets = (a[rows, None] + b[None, :]).remainder_(n)  # (rows, in)
        values = part[rows] * s_a[rows, None] * s_b[None, :]
        out.index_add_(0, buckets.flatten(), values.flatten())


CHUNK = 2**22  # elements of a part sketched at once (bounds the temporaries)


class _Plans(list):
    """Per layer: None (the exact layout: each layer in its own slice) or (a, s_a, b, s_b): its hashes and signs."""

    offsets: list[int]
    dim: int  # numbers used


FALLBACK_DIM = 2**16  # an exact tracker's store of last seen gradients: m × this many numbers


def _plan_sketches(shapes, sketch_dim: int, seed: int, device) -> _Plans | None:
    """Hashes and signs of every layer into one sketch of sketch_dim buckets (the exact layout if that is no
    smaller than the layers together)."""
    if sketch_dim <= 0:
        return None
    sizes = [int(s[0]) * int(s[1]) for s in shapes]
    plans = _Plans()
    plans.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if sketch_dim >= sum(sizes):
        plans.extend([None] * len(shapes))
        plans.dim = sum(sizes)
        return plans
    for i, (rows, cols) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        a = torch.randint(0, sketch_dim, (rows,), generator=g).to(device)
        s_a = (torch.randint(0, 2, (rows,), generator=g) * 2 - 1).float().to(device)
        b = torch.randint(0, sketch_dim, (cols,), generator=g).to(device)
        s_b = (torch.randint(0, 2, (cols,), generator=g) * 2 - 1).float().to(device)
        plans.append((a, s_a, b, s_b))
    plans.dim = sketch_dim
    return plans


class _TrackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward computes ∂L/∂W as Σ_d δ_dᵀ a_d and hands each domain's part to the tracker."""

    @staticmethod
    def forward(ctx, x, weight, bias, tracker, index, domains):
        out = F.linear(x, weight, bias)  # under autocast: the low-precision matmul autocast would do
        ctx.compute_dtype = out.dtype
        ctx.tracker, ctx.index, ctx.domains = tracker, index, domains
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dt = ctx.compute_dtype
        grad_out = grad_out.to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(dt)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        a = x.to(dt)
        tracking = ctx.tracker.enabled
        groups = ctx.domains  # [(domain, rows)]: rows a slice (contiguous) or an index tensor
        for d, rows in groups:  # Σ_d δ_dᵀ a_d is the weight gradient: the same matmul FLOPs as one δᵀa, split by rows
            if len(groups) == 1:  # the whole micro-batch is one domain: its part is the gradient
                delta_d, a_d = grad_out, a
            elif isinstance(rows, slice):
                delta_d, a_d = grad_out[rows], a[rows]  # views, no copy
            else:
                rows = rows.to(x.device)
                delta_d, a_d = grad_out.index_select(0, rows), a.index_select(0, rows)
            part = delta_d.reshape(-1, delta_d.shape[-1]).T @ a_d.reshape(-1, a_d.shape[-1])  # (out, in)
            part = part if part.dtype == torch.float32 else part.float()
            if ctx.needs_input_grad[1]:
                grad_w = part if grad_w is None else grad_w + part
            if tracking:
                ctx.tracker._add_part(ctx.index, d, part)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


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


# ---------------------------------------------------------------------------------------------------------------------
# p over time
# ---------------------------------------------------------------------------------------------------------------------


class ProportionSchedule:
    """The proportions p over optimizer steps: a p published after step s applies from step s + 1 + lag.

    `lag` covers what a data loader prepares ahead (`rbvl.data.loader_lag`), so the data drawn for a step never
    depends on timing and a resumed run draws what the first one drew. The table lives in shared memory, so
    DataLoader workers (forked after it is built) read every p the training process publishes.
    """

    def __init__(self, n_domains: int, initial=None, lag: int = 0, capacity: int = 4096):
        self.m, self.lag, self.capacity = n_domains, lag, capacity
        self.table = torch.zeros(capacity + 1, n_domains, dtype=torch.float64).share_memory_()  # (updates, m)
        self.applies_from = torch.zeros(capacity + 1, dtype=torch.long).share_memory_()  # (updates,) step
        self.count = torch.ones(1, dtype=torch.long).share_memory_()
        self.table[0] = torch.as_tensor(initial if initial is not None else [1.0 / n_domains] * n_domains)

    def publish(self, p, after_step: int) -> int:
        """Make `p` apply from optimizer step `after_step + 1 + lag`; returns that step."""
        n = int(self.count.item())
        if n > self.capacity:
            raise RuntimeError(f"more than {self.capacity} proportion updates; raise ProportionSchedule capacity")
        start = int(after_step) + 1 + self.lag
        self.table[n] = torch.as_tensor(p, dtype=torch.float64)
        self.applies_from[n] = start
        self.count[0] = n + 1  # written last: a reader never sees a half-written row
        return start

    def at(self, step: int) -> torch.Tensor:
        """(m,) the p for the batches of optimizer step `step` (1-based), normalised."""
        n = int(self.count.item())
        eligible = (self.applies_from[:n] <= step).nonzero().flatten()
        p = self.table[int(eligible[-1])]
        return p / p.sum()

    def current(self) -> list[float]:
        """The newest published p (which may not apply yet)."""
        return self.table[int(self.count.item()) - 1].tolist()

    def history(self) -> list[tuple[int, list[float]]]:
        """[(applies_from_step, p)] for every published p, the initial one first (from step 0)."""
        n = int(self.count.item())
        return [(int(s), p) for s, p in zip(self.applies_from[:n].tolist(), self.table[:n].tolist(), strict=True)]

    def state_dict(self) -> dict:
        n = int(self.count.item())
        return {"p": self.table[:n].tolist(), "applies_from": self.applies_from[:n].tolist(), "lag": self.lag}

    def load_state_dict(self, state: dict) -> None:
        if "lag" in state and int(state["lag"]) != self.lag:
            raise ValueError(
                f"the proportion schedule was saved with lag {state['lag']} (num_workers × prefetch / grad_accum); "
                f"this run has lag {self.lag}: an exact resume needs the same loader settings"
            )
        n = len(state["p"])
        self.table[:n] = torch.tensor(state["p"], dtype=torch.float64)
        self.applies_from[:n] = torch.tensor(state["applies_from"], dtype=torch.long)
        self.count[0] = n


class Balancer:
    """When to update, and how: the every-K-steps bookkeeping of `rbvl train` and the Trainer integration.

    After optimizer step s (counting from 1): if s > warmup_steps and (s − warmup_steps) % update_every == 0, the
    window's domain gradients give G and a new p (`update`). Steps up to `warmup_steps` sample from the initial p
    and their gradients are dropped at the warmup boundary, so every update sees exactly K steps of data. The new p
    goes into `schedule`, which the data side reads.
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
        schedule: ProportionSchedule | None = None,
    ):
        self.m = n_domains
        self.target = None if target is None else [float(x) for x in target]
        self.update_every, self.lam, self.warmup_steps = update_every, lam, warmup_steps
        self.floor, self.smoothing = floor, smoothing
        self.schedule = schedule if schedule is not None else ProportionSchedule(n_domains)

    @classmethod
    def from_config(cls, n_domains: int, config, target=None, schedule: ProportionSchedule | None = None) -> Balancer:
        """From anything with BalanceConfig's fields (duck-typed, so torch stays the only import here)."""
        return cls(
            n_domains,
            target=target,
            update_every=config.update_every,
            lam=config.lam,
            warmup_steps=config.warmup_steps,
            floor=config.floor,
            smoothing=config.smoothing,
            schedule=schedule,
        )

    @property
    def proportions(self) -> list[float]:
        """The newest p."""
        return self.schedule.current()

    def due(self, step: int, tracker: GradientTracker | None = None) -> bool:
        """Whether optimizer step `step` ends a window; at the warmup boundary it also empties the tracker."""
        if step <= self.warmup_steps:
            if step == self.warmup_steps and tracker is not None:
                tracker.reset()
            return False
        return (step - self.warmup_steps) % self.update_every == 0

    def update(self, G: torch.Tensor) -> tuple[list[float], dict]:
        """(m, m) G → the new p (not yet published) and a dict for the logs."""
        p, info = update_proportions_with_info(
            G, self.target, self.lam, prev=self.proportions, floor=self.floor, smoothing=self.smoothing
        )
        finite = bool(torch.isfinite(G).all())
        info.update(gram=G.tolist(), eigenvalues=torch.linalg.eigvalsh(G).tolist() if finite else None)
        return p.tolist(), info

    def step(self, step: int, tracker: GradientTracker) -> dict | None:
        """After optimizer step `step`: commit the step; at a window's end sync → gram → update → reset → publish."""
        tracker.commit()
        if not self.due(step, tracker):
            return None
        tracker.sync()  # Σ over ranks
        stale = tracker.stale()
        tokens = tracker.tokens.tolist()
        G = tracker.gram()  # (m, m)
        p, info = self.update(G)
        tracker.reset()
        info.update(p=p, tokens=tokens, stale=stale, applies_from=self.schedule.publish(p, after_step=step))
        return info

    def proportions_at(self, step: int) -> list[float]:
        """The p for batches of optimizer step `step` (1-based)."""
        return self.schedule.at(step).tolist()

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
