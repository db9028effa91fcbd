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


class _Groups(list):
    """[(domain, rows)] of one micro-batch, and `index`: the domains present, a tensor on the tracker's device."""

    index: torch.Tensor


def _row_groups(ids: torch.Tensor | None, device=None) -> _Groups:
    """[(domain, rows)] for the rows of each domain present: a slice where they are contiguous, else indices."""
    groups = _Groups()
    present = [] if ids is None or ids.numel() == 0 else torch.unique(ids).tolist()
    for d in present:
        rows = (ids == d).nonzero().flatten()
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        groups.append((d, slice(lo, hi) if hi - lo == rows.numel() else rows))
    groups.index = torch.tensor(present, dtype=torch.long).to(device)  # once per micro-batch, not per layer
    return groups


def label_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B,) label tokens per sample that a causal LM loss averages over (labels shifted by one, as HF models do)."""
    return (labels[:, 1:] != ignore_index).sum(1)


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
        tracking, parts = ctx.tracker.enabled, []
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
                parts.append(part)
        if parts:
            ctx.tracker._add_sq_norms(groups, parts)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None
