"""What one backward pass does with the parts the tracked layers hand over: stage them per layer, then add them
into the window once, when the pass ends (GradientTracker inherits it; rbvl/balance/tracker.py).

Per layer and call, whatever the number k of domains present: ‖part‖ per domain into the pass's staged norms (layers
are disjoint coordinates, so their squares add up to ‖s_ik‖²) and one add (exact: into the window; sketched: a multiply-add
by the layer's signs into its runs of a staging sketch). What is the same for every layer (the loss scale, the
squared norms, the sketch's signs and its rows' domains) is applied once per row grouping in `_end_backward`, an
autograd final callback.
"""

from __future__ import annotations

import torch

from rbvl.balance.layers import _Groups, add_rows
from rbvl.balance.sketch import _sketch_parts, run_targets


class _Staging:
    """The backward-pass half of GradientTracker; it reads the tracker's window (`_target`, `sq`, `_scale`, ...)."""

    def flops(self, domain_ids, tokens_per_sample: int) -> int:
        """Extra FLOPs tracking adds to one micro-batch of these domains (analytic; what `extra_flops` counts): per
        tracked layer and domain present, ‖part‖² and one scale-and-add of the part into its accumulator (exact) or the
        sketch — O(out · in), independent of tokens; a frozen tracked layer also pays 2 · tokens · out · in."""
        ids = torch.as_tensor(domain_ids).flatten()
        present = len(set(ids.tolist()))
        total = 0
        for i, (_, mod) in enumerate(self.modules):
            total += present * self._part_flops(i, mod.weight)
            if not mod.weight.requires_grad:
                total += 2 * mod.weight.numel() * ids.numel() * tokens_per_sample
        return total + present * self._fold_flops()

    def _part_flops(self, index: int, weight: torch.Tensor) -> int:
        if self.sketches is None:
            return 4 * weight.numel()  # scale-and-add (a multiply-add); ‖part‖² (a multiply-add)
        if self.sketches[index] is None:
            return 3 * weight.numel()  # the exact layout: an add into the layer's slice; ‖part‖²
        if self.sketches.signs[index] is not None:
            return 4 * weight.numel()  # a multiply and an add (by the cached signs, into the layer's runs); ‖part‖²
        return 5 * weight.numel()  # the row and column signs applied (two multiplies), an add; ‖part‖²

    def _stage(self, groups: _Groups) -> _Stage:
        """This backward pass's staging buffers for `groups` (k domains present), made once per (grouping, k)."""
        stage = groups.stage
        if stage is not None:
            return stage
        slot, k = len(self._pending), groups.k
        stage = self._stages.get((slot, k))
        if stage is None:
            staging = None
            if self.sketches is not None:
                staging = self._staging.get(slot)
                if staging is None or staging.shape[0] < k:  # grow: every k of this slot gets new views
                    staging = torch.zeros(k, self.sketches.dim, device=self.sq.device)
                    self._staging[slot] = staging
                    self._stages = {key: st for key, st in self._stages.items() if key[0] != slot}
            stage = _Stage(len(self.modules), k, self.sq.device, staging)
            self._stages[(slot, k)] = stage
        groups.stage = stage
        self._pending.append(groups)
        return stage

    def _backward_started(self) -> None:
        """Called by each tracked layer's backward: queue `_end_backward` to run once this backward pass is over."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    @torch.no_grad()
    def _add_parts(self, index: int, groups: _Groups, parts: torch.Tensor, j: int | None = None) -> None:
        """Stage layer `index`'s share of this backward pass: parts (k, out, in), the k present domains' parts in
        `groups`' order, or one part (out, in): domain j's (j: its position; default the only domain present); fp32,
        as backpropagated (the loss scale is applied in `_end_backward`, or fused into the exact add).

        Per call, whatever k: ‖part‖ per domain into the layer's row of the staged norms (layers are disjoint
        coordinates, so their squares add up to ‖s_ik‖²), and one add: exact, a multiply-add into the window (one
        domain, or consecutive ones: their (k, out, in) window rows, a view made once) or one scatter of the scaled
        parts; sketched, a multiply-add of the parts by the layer's signs into its runs of the staging sketch (one run
        when the layer fits in N)."""
        stage = self._stage(groups)
        one = parts.dim() == 2
        flops = self._flops_at.get(index)
        if flops is None:
            flops = self._flops_at[index] = self._part_flops(index, self.modules[index][1].weight)
        self.extra_flops += flops if one else groups.k * flops
        out = stage.rows[index] if j is None else stage.norms[index, j]  # (k,), or () for one part
        if index in stage.written:  # the layer ran twice in this pass (a reused module): its norms add up in squares
            out.copy_(torch.hypot(out, torch.linalg.vector_norm(parts, dim=(-2, -1))))
        else:
            stage.written.add(index)
            torch.linalg.vector_norm(parts, dim=(-2, -1), out=out)
        j = j or 0
        if self.sketches is not None:
            key = (index, j if one else -1)
            targets = stage.targets.get(key)
            if targets is None:
                staging = stage.staging if not one else stage.staging_rows[j]
                targets = stage.targets[key] = run_targets(staging, self.sketches, index)
            _sketch_parts(None, self.sketches, index, parts, targets)
        else:
            lo, hi = (groups.domains[j], groups.domains[j] + 1) if one else (groups.domains[0], groups.domains[-1] + 1)
            if one or hi - lo == groups.k:  # one domain, or consecutive ones: a view of the window, one fused add
                rows = self._rows_view(index, lo, hi, one)
                scale = self._scale
                rows.addcmul_(parts, scale) if isinstance(scale, torch.Tensor) else rows.add_(parts, alpha=scale)
            else:
                add_rows(self._target[index], groups.index, parts * self._scale)

    def _rows_view(self, index: int, lo: int, hi: int, one: bool) -> torch.Tensor:
        """Layer `index`'s window rows lo..hi-1 ((out, in) for one row): a view, made once."""
        view = self._row_views.get((index, lo, hi))
        if view is None:
            view = self._target[index][lo] if one else self._target[index][lo:hi]
            self._row_views[(index, lo, hi)] = view
        return view

    @torch.no_grad()
    def _end_backward(self) -> None:
        """When a backward pass ends: add what it staged to the window, scaled to Σ_t ∇ℓ_t. A few operations per row
        grouping (samples, images) whatever the layers: Σ_k ‖s_ik‖² gets the squared norms summed over layers and,
        sketched, the window gets the staged sketches, scaled, at their domains' rows."""
        self._queued = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        scale = self._scale
        sq = self.sq if self._step_sq is None else self._step_sq
        for groups in pending:
            stage, groups.stage = groups.stage, None
            norms = stage.norms.double().square_().sum(0)  # (k,) Σ over layers of ‖part‖²
            sq.index_add_(0, groups.index, norms * (scale * scale))  # scale: 1.0 until watch_loss's hook sets it
            stage.norms.zero_()
            stage.written.clear()
            if self.sketches is not None:
                target = self._target[0][:, : self.sketches.dim]  # (m, N)
                add_rows(target, groups.index, stage.staging * scale)
                stage.staging.zero_()
                self.extra_flops += groups.k * self._fold_flops()

    def _fold_flops(self) -> int:  # per domain present and micro-batch: scale and add its staged sketch
        return 0 if self.sketches is None else 2 * self.sketches.dim


class _Stage:
    """Buffers one backward pass fills for one row grouping with k domains present: `norms` (layers, k), each layer's
    ‖part‖ per domain (`rows`: each layer's row, views made once), and, sketched, `staging` (k, N), the parts'
    sketches (`staging_rows`: its k rows)."""

    def __init__(self, n_layers: int, k: int, device, staging: torch.Tensor | None):
        self.norms = torch.zeros(n_layers, k, device=device)
        self.rows = list((self.norms.view(-1) if k == 1 else self.norms).unbind(0))  # (k,) each; () when k = 1
        self.written: set[int] = set()  # layers whose norms this pass has written
        self.staging = None if staging is None else staging[:k]
        self.staging_rows = [] if staging is None else list(self.staging.unbind(0))
        self.targets: dict[tuple[int, int], list] = {}  # (layer, row; -1: all k) → the staging's views at its runs
