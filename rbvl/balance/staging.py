"""What one backward pass does with the parts the tracked layers hand over: hold them, then take all the layers'
norms and adds together in a few multi-tensor operations when the pass ends (GradientTracker inherits it;
rbvl/balance/tracker.py).

Per layer and call, whatever the number k of domains present, the layer's backward appends its parts to a list (a
part too large to stay in the CPU's cache goes at once: a norm and one add). `_flush` (when the pass ends, or once
STAGE_BUDGET elements are held) squares and sums every layer's per-domain norms (layers are disjoint coordinates, so
their squares add up to ‖s_ik‖²) and adds the parts into the window with one multi-tensor add (exact; a scatter per
layer for domains with non-consecutive ids) or, sketched, a multiply-add per run into a staging sketch. What is the same for every layer (the loss scale, the squared norms, the sketch's rows'
domains) is applied once per row grouping in `_end_backward`, an autograd final callback.
"""

from __future__ import annotations

import logging

import torch

from rbvl.balance.layers import _Groups, add_rows
from rbvl.balance.sketch import _sketch_parts, run_targets

log = logging.getLogger(__name__)

STAGE_BUDGET = 2**24  # elements of parts a backward pass holds before flushing them (64 MiB in fp32)
# Parts of at least this many elements go into the window at once on these devices: on the CPU, reading a part back
# from memory at the flush costs more than the Python the flush saves (elsewhere: held up to STAGE_BUDGET)
HOLD_BELOW = {"cpu": 2**15}
ROW_VIEWS_KEPT = 4096  # window-row views (and lists of them) cached before the cache starts over


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

    def _flops_of(self, index: int | tuple[int, ...]) -> int:
        """`_part_flops` of layer `index` (summed over the layers of a tuple), worked out once."""
        flops = self._flops_at.get(index)
        if flops is None:
            if isinstance(index, tuple):
                flops = sum(self._flops_of(i) for i in index)
            else:
                flops = self._part_flops(index, self.modules[index][1].weight)
            self._flops_at[index] = flops
        return flops

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

    def _add_parts(self, index: int, groups: _Groups, parts: torch.Tensor, j: int | None = None) -> None:
        """Stage layer `index`'s share of this backward pass (called by its backward): parts (k, out, in), the k
        present domains' parts in `groups`' order, or one part (out, in): domain j's (j: its position; default the only
        domain present); fp32, as backpropagated (the loss scale is applied when they join the window).

        Small parts are held until the pass ends (or until STAGE_BUDGET elements are held), then `_flush` takes all
        their layers' norms and adds in a few multi-tensor operations: per layer and call, the backward pass pays a
        list append. Parts past `HOLD_BELOW` on their device (on the CPU, more than stay in cache) go at once: a norm
        into the layer's row of the staged norms and one add, while they are hot."""
        if not self._queued and torch._C._current_graph_task_id() != -1:  # the first tracked layer of a backward
            self._queued = True  # pass: `_end_backward` runs when the pass is over (outside one: at the next read)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        stage = groups.stage or self._stage(groups)
        if j is not None or parts.numel() >= HOLD_BELOW.get(parts.device.type, STAGE_BUDGET):
            self._add_now(stage, groups, index, parts, j)
            return
        stage.held.append((index, parts))
        stage.held_elems += parts.numel()
        if stage.held_elems > STAGE_BUDGET:
            self._flush(stage, groups)

    @torch.no_grad()
    def _add_now(self, stage: _Stage, groups: _Groups, index: int, parts: torch.Tensor, j: int | None) -> None:
        """Layer `index`'s parts (or domain j's part) into the staged norms and the window, now."""
        one = parts.dim() == 2
        self.extra_flops += (1 if one else groups.k) * self._flops_of(index)
        out = stage.rows[index] if j is None else stage.norms[index, j]  # (k,), or () for one part
        if index in stage.written:  # the layer ran twice in this pass (a reused module): its norms add up in squares
            out.copy_(torch.hypot(out, torch.linalg.vector_norm(parts, dim=(-2, -1))))
        else:
            stage.written.add(index)
            torch.linalg.vector_norm(parts, dim=(-2, -1), out=out)
        self._add_to_window(stage, groups, (index,), (parts,), j)

    @torch.no_grad()
    def _flush(self, stage: _Stage, groups: _Groups) -> None:
        """The held parts into the staged ‖s_ik‖² (Σ over layers of each domain's squared part norm: layers are
        disjoint coordinates) and into the window or the staging sketch."""
        if not stage.held:
            return
        indices, parts = zip(*stage.held, strict=True)
        stage.held, stage.held_elems = [], 0
        k = groups.k
        self.extra_flops += k * self._flops_of(indices)
        if k == 1:  # one multi-tensor norm
            stage.sq += torch.stack(torch._foreach_norm(list(parts))).double().square_().sum()
        else:  # per layer, its k domains' norms in one operation
            stage.sq += (
                torch.stack([torch.linalg.vector_norm(p, dim=(-2, -1)) for p in parts]).double().square_().sum(0)
            )
        self._add_to_window(stage, groups, indices, parts, None)

    def _add_to_window(self, stage: _Stage, groups: _Groups, indices, parts, j: int | None) -> None:
        """Layers `indices`' parts (k, out, in) each, or domain j's (out, in)) into the window, scaled (exact), or their
        sketches into the staging sketch."""
        one = j is not None or groups.k == 1
        j = j or 0
        if self.sketches is not None:
            for index, part in zip(indices, parts, strict=True):
                key = (index, j if one else -1)
                targets = stage.targets.get(key)
                if targets is None:
                    staging = stage.staging if not one else stage.staging_rows[j]
                    targets = stage.targets[key] = run_targets(staging, self.sketches, index)
                _sketch_parts(None, self.sketches, index, part, targets)
            return
        lo, hi = (groups.domains[j], groups.domains[j] + 1) if one else (groups.domains[0], groups.domains[-1] + 1)
        scale = self._scale
        if not (one or hi - lo == groups.k):  # domains not consecutive: a scatter into their window rows per layer
            for index, part in zip(indices, parts, strict=True):
                add_rows(self._target[index], groups.index, part * scale)
            return
        rows, repeats = self._rows_of(indices, lo, hi, one)  # one domain, or consecutive ones: views
        if isinstance(scale, torch.Tensor) and scale.device.type == "cpu":
            scale = float(scale)  # on the CPU a read, not a sync: then one fused multiply-add per layer
        if repeats:  # a layer run twice in the pass: its adds one after the other
            for row, part in zip(rows, parts, strict=True):
                row.addcmul_(part, scale) if isinstance(scale, torch.Tensor) else row.add_(part, alpha=scale)
        elif not isinstance(scale, torch.Tensor):
            torch._foreach_add_(rows, list(parts), alpha=scale)
        else:  # two multi-tensor kernels (a multiply-add by a 0-dim tensor would take one kernel per layer)
            torch._foreach_add_(rows, torch._foreach_mul(list(parts), scale))

    def _rows_of(self, indices: tuple[int, ...], lo: int, hi: int, one: bool) -> tuple[list[torch.Tensor], bool]:
        """Layers `indices`' window rows lo..hi-1 (`_rows_view` each), and whether a layer comes twice; made once."""
        key = (indices, lo, hi, one)
        rows = self._row_views.get(key)
        if rows is None:
            if len(self._row_views) >= ROW_VIEWS_KEPT:  # layers that run in some passes only (conditional paths)
                self._row_views.clear()
            views = [self._rows_view(index, lo, hi, one) for index in indices]
            rows = self._row_views[key] = views, len(set(indices)) < len(indices)
        return rows

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
        stages = [groups.stage for groups in pending]
        for groups in pending:  # first, so that a failure below leaves no cached grouping holding a stage
            groups.stage = None
        scale = self._scale
        if isinstance(scale, float) and not self._warned_unwatched:  # watch_loss's hook never ran in this pass
            self._warned_unwatched = True
            log.warning(
                "balance: a backward pass reached the tracked layers from a loss watch_loss never saw: the window "
                "holds the gradient as backpropagated (divided by the loss's normaliser, grad accumulation and loss "
                "scale), not each domain's Σ_t ∇ℓ_t; call tracker.watch_loss(loss, normalizer) before backward"
            )
        sq = self.sq if self._step_sq is None else self._step_sq
        for groups, stage in zip(pending, stages, strict=True):
            self._flush(stage, groups)
            if stage.written:  # the norms of the parts that went at once
                stage.sq += stage.norms.double().square_().sum(0)
                stage.norms.zero_()
                stage.written.clear()
            sq.index_add_(0, groups.index, stage.sq * (scale * scale))  # scale: 1.0 until watch_loss's hook sets it
            stage.sq.zero_()
            if self.sketches is not None:
                target = self._target[0][:, : self.sketches.dim]  # (m, N)
                add_rows(target, groups.index, stage.staging * scale)
                stage.staging.zero_()
                self.extra_flops += groups.k * self._fold_flops()

    def _fold_flops(self) -> int:  # per domain present and micro-batch: scale and add its staged sketch
        return 0 if self.sketches is None else 2 * self.sketches.dim


class _Stage:
    """Buffers one backward pass fills for one row grouping with k domains present: `sq` (k,), Σ over the flushed
    layers of each domain's squared part norm; `held`, the (layer, parts) not yet flushed (`held_elems` elements);
    `norms` (layers, k), each layer's ‖part‖ per domain for parts that went at once (`rows`: each layer's row, views
    made once; `written`: the layers written this pass); and, sketched, `staging` (k, N), the parts' sketches
    (`staging_rows`: its k rows)."""

    def __init__(self, n_layers: int, k: int, device, staging: torch.Tensor | None):
        self.sq = torch.zeros(k, dtype=torch.float64, device=device)
        self.norms = torch.zeros(n_layers, k, device=device)
        self.rows = list((self.norms.view(-1) if k == 1 else self.norms).unbind(0))  # (k,) each; () when k = 1
        self.written: set[int] = set()
        self.held: list[tuple[int, torch.Tensor]] = []
        self.held_elems = 0
        self.staging = None if staging is None else staging[:k]
        self.staging_rows = [] if staging is None else list(self.staging.unbind(0))
        self.targets: dict[tuple[int, int], list] = {}  # (layer, row; -1: all k) → the staging's views at its runs
