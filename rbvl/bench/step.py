"""The GradientTracker's own cost on a recipe's training step, timed within one process (`rbvl bench train`'s last
part; `--tracker-rounds 0` skips it).

The arms of `rbvl bench train` time whole training runs, which on a shared machine drift between rounds by far more
than the few percent the tracker costs. Here one model (the recipe's, with its LoRA) trains on the same micro-batches,
and blocks of `block` optimizer steps alternate with the tracker attached and removed. With it attached each
micro-batch does what `rbvl train` does for R&B (set_domains, watch_loss, commit after the optimizer step); the forward,
loss, backward, clip and AdamW step are `rbvl train`'s own (`causal_lm_token_loss`, `autocast_context`,
`optimizer_step`). There is no loader, logging or Balance update inside a block: the figure is the per-micro-batch
tracking alone (a Balance update's Gram matrix is timed by `rbvl bench balance`).

Micro-batches: `batch` samples drawn uniformly from the manifest's training samples (so each domain in proportion to
its size), sorted by domain as rbvl's loader sorts them: a micro-batch holds several domains in segments of unequal
lengths, as in training. The figure holds for this run; two runs on a shared machine can differ by more than either
interval (docs/balance.md).
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from rbvl.balance import GradientTracker
from rbvl.bench._timing import alternate, median_interval, verdict
from rbvl.data.collate import Encoder
from rbvl.evaluate import causal_lm_token_loss
from rbvl.model import apply_lora, load_model
from rbvl.model.families import head_patterns
from rbvl.train.optim import autocast_context, build_optimizer, optimizer_step


def tracker_step_cost(cfg, samples: list[dict], rounds: int, block: int = 6, batch: int | None = None) -> dict:
    """Seconds per optimizer step with the tracker removed and attached: `rounds` rounds of one block of `block` steps
    per side (the side that goes first alternates; one round before them untimed). Returns the per-round figures,
    their medians, and the per-round ratio untracked / tracked with its median and 90 % interval (`median_interval`);
    `window_sq`, Σ ‖s_ik‖² the tracker took in during each side's blocks (zero for the untracked side)."""
    device = torch.device(
        cfg.train.device if cfg.train.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    model, processor = load_model(cfg.model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = apply_lora(model, cfg.lora).to(device)
    model.train()
    chat = Encoder(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong)
    batches = _micro_batches(chat, samples, batch or cfg.train.batch_size, block, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    autocast = autocast_context(cfg.train.precision, device)
    tracker = GradientTracker(
        model,
        1 + max(s["domain"] for s in samples),
        params=cfg.balance.params,
        head_patterns=head_patterns(model) if cfg.balance.params == "head" else None,
        sketch_dim=cfg.balance.sketch_dim,
        seed=cfg.seed,
        guard_nonfinite=cfg.train.precision == "fp16",
    )
    tracker.remove()
    window_sq = {"untracked": 0.0, "tracked": 0.0}

    def measure(side: str, _round: int) -> float:
        tracked = side == "tracked"
        if tracked:
            tracker.attach()
        _sync(device)
        start = time.perf_counter()
        for inputs, info in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            labels = inputs.pop("labels")
            n_tokens = info["label_tokens"].sum().clamp(min=1)
            if tracked:  # what rbvl train's R&B mixer does before the forward pass
                tracker.set_domains(info["domain_ids"], info["label_tokens"], info.get("image_domain_ids"))
            with autocast:
                token_loss = causal_lm_token_loss(model(**inputs).logits, labels)
                loss = token_loss.sum() / n_tokens.to(token_loss.device, non_blocking=True)
            if tracked:
                tracker.watch_loss(loss, n_tokens)
            scaler.scale(loss).backward()
            status = optimizer_step(optimizer, scheduler, scaler, params, cfg.optim.max_grad_norm)
            if tracked:
                tracker.commit(skip=status != "ok")
        _sync(device)
        seconds = (time.perf_counter() - start) / len(batches)
        tracker.remove()
        window_sq[side] += float(tracker.sq.sum())  # what reached the window in this block (outside the timed span)
        tracker.reset()
        return seconds

    per_step = alternate(["untracked", "tracked"], rounds, measure, order="mirror", warmup=1)
    ratios = [u / t for u, t in zip(per_step["untracked"], per_step["tracked"])]
    return {
        "device": str(device),
        "block": block,
        "rounds": rounds,
        "step_s": per_step,
        "median_step_s": {side: statistics.median(v) for side, v in per_step.items()},
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "interval": median_interval(ratios),
        "window_sq": window_sq,
        "domains_per_batch": sorted({len(set(info["domain_ids"].tolist())) for _, info in batches}),
    }


def _micro_batches(chat: Encoder, samples: list[dict], size: int, count: int, seed: int) -> list:
    """`count` encoded micro-batches of `size` samples drawn from all of `samples`, each sorted by domain."""
    rng = random.Random(seed)
    out = []
    for _ in range(20 * count):
        drawn = sorted(rng.sample(samples, min(size, len(samples))), key=lambda s: s["domain"])
        inputs, info = chat(drawn, [s["domain"] for s in drawn])
        if inputs is not None:
            ids = {k: torch.as_tensor(info[k]) for k in ("domain_ids", "label_tokens", "image_domain_ids") if k in info}
            out.append((inputs, {**info, **ids}))
            if len(out) == count:
                return out
    raise ValueError(
        f"the encoder dropped every sample of {20 * count} micro-batches drawn for the in-process part: "
        f"data.max_length={chat.max_length} is too short for these samples (data.overlong={chat.overlong})"
    )


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a block's time is its steps' time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_step_cost(result: dict, goal: float | None = None) -> None:
    """The in-process part's two lines of `rbvl bench train`'s result."""
    med, interval = result["median_step_s"], result["interval"]
    spread = "" if interval is None else f" in [{interval[0]:.3f}, {interval[1]:.3f}] ({interval[2]:.0%})"
    target = "" if goal is None else f"; goal ≥ {goal:.2f}×: {verdict(interval, goal, more='--tracker-rounds')}"
    print(
        f"  the tracker within one process ({result['device']}, {result['rounds']} rounds of {result['block']} steps, "
        f"{'/'.join(map(str, result['domains_per_batch']))} domains per micro-batch): untracked "
        f"{med['untracked'] * 1e3:.2f} ms, tracked {med['tracked'] * 1e3:.2f} ms per step\n"
        f"  untracked / tracked step      {result['ratio']:.3f}×   (median of the {result['rounds']} rounds{spread}{target})"
    )
