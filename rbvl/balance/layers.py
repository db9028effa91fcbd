"""Which layers the tracker reads: `params` ("lora", "head", or regexes) → the nn.Linear modules, and which of them
see images (their rows take `image_domain_ids`) rather than samples; and which rows of a micro-batch each domain holds.

The family table (rbvl.model.families) is not imported here, so rbvl.balance needs torch alone: for `params="head"` the
caller passes the family's head patterns (`rbvl.model.families.head_patterns(model)`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
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
