"""Which layers the tracker reads: `params` ("lora", "head", or regexes) → the nn.Linear modules, and which of them
see images (their rows take `image_domain_ids`) rather than samples; which rows of a micro-batch each domain holds; and
`_TrackedLinear`, the autograd function those layers run so that their backward hands each domain its part.

The family table (rbvl.model.families) is not imported here, so rbvl.balance needs torch alone: for `params="head"` the
caller passes the family's head patterns (`rbvl.model.families.head_patterns(model)`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Modules that see images (or tiles, or patch rows) rather than samples: their rows take `image_domain_ids`.
VISION_SIDE = r"(multi_modal_projector|vision_tower|vision_model|visual|mm_projector|connector|merger)"
# Cross-attention keys and values (Mllama): their rows are each sample's image tiles, (batch · images · tiles) of
# them, sample-major; each row takes its sample's domain.
CROSS_ATTENTION = r"\.cross_attn\.(k_proj|v_proj)(\.|$)"


def select_modules(
    model: nn.Module, params: str | Sequence[str], head_patterns: Sequence[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers that `params` names (see GradientTracker; `head_patterns` serve `params="head"`)."""
    linears = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if params == "lora":
        found = [(n, mod) for n, mod in linears if re.search(r"\.lora_(A|B)\.[^.]+$", n)]
        if not found:
            raise ValueError("params='lora' but the model has no LoRA adapters (wrap it with peft.get_peft_model)")
        return found
    if params == "head":
        if head_patterns is None:
            raise ValueError(
                "params='head' needs head_patterns= (the regexes of the LM head and the projector's last linear for "
                "this model's family), e.g. GradientTracker(model, m, params='head', "
                "head_patterns=rbvl.model.families.head_patterns(model))"
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [
            (n, mod)
            for n, mod in linears
            if "original_module" not in n  # PEFT's frozen copy beside a modules_to_save module
            and (mod is head or any(re.search(p, n) for p in head_patterns))
        ]
        if not found:
            raise ValueError(
                f"params='head' found no LM head or projector linear in this model (looked for {list(head_patterns)})"
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


class _Groups:
    """One micro-batch's rows by domain, worked out on the CPU from the batch's domain ids before the forward pass,
    so the backward pass never asks the device where a domain's rows are.

    `domains`: the k domains present (sorted; `index`, the same on the tracker's device). `local`: None when the rows
    are sorted by domain in segments of equal length (one domain is the common case), so the k parts are one batched
    product over views; else, on the device, each row's position among the present domains, so the rows' parts are
    summed into the k domains' parts by one scatter (`add_rows`). `rows`: each domain's rows (a slice or CPU indices), for a
    layer too large to hold k parts at once.
    """

    def __init__(self, ids: torch.Tensor | None, device=None):
        ids = torch.zeros(0, dtype=torch.long) if ids is None else ids
        self.n_rows = ids.numel()
        present, counts = torch.unique(ids, return_counts=True)  # on the CPU: no device sync
        self.domains = present.tolist()
        self.k = len(self.domains)
        sorted_rows = self.n_rows == 0 or bool((ids[1:] >= ids[:-1]).all())
        equal = self.k > 0 and bool((counts == counts[0]).all())
        self.index = present.to(device, non_blocking=True)  # (k,)
        self.local = None
        if not (sorted_rows and equal):
            self.local = torch.searchsorted(present, ids).to(device, non_blocking=True)  # (B,) row → position
        self.rows = []
        for d in self.domains:
            where = (ids == d).nonzero().flatten()
            lo, hi = int(where[0]), int(where[-1]) + 1
            self.rows.append(slice(lo, hi) if hi - lo == where.numel() else where)
        self._on_device: dict = {}
        self.base: torch.Tensor | None = None  # (k, 1, 1): the tracker's offsets of these domains in its sketch

    def __len__(self) -> int:
        return self.k

    def rows_on(self, j: int, device) -> slice | torch.Tensor:
        """Domain j's rows (j: position among the present domains), as a slice or indices on `device`."""
        rows = self.rows[j]
        if isinstance(rows, slice):
            return rows
        if (j, device) not in self._on_device:
            self._on_device[(j, device)] = rows.to(device, non_blocking=True)
        return self._on_device[(j, device)]


SERIAL_BELOW = 2**16  # elements: a smaller scatter on the CPU runs serially (see `add_rows`)


def add_rows(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> None:
    """target[index[j]] += source[j] along dim 0 (repeated indices add up), in one operation.

    index_add_ on a CUDA device, and for a large tensor on the CPU. A small one on the CPU goes through an accumulating
    index_put_, which runs serially: index_add_ and scatter_add_ of a small multi-dimensional tensor open a parallel
    region there, which costs milliseconds whenever the other cores are busy.
    """
    if source.device.type == "cpu" and source.numel() < SERIAL_BELOW:
        target.index_put_((index,), source, accumulate=True)
    else:
        target.index_add_(0, index, source)


def _row_groups(ids: torch.Tensor | None, device=None) -> _Groups:
    """The rows of each domain present in a micro-batch (`ids`: (B,) domain ids on the CPU)."""
    return _Groups(ids, device)


def label_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B,) label tokens per sample that a causal LM loss averages over (labels shifted by one, as HF models do)."""
    return (labels[:, 1:] != ignore_index).sum(1)


class _TrackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward computes ∂L/∂W as Σ_d δ_dᵀ a_d and hands the domains' parts to the tracker.

    The parts come from one batched product per layer whatever the number of domains present (`domain_parts`), so
    the operations a micro-batch launches grow with the tracked layers, not with layers × domains.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tracker, index, groups):
        out = F.linear(x, weight, bias)  # under autocast: the low-precision matmul autocast would do
        ctx.compute_dtype = out.dtype
        ctx.tracker, ctx.index, ctx.groups = tracker, index, groups
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dt = ctx.compute_dtype
        grad_out = grad_out if grad_out.dtype == dt else grad_out.to(dt)
        a = x if x.dtype == dt else x.to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight if weight.dtype == dt else weight.to(dt))
            grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        tracker, groups = ctx.tracker, ctx.groups
        if not tracker.enabled:  # switched off after the forward pass: the plain weight gradient
            if ctx.needs_input_grad[1]:
                grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        elif groups.k * weight.numel() <= PART_BUDGET:
            parts = domain_parts(grad_out, a, groups)  # (k, out, in) fp32: Σ_d parts = the weight gradient
            grad_w = (parts[0] if groups.k == 1 else parts.sum(0)) if ctx.needs_input_grad[1] else None
            tracker._add_parts(ctx.index, groups.index, parts, groups.base)
        else:  # a layer too large for k parts at once (an LM head): one domain at a time
            for j in range(groups.k):
                rows = groups.rows_on(j, x.device)
                delta_j, a_j = (grad_out[rows], a[rows]) if groups.k > 1 else (grad_out, a)
                part = delta_j.reshape(-1, delta_j.shape[-1]).T @ a_j.reshape(-1, a_j.shape[-1])
                part = part if part.dtype == torch.float32 else part.float()
                if ctx.needs_input_grad[1]:
                    grad_w = part if grad_w is None else grad_w + part
                base = None if groups.base is None else groups.base[j : j + 1]
                tracker._add_parts(ctx.index, groups.index[j : j + 1], part[None], base)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


PART_BUDGET = 2**25  # elements of a layer's k per-domain parts (or its rows' parts) held at once: 128 MiB in fp32


def domain_parts(delta: torch.Tensor, a: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """(k, out, in) fp32: each present domain's Σ_t δ_t a_tᵀ over its rows, in O(1) operations.

    Rows sorted by domain in equal segments (one domain always): one `bmm` over the k segments, as views, the matmul
    FLOPs of the plain product. Otherwise one `bmm` over the rows (each row's δᵀa; the same FLOPs again, no padding)
    and one scatter of the rows into their domains (B · out · in additions; a LoRA layer's weight-gradient product
    costs 2 · tokens · out · in). Rows are taken in chunks when B row parts would exceed PART_BUDGET.
    """
    k, n = groups.k, delta.shape[0]
    if groups.local is None:
        parts = torch.bmm(delta.reshape(k, -1, delta.shape[-1]).transpose(1, 2), a.reshape(k, -1, a.shape[-1]))
        return parts if parts.dtype == torch.float32 else parts.float()
    if delta.dim() != 3:
        delta, a = delta.reshape(n, -1, delta.shape[-1]), a.reshape(n, -1, a.shape[-1])  # (B, tokens, ·)
    parts = torch.zeros(k, delta.shape[-1], a.shape[-1], dtype=torch.float32, device=delta.device)
    step = max(1, PART_BUDGET // (delta.shape[-1] * a.shape[-1]))
    for lo in range(0, n, step):
        rows = torch.bmm(delta[lo : lo + step].transpose(1, 2), a[lo : lo + step])  # (rows, out, in)
        rows = rows if rows.dtype == torch.float32 else rows.float()
        add_rows(parts, groups.local[lo : lo + step] if n > step else groups.local, rows)
    return parts
