"""The optimizer side of a step: AdamW over the trainable parameters, warmup + cosine lr, precision, clipping.

optimizer, scheduler = build_optimizer(params, cfg)
with autocast_context(cfg.train.precision, device): loss = ...
overflowed = optimizer_step(optimizer, scheduler, scaler, params, cfg.optim.max_grad_norm)
"""

from __future__ import annotations

import contextlib
import math

import torch


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> tuple[torch.optim.Optimizer, object]:
    """AdamW (`optim.lr`, `optim.betas`, `optim.weight_decay`) and its lr schedule (`lr_factor`)."""
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def lr_factor(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio · lr at max_steps."""
    warmup = cfg.optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_context(precision: str, device: torch.device):
    """`train.precision` as an autocast context: bf16 / fp16 autocast, or nothing for fp32 (`auto`: bf16 on a GPU
    that has it)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def optimizer_step(optimizer, scheduler, scaler: torch.amp.GradScaler, params, max_grad_norm: float) -> bool:
    """Clip, step, advance the lr, zero the gradients; True when fp16 gradients overflowed (the scaler skipped it)."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    overflowed = scaler.is_enabled() and scaler.get_scale() < scale
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return overflowed
