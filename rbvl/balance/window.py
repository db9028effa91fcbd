"""The tracker's window as state (GradientTracker inherits it; rbvl/balance/tracker.py): saved and loaded with a
checkpoint (`state_dict`), and moved to wherever the tracked layers are (`to`)."""

from __future__ import annotations

import logging

import torch

from rbvl.balance.grouped import try_grouped_products
from rbvl.balance.layers import _GroupCache
from rbvl.balance.sketch import SIGN_CACHE_BYTES, SKETCH, _plan_sketches

log = logging.getLogger(__name__)


class _Window:
    """Reads and writes the tracker's accumulators (`sums`, `sq`, `last`, ...) as a whole."""

    def follow_layers(self) -> None:
        """Move the window where the tracked layers went, if they moved since the last call (`set_domains` calls it
        before every micro-batch): a Trainer that places or shards the model after the tracker was built, a model
        built on the meta device and materialised later, a user's `model.cuda()`. Only a move counts: layers whose
        weights rest elsewhere than they compute (FSDP2's CPU offload) leave the window where `to` put it, and the
        meta device (shapes only) never takes it."""
        device = self.modules[0][1].weight.device
        if device != self._layers_at:
            self._layers_at = device
            if device.type != "meta":
                self.to(device)

    def to(self, device) -> _Window:
        """The window, its buffers and its sketches on `device`, their contents kept (between backward passes)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.sq.device:
            return self
        self._end_backward()
        self.sums = [_moved(s, device) for s in self.sums]
        self._step_sums = None if self._step_sums is None else [_moved(s, device) for s in self._step_sums]
        self._target = self._step_sums if self.guard else self.sums
        self.sq, self.last = _moved(self.sq, device), _moved(self.last, device)
        self._step_sq = None if self._step_sq is None else _moved(self._step_sq, device)
        shapes = [mod.weight.shape for _, mod in self.modules]  # the sketches again: seeded, the same hashing
        self.sketches = _plan_sketches(shapes, self.sketch_dim, self.seed, device, cache_bytes=SIGN_CACHE_BYTES)
        if self.sketches is None:
            self._fallback = _plan_sketches(shapes, self._fallback.dim, self.seed + 1, device)
        else:
            self._fallback = self.sketches
        self._staging, self._stages, self._row_views, self._grouping = {}, {}, {}, _GroupCache()
        groups = getattr(self, "_groups", {})  # the current micro-batch's row groupings, made again on `device`
        self._groups = {key: self._grouping.of(g._ids, device) for key, g in groups.items()}
        self._scale = 1.0
        try_grouped_products(device)
        return self

    def restart(self) -> None:
        """Forget everything, as a new tracker would: the window, each domain's last seen gradient, the counters (a
        new run on the same tracker: BalanceTrainer.train() called again without resuming)."""
        self._end_backward()
        step = [*(self._step_sums or []), self._step_tokens, self._step_tokens_sq]
        for s in [*self.sums, self.sq, self.tokens, self.tokens_sq, self.last, *step]:
            s.zero_()
        if self._step_sq is not None:
            self._step_sq.zero_()
        for s in (self.last_diag, self.has_diag, self.seen):
            s.zero_()
        self.skipped_steps = 0

    def state_dict(self) -> dict:
        self._end_backward()
        if any(bool(s.any()) for s in self._step_sums or []) or bool(self._step_tokens.any()):
            raise RuntimeError("GradientTracker: commit() the step before saving the tracker")
        return {
            "sums": [s.cpu().clone() for s in self.sums],
            "tokens": self.tokens.clone(),
            "tokens_sq": self.tokens_sq.clone(),
            "sq": self.sq.cpu().clone(),
            "last_diag": self.last_diag.clone(),
            "has_diag": self.has_diag.clone(),
            "last": self.last.cpu().clone(),
            "seen": self.seen.clone(),
            "names": self.tracked_names,
            "sketch_dim": self.sketch_dim,
            "sketch": SKETCH,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "extra_flops": self.extra_flops,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.sq.is_meta:
            raise RuntimeError(
                "GradientTracker.load_state_dict: the window is on the meta device, where nothing can be loaded; "
                "load it once the model is materialised, or move the window first (tracker.to(device))"
            )
        if list(state["names"]) != self.tracked_names:
            raise ValueError("tracker state was saved for other tracked layers")
        if (state.get("sketch_dim", 0), state.get("seed", self.seed)) != (self.sketch_dim, self.seed):
            raise ValueError(
                f"tracker state was saved with sketch_dim={state.get('sketch_dim', 0)}, seed={state.get('seed')}; "
                f"this tracker has sketch_dim={self.sketch_dim}, seed={self.seed}"
            )
        if state.get("sketch") != SKETCH and self._sketched_anywhere():
            # saved under an older sketch layout: its window and last seen gradients cannot join this one's
            log.warning(
                "balance: the tracker state was saved under an older sketch layout; the window restarts and the "
                "domains' last seen gradients are forgotten (p and the rest of the run resume)"
            )
            state = {**state, "sums": [torch.zeros_like(s) for s in self.sums], "last": torch.zeros_like(self.last)}
            state.update(tokens=torch.zeros(self.m), tokens_sq=torch.zeros(self.m), sq=torch.zeros(self.m))
            state.update(seen=torch.zeros(self.m, dtype=torch.bool))
        for dst, src in zip(self.sums, state["sums"], strict=True):
            dst.copy_(src)
        self.last.copy_(state["last"])
        self.tokens = state["tokens"].clone().double()
        # Saved before the unbiased diagonal: the window so far counts as one micro-batch (T_i0 = T_i, s_i0 = its sum).
        self.tokens_sq = state.get("tokens_sq", self.tokens**2).clone().double()
        self.sq.copy_(state["sq"] if "sq" in state else sum((s.flatten(1).double() ** 2).sum(1) for s in self.sums))
        self.last_diag = state.get("last_diag", torch.zeros(self.m)).clone().double()
        self.has_diag = state.get("has_diag", torch.zeros(self.m)).clone().bool()
        self.seen = state["seen"].clone().bool()
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.extra_flops = int(state.get("extra_flops", 0))

    def _sketched_anywhere(self) -> bool:
        """Whether the window or the last-seen store holds a compressing sketch (not the exact layout)."""
        return any(plan is not None for plans in (self.sketches, self._fallback) if plans for plan in plans)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the meta device (shapes only, nothing accumulated there yet), zeros."""
    return torch.zeros_like(t, device=device) if t.is_meta else t.to(device)
