"""GradientTracker: each domain's gradient of the tracked linear layers, read off the ordinary backward pass.

The tracked linears run `_TrackedLinear` (rbvl/balance/layers.py), whose backward computes the weight gradient as
the sum of per-domain parts Σ_d δ_dᵀ a_d (the same matmul FLOPs as one δᵀa, in one batched or grouped product) and
hands the parts to the tracker, which holds them until the pass ends, then takes all the layers' norms and adds
(exact: into the window; sketched: into a staging sketch) and applies the loss scale once (rbvl/balance/staging.py).
The tracker keeps, per domain, Σ_t ∇ℓ_t over the window (exact, or in the sketch of rbvl/balance/sketch.py), the
window's label tokens (so g_i is domain i's token-mean loss gradient) and, for the unbiased G_ii, Σ_k ‖s_ik‖² and
Σ_k T_ik² over micro-batches k.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rbvl.balance.grouped import try_grouped_products
from rbvl.balance.layers import (
    CROSS_ATTENTION,
    VISION_SIDE,
    Routed,
    _cpu_ids,
    _GroupCache,
    _Groups,
    _tracked_linear,
    _tracked_linear_eager,
    select_modules,
)
from rbvl.balance.lora import lora_forward, lora_pairs
from rbvl.balance.sketch import FALLBACK_DIM, SIGN_CACHE_BYTES, _plan_sketches, _sketch_domains
from rbvl.balance.staging import _Stage, _Staging
from rbvl.balance.update import GRAM_ESTIMATORS, checked_count, shrink_gram, unbiased_diagonal
from rbvl.balance.window import _Window

log = logging.getLogger(__name__)


class GradientTracker(_Staging, _Window):
    """Accumulates each domain's gradient of the tracked linear layers' weights, read off the normal backward pass.

    Args:
        model: any nn.Module (a PEFT model, a DDP-wrapped model's `.module`, a plain transformers model).
        n_domains: m.
        params: `"lora"` (every LoRA adapter linear), `"head"` (LM head + projector's last linear, as
            `head_patterns` names them), or a list of regexes matched with `re.search` against module names
            (nn.Linear modules only).
        head_patterns: for `params="head"`: regexes (re.search) of the projector's last linear and the LM head of
            this model's family, e.g. `rbvl.model.families.head_patterns(model)`; the model's output embedding is
            tracked too. Ignored for other `params`.
        sketch_dim: 0 for exact accumulators (m × tracked params); N > 0 keeps each domain's gradient in an
            N-number sketch (m × N), unbiased inner products.
        seed: the sketch's hash seed (the same on every rank).
        guard_nonfinite: buffer each optimizer step's contribution and add it to the window only if it is finite
            (`commit`), so an fp16 step that overflowed (and that GradScaler skips) does not poison the window.
    """

    # A PEFT LoRA layer whose A and B are both tracked runs its adapter as one function (rbvl/balance/lora.py); set
    # False before building a tracker to run each tracked linear on its own (`rbvl bench train --arms rnb_linears`)
    pair_lora = True

    def __init__(
        self,
        model: nn.Module,
        n_domains: int,
        params: str | Sequence[str] = "lora",
        *,
        head_patterns: Sequence[str] | None = None,
        sketch_dim: int = 0,
        seed: int = 0,
        guard_nonfinite: bool = False,
    ):
        self.m = n_domains = checked_count("GradientTracker: n_domains", n_domains, 1, " (domain ids 0..n_domains-1)")
        self.enabled = True
        self.modules = select_modules(model, params, head_patterns)  # [(name, nn.Linear)]
        self._vision_side = [re.search(VISION_SIDE, name) is not None for name, _ in self.modules]
        self.sketch_dim, self.seed, self.guard = sketch_dim, seed, guard_nonfinite
        dev = self.modules[0][1].weight.device
        shapes = [mod.weight.shape for _, mod in self.modules]
        self.sketches = _plan_sketches(shapes, sketch_dim, seed, dev, cache_bytes=SIGN_CACHE_BYTES)
        self.sums = self._zeros(dev)  # the window: Σ_t ∇ℓ_t per domain, [(m, *shape)] exact or [(m, N)] sketched
        self.tokens = torch.zeros(n_domains, dtype=torch.float64)  # (m,) label tokens per domain in the window
        # For the unbiased diagonal (docs/balance.md): per domain, Σ_k T_ik² and Σ_k ‖s_ik‖² over micro-batches k
        # (s_ik: the micro-batch's gradient sum), the latter on the device so the backward pass never syncs.
        self.tokens_sq = torch.zeros(n_domains, dtype=torch.float64)  # (m,)
        self.sq = torch.zeros(n_domains, dtype=torch.float64, device=dev)  # (m,)
        self.last_diag = torch.zeros(n_domains, dtype=torch.float64)  # (m,) each domain's last de-biased G_ii
        self.has_diag = torch.zeros(n_domains, dtype=torch.bool)  # (m,) whether it has one
        # Each domain's last seen token-mean gradient, for windows that miss it: kept sketched (in the tracker's own
        # sketch, or, exact, in a small one of FALLBACK_DIM), so it never doubles the exact tracker's memory.
        fallback = min(self.n_params, max(FALLBACK_DIM, 8 * len(shapes)))
        self._fallback = self.sketches or _plan_sketches(shapes, fallback, seed + 1, dev)
        self.last = torch.zeros(n_domains, sketch_dim or self._fallback.dim, device=dev)  # (m, N)
        self.seen = torch.zeros(n_domains, dtype=torch.bool)  # (m,) ever seen
        self._step_sums = self._zeros(dev) if guard_nonfinite else None
        # What one backward pass stages before `_end_backward` adds it to the window (the step's buffers with
        # guard_nonfinite): per row grouping (slot 0: samples, 1: images), a (k, N) staging sketch, grown to the
        # largest k seen, and per k the (layers, k) norms of the parts; views of the accumulators, made once.
        self._target = self._step_sums if guard_nonfinite else self.sums
        self._staging: dict[int, torch.Tensor] = {}  # slot → (k_max, N)
        self._stages: dict[tuple[int, int], _Stage] = {}  # (slot, k) → its buffers
        self._grouping = _GroupCache()  # row groupings by micro-batch composition
        self._layers_at = dev  # where the tracked layers' weights were at the last set_domains (`follow_layers`)
        self._pending: list[_Groups] = []  # the row groupings this backward pass staged parts for
        self._queued = False  # whether `_end_backward` is queued to run when the backward pass ends
        self._row_views: dict[tuple, object] = {}  # exact: (layer, lo, hi) → its window rows; (layers, ...): theirs
        self._flops_at: dict[int | tuple, int] = {}  # layer (or layers) → extra FLOPs of one part (of one each)
        self._step_tokens = torch.zeros(n_domains, dtype=torch.float64)
        self._step_tokens_sq = torch.zeros(n_domains, dtype=torch.float64)
        self._step_sq = torch.zeros(n_domains, dtype=torch.float64, device=dev) if guard_nonfinite else None
        self._sample_domains: torch.Tensor | None = None  # (B,)
        self._image_domains: torch.Tensor | None = None  # (rows the vision side sees,)
        # Σ_t ∇ℓ_t = scale × (gradient backpropagated this micro-batch): a 0-dim tensor on the device once watch_loss
        # has seen the loss's gradient, so reading it never syncs
        self._scale: float | torch.Tensor = 1.0
        self._warned_unwatched = False  # a backward pass without watch_loss was warned about
        self.skipped_steps = 0
        self.extra_flops = 0  # FLOPs spent on tracking so far (accumulating parts, sketching, frozen layers)
        self._originals: list | None = None  # [(module, its own forward or None)] while attached
        self._lora = lora_pairs(model, self.tracked_names) if self.pair_lora else []  # [(name, layer, adapter, A, B)]
        try_grouped_products(dev)  # one small trial product per dtype, here rather than inside a training step
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
        self._end_backward()  # anything an interrupted backward pass left staged
        self.follow_layers()  # the window where the layers are, if they moved since (a Trainer's FSDP, model.cuda())
        ids = _cpu_ids(domain_ids)  # on the CPU already in rbvl's loop
        listed = ids.tolist()
        if listed and (min(listed) < 0 or max(listed) >= self.m):
            raise ValueError(f"domain ids must lie in [0, {self.m}), got {listed}")
        self._sample_domains = ids
        self._image_domains = None if image_domain_ids is None else _cpu_ids(image_domain_ids)
        images, dev = None if self._image_domains is None else self._image_domains.tolist(), self.sq.device
        # Which rows belong to which domain, worked out on the CPU for every tracked layer (once per composition).
        self._groups = {"sample": self._grouping.of(listed, dev), "image": self._grouping.of(images, dev)}
        self._scale = 1.0
        if self.enabled:  # T_ik: this micro-batch's tokens per domain
            units = None if tokens is None else torch.as_tensor(tokens).reshape(-1).double().cpu()
            if units is not None and units.numel() != ids.numel():
                raise ValueError(
                    f"set_domains: {units.numel()} token counts for {ids.numel()} domain ids (one per sample: "
                    f"label_tokens(labels))"
                )
            mb = torch.bincount(ids, weights=units, minlength=self.m).double()
            (self._step_tokens if self.guard else self.tokens).add_(mb)
            (self._step_tokens_sq if self.guard else self.tokens_sq).addcmul_(mb, mb)

    def watch_loss(self, loss: torch.Tensor, normalizer) -> torch.Tensor:
        """Declare that `loss` = Σ_t ℓ_t / normalizer over this micro-batch's label tokens; returns `loss`.

        Whatever scales `loss` before backward (1/grad_accum, a GradScaler, a world-size factor) is read off the
        gradient that reaches it, so the tracker always accumulates Σ_t ∇ℓ_t per domain.
        """
        if not (self.enabled and loss.requires_grad):
            return loss
        norm = torch.as_tensor(normalizer, dtype=torch.float32).to(loss.device, non_blocking=True)

        def hook(grad):  # runs first in the backward pass; stays on the device (no host sync)
            grad = grad.float()
            self._scale = torch.where(grad != 0, norm / grad, 0.0)

        loss.register_hook(hook)
        return loss

    def commit(self, skip: bool = False) -> bool:
        """After each optimizer step: the step's contribution joins the window; returns False if it was dropped.

        Dropped when `skip` (the optimizer skipped the step) or, with `guard_nonfinite`, when it is not finite: that
        check reads one flag off the device per optimizer step (as GradScaler's own check does), never per micro-batch.
        """
        self._end_backward()
        if self._step_sums is None:
            if skip:
                log.warning("balance: a skipped step was already added to the window (guard_nonfinite is off)")
            return True
        tokens, self._step_tokens = self._step_tokens, torch.zeros_like(self._step_tokens)
        tokens_sq, self._step_tokens_sq = self._step_tokens_sq, torch.zeros_like(self._step_tokens_sq)
        step = [*self._step_sums, self._step_sq]
        finite = bool(torch.stack([torch.isfinite(s).all() for s in step]).all())  # one host sync
        if skip or not finite:
            self.skipped_steps += 1
            for s in step:
                s.zero_()
            return False
        for acc, s in zip([*self.sums, self.sq], step, strict=True):
            acc += s
            s.zero_()
        self.tokens += tokens
        self.tokens_sq += tokens_sq
        return True

    def sync(self) -> None:
        """Across DDP ranks: sum the window's gradient sums and token counts (no-op on one process)."""
        self._commit_pending()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for s in self.sums:
            torch.distributed.all_reduce(s)
        scalars = torch.cat([self.tokens.to(self.sq.device), self.tokens_sq.to(self.sq.device), self.sq])
        torch.distributed.all_reduce(scalars)  # one call: tokens, Σ_k T_ik², Σ_k ‖s_ik‖² of every rank's micro-batches
        self.tokens, self.tokens_sq, self.sq = (x.clone() for x in scalars.cpu().split(self.m))
        self.sq = self.sq.to(scalars.device)

    def domain_grads(self) -> torch.Tensor:
        """(m, D): each domain's token-mean gradient over the window, 0 for a domain the window missed
        (D = tracked params, or sketch_dim)."""
        return torch.cat([g.flatten(1) for g in self._mean_grads()], dim=1)

    def gram(self, estimator: str = "unbiased", with_info: bool = False):
        """(m, m) G_ij = g_i · g_j in float64, layer by layer (no (m, P) concatenation); with `with_info`, (G, info).

        `estimator`: "plugin" is ĝ_i · ĝ_j (the paper's), whose diagonal is biased up by tr Σ_i / n_i; "unbiased"
        replaces the diagonal by the U-statistic over micro-batches (`update.unbiased_diagonal`, docs/balance.md).
        Off the diagonal the two agree: different domains' samples are independent, so E[ĝ_i · ĝ_j] = g_i · g_j.
        "shrunk": the Gram of c_i ĝ_i, c_i = unbiased / plug-in G_ii in [0, 1] (`update.shrink_gram`).
        A domain seen in fewer than 2 micro-batches keeps its last de-biased G_ii (else the plug-in): `info` names
        them in `diag_fallback` {domain: "previous" | "plugin"}, next to `plugin_diag` and `unbiased_diag`.

        A domain the window missed but an earlier one saw enters with its last seen gradient (the sketched store).
        """
        if estimator not in GRAM_ESTIMATORS:
            raise ValueError(f"gram estimator must be one of {', '.join(GRAM_ESTIMATORS)}, got {estimator!r}")
        G = self._plugin_gram()
        plugin = G.diagonal().clone()
        unbiased, ok = self._debiased(plugin)
        if estimator == "unbiased":
            G.diagonal().copy_(unbiased)
        elif estimator == "shrunk":
            G = shrink_gram(G, unbiased)
        if not with_info:
            return G
        fallback = {i: "previous" if self.has_diag[i] else "plugin" for i in (~ok).nonzero().flatten().tolist()}
        return G, {"plugin_diag": plugin.tolist(), "unbiased_diag": unbiased.tolist(), "diag_fallback": fallback}

    def _debiased(self, plugin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m,) the unbiased G_ii where the window allows it (`ok`), else the last de-biased one, else `plugin`."""
        value, ok = unbiased_diagonal(plugin * self.tokens**2, self.sq.cpu(), self.tokens, self.tokens_sq)
        return torch.where(ok, value, torch.where(self.has_diag, self.last_diag, plugin)), ok

    def _plugin_gram(self) -> torch.Tensor:  # (m, m) ĝ_i · ĝ_j
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
        self._end_backward()
        if self.guard and bool(self._step_tokens.any()):
            self.commit()

    def stale(self) -> list[int]:
        """Domains with no tokens in the current window (their last seen gradient stands in)."""
        return (self.tokens == 0).nonzero().flatten().tolist()

    def reset(self) -> None:
        """End the window: remember each seen domain's gradient, then zero the accumulators."""
        self._end_backward()
        fresh = self.tokens > 0
        if fresh.any():
            rows = fresh.to(self.last.device)
            means = self._mean_grads()
            self.last[rows] = self._sketch_rows(means)[rows]
            self.seen |= fresh
            diag, ok = self._debiased(sum((g.flatten(1).double() ** 2).sum(1) for g in means).cpu())
            self.last_diag[ok], self.has_diag = diag[ok], self.has_diag | ok
        for s in [*self.sums, self.sq, self.tokens, self.tokens_sq]:
            s.zero_()

    def attach(self) -> None:
        """Route the tracked layers through the tracker (done on construction; again after `remove`): each tracked
        linear, and each PEFT LoRA layer whose A and B are both tracked (one function for the pair, lora.py)."""
        if self._originals is not None:
            return
        for name, mod in self.modules:
            if getattr(mod.__dict__.get("forward"), "tracker", None) is not None:
                raise RuntimeError(f"{name} is already tracked by another GradientTracker: remove() that one first")
        routed = [(mod, self._make_forward(i, mod)) for i, (_, mod) in enumerate(self.modules)]
        routed += [(layer, lora_forward(self, layer, adapter, ia, ib)) for _, layer, adapter, ia, ib in self._lora]
        self._originals = [(mod, mod.__dict__.get("forward")) for mod, _ in routed]
        for mod, forward in routed:
            mod.forward = forward

    def remove(self) -> None:
        """Give the tracked layers back their own forward (the accumulators stay; `attach` resumes tracking)."""
        for mod, orig in self._originals or []:
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
        """Bytes held by the accumulators (window, last seen, step buffer) and, sketched, the staging sketch of a
        backward pass (k_max × N, k_max: the most domains a micro-batch has held so far)."""
        held = [*self.sums, self.last, *(self._step_sums or []), *self._staging.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def allreduce_bytes(self) -> int:
        """Bytes each `sync` all-reduces."""
        return sum(t.numel() * t.element_size() for t in self.sums) + 3 * self.m * 8

    # -- inside the backward pass -----------------------------------------------------------------------------------

    def _mean_grads(self) -> list[torch.Tensor]:
        """Per accumulator: window sums / tokens (0 where the window has no tokens)."""
        self._end_backward()
        out = []
        for s in self.sums:
            tokens = self.tokens.to(s.device, torch.float32).view(-1, *[1] * (s.dim() - 1))
            out.append(s / tokens.clamp(min=1))
        return out

    def _sketch_rows(self, means: list[torch.Tensor]) -> torch.Tensor:
        """(m, N): the domains' gradients in the store's sketch (the tracker's own sketch is already one)."""
        if self.sketches is not None:
            return means[0]
        return _sketch_domains(means, self._fallback, torch.zeros_like(self.last))

    def _make_forward(self, index: int, mod: nn.Linear):
        def forward(x):
            if not (self.enabled and torch.is_grad_enabled() and (x.requires_grad or mod.weight.requires_grad)):
                return F.linear(x, mod.weight, mod.bias)
            if torch.compiler.is_compiling():  # dynamo is tracing: leave the tracked linear to eager mode
                return _tracked_linear_eager(self, index, x, mod)
            return _tracked_linear(self, index, x, mod)

        return Routed(self, mod, mod.__dict__.get("forward"), forward)

    def _domains_for(self, batch_dim: int, index: int) -> _Groups:
        if self._sample_domains is None:
            raise RuntimeError("GradientTracker: call set_domains(domain_ids) before the forward pass")
        name, vision_side = self.modules[index][0], self._vision_side[index]
        if vision_side and self._image_domains is not None and batch_dim == self._image_domains.numel():
            return self._groups["image"]
        if vision_side and self._image_domains is None:
            raise RuntimeError(
                f"GradientTracker: {name} sees images, not samples: pass image_domain_ids (the domain of each of its "
                f"{batch_dim} rows) to set_domains (BalanceTrainer: your collator returns them as 'image_domain_ids', "
                f"as rbvl.data.collate.Encoder's info has them)"
            )
        n = self._sample_domains.numel()
        if batch_dim == n:
            return self._groups["sample"]
        if n and batch_dim % n == 0 and re.search(CROSS_ATTENTION, name):
            return self._tile_groups(batch_dim // n)
        if self._image_domains is not None and batch_dim == self._image_domains.numel():
            return self._groups["image"]
        raise RuntimeError(
            f"GradientTracker: {name} sees a batch of {batch_dim}, but set_domains gave "
            f"{self._sample_domains.numel()} sample ids"
            + ("" if self._image_domains is None else f" and {self._image_domains.numel()} image ids")
        )

    def _tile_groups(self, per_sample: int):
        """Row groups of a cross-attention layer whose rows are `per_sample` tiles of each sample, sample-major."""
        key = ("tiles", per_sample)
        if key not in self._groups:
            tiles = self._sample_domains.repeat_interleave(per_sample).tolist()
            self._groups[key] = self._grouping.of(tiles, self.sq.device)
        return self._groups[key]
