"""Per-rank memory of a recipe under DDP and under FSDP2, counted on the meta device (`rbvl bench balance --recipe`).

    rows = per_rank_memory(model, tracker_bytes, worlds=(8, 64))   # model: the recipe's, LoRA on, on the meta device

What is counted, per rank, from the parameters' own dtypes (the recipe's `model.dtype`; PEFT keeps LoRA in fp32):
weights, gradients of the trainable ones, AdamW's two moments (shaped and typed like the parameter), and the
GradientTracker's accumulators (per rank under both: each rank sums its own domains' gradients, all-reduced at sync).
Under FSDP the first three are split over the ranks; while a group computes, its parameters are all-gathered whole,
and FSDP2 prefetches the next group: `gathered` is twice the largest group (decoder layer, vision tower or the root's
embeddings, head and projector) in the compute dtype. Activations are not counted: they depend on batch, sequence and
gradient checkpointing, not on how the model is split.
"""

from __future__ import annotations

import torch
from torch import nn

GIB = 2**30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each FSDP group `shard_model` would make: each decoder layer, the vision tower, the root."""
    from rbvl.runtime.sharding import _vision_tower, decoder_layers

    units = decoder_layers(model)
    tower = _vision_tower(model)
    if tower is not None:
        units.append(tower)
    taken: set[int] = set()
    groups = []
    for unit in units:
        params = [p for p in unit.parameters() if id(p) not in taken]
        taken.update(id(p) for p in params)
        groups.append(params)
    groups.append([p for p in model.parameters() if id(p) not in taken])  # the root: what is left
    return groups


def per_rank_memory(model: nn.Module, tracker_bytes: int, worlds=(8, 64), compute_bytes: int = 2) -> dict:
    """{"ddp": {...}, "fsdp": {world: {...}}}: GiB per rank of weights, grads, optimizer, tracker, gathered, total.

    `compute_bytes`: bytes per element of the all-gathered parameters under FSDP (2: bf16 mixed precision)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights, grads, optim = _bytes(params), _bytes(trainable), 2 * _bytes(trainable)
    largest = max(sum(p.numel() for p in g) for g in _groups(model))
    ddp = {"weights": weights, "grads": grads, "optimizer": optim, "tracker": tracker_bytes, "gathered": 0}
    out = {"ddp": _gib(ddp), "fsdp": {}, "largest_group_params": largest}
    for w in worlds:
        row = {
            "weights": weights / w,
            "grads": grads / w,
            "optimizer": optim / w,
            "tracker": tracker_bytes,
            "gathered": 2 * largest * compute_bytes,
        }
        out["fsdp"][w] = _gib(row)
    return out


def _gib(row: dict) -> dict:
    row = {k: v / GIB for k, v in row.items()}
    row["total"] = sum(row.values())
    return row


def print_memory(mem: dict, tracker_label: str) -> None:
    worlds = list(mem["fsdp"])
    print(f"  per-rank memory, GiB (weights + grads + AdamW + tracker ({tracker_label}); activations not counted)")
    cols = ["weights", "grads", "optimizer", "tracker", "gathered", "total"]
    print(f"  {'':14s}" + "".join(f"{c:>11s}" for c in cols))
    rows = [("ddp, any world", mem["ddp"])] + [(f"fsdp, world {w}", mem["fsdp"][w]) for w in worlds]
    for label, row in rows:
        print(f"  {label:14s}" + "".join(f"{row[c]:11.2f}" for c in cols))


def meta_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
