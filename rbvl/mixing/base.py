"""The one interface every mixing strategy provides, and what the training loop hands it.

The loop calls the same hooks for every strategy, in this order (rbvl/train/loop.py; rbvl/integrations/hf.py for R&B):

    mixer.before_forward(meta)                         # per micro-batch: which domain each row belongs to
    mixer.watch_loss(loss, normalizer)                 # the micro-batch's mean loss, before backward
    mixer.observe(inputs, meta, loss_sum, tokens, token_loss)   # after backward: detached per-sample losses
    info = mixer.step(step, ctx, skipped=status != "ok")   # after optimizer step `step` (1-based): a log dict or
                                                       # None; a new p is already in the run's ProportionSchedule
    mixer.cost                                         # extra work, measured alike for every strategy

Cost accounting is the same for every strategy: tokens through extra forward passes, tokens through extra backward
passes, FLOPs = flops_per_token · (forward_tokens + 2 · backward_tokens) (`flops_per_token` = forward FLOPs per token,
about 2 · parameters; a backward pass costs about twice a forward), and the wall-clock seconds spent inside the mixer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

STATIC = ("stratified", "natural", "manual")
PEERS = ("odm", "dga", "doremi", "aioli")


class MixingError(ValueError):
    """A mixer that cannot run with what it was given; the message names the setting."""


@dataclass
class MixContext:
    """What a mixer may use from the run; the training loop fills it in.

    Attributes:
        model: the (PEFT) model being trained.
        device: where inputs go.
        domain_batch: (d, n) → (inputs, meta): n fresh training samples of domain d from a separate seeded reader
            (never consumed by training; resumable, so a resumed run draws the same batches).
        target_batch: n → (inputs, meta): n samples of the eval (target) set, domains drawn by q.
        per_sample_loss: inputs → (loss_sum (B,), tokens (B,)) with grad: summed token loss and label tokens.
        evaluate: () → {"loss": q-weighted, "loss_per_domain": [...], "tokens_per_domain": [...]} on the eval set.
        flops_per_token: forward FLOPs per token of `model` (≈ 2 · parameters).
        load_reference: run_dir → frozen model from that run's final checkpoint (DoReMi's reference).
        lr: () → the current learning rate (DoGE scales its scores by it).
        schedule: the run's ProportionSchedule (p over optimizer steps), which the data side reads.
        publish: (p, after_step) → the step p applies from: puts a new p into `schedule`.
        spread: p → how far the ranks' p differ (0 when all agree), for the logs.
        head_patterns: the family's LM head and projector layers (`balance.params: head`).
        fp16: the run scales its loss (fp16), so R&B drops a step whose gradients overflowed.
    """

    model: Any = None
    device: torch.device | str = "cpu"
    domain_batch: Callable[[int, int], tuple[dict, Any]] | None = None
    target_batch: Callable[[int], tuple[dict, Any]] | None = None
    per_sample_loss: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] | None = None
    evaluate: Callable[[], dict] | None = None
    flops_per_token: float = 0.0
    load_reference: Callable[[str], Any] | None = None
    lr: Callable[[], float] | None = None
    schedule: Any = None
    publish: Callable[[list[float], int], int] | None = None
    spread: Callable[[list[float]], float] | None = None
    head_patterns: list[str] | None = None
    fp16: bool = False


@runtime_checkable
class Mixer(Protocol):
    """What every strategy provides; the hooks a strategy does not need are no-ops here."""

    name: str
    log_kind: str = "mixing"  # the metrics.jsonl kind of its update rows

    @property
    def proportions(self) -> list[float]:
        """Current p (length m, on the simplex)."""

    def before_forward(self, meta: Any) -> None:
        """Before each training micro-batch's forward: `meta` is the stream's BatchMeta (domain ids, label tokens)."""

    def watch_loss(self, loss: torch.Tensor, normalizer: torch.Tensor) -> None:
        """The micro-batch's loss = Σ token losses / `normalizer`, before backward."""

    def observe(self, inputs: dict, meta: Any, loss_sum: torch.Tensor, tokens: torch.Tensor, token_loss=None) -> None:
        """After each training micro-batch's forward: `meta.domain_ids` (B,), detached `loss_sum` (B,) and `tokens`
        (B,); `token_loss` (B, T−1) detached per-token loss (0 where masked), optional (DoReMi clips per token)."""

    def step(self, step: int, ctx: MixContext, skipped: bool = False) -> dict | None:
        """After optimizer step `step` (1-based; `skipped`: the optimizer skipped it, its gradients overflowed or were not
        finite): a log dict or None."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def cost(self) -> dict | None:
        """{"forward_tokens", "backward_tokens", "flops", "seconds", "updates"} spent by the mixer so far."""

    def close(self) -> None:
        """The run is over: undo what the mixer attached to the model."""


def publishes(update: Callable) -> Callable:
    """A peer's `step`: the p it returns goes into the run's schedule (when the loop gave one), logged with its cost."""

    @functools.wraps(update)
    def step(self, step: int, ctx: MixContext, skipped: bool = False) -> dict | None:
        info = update(self, step, ctx)
        if info is not None and "p" in info and ctx.publish is not None:
            info.update(applies_from_step=ctx.publish(info["p"], step), cost=self.cost)
        return info

    return step


@dataclass
class Cost:
    """Extra work a mixer did, measured the same way for every strategy."""

    flops_per_token: float = 0.0
    forward_tokens: int = 0
    backward_tokens: int = 0
    seconds: float = 0.0
    updates: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, forward: int = 0, backward: int = 0) -> None:
        self.forward_tokens += int(forward)
        self.backward_tokens += int(backward)

    def as_dict(self) -> dict:
        flops = self.flops_per_token * (self.forward_tokens + 2 * self.backward_tokens)
        return {
            "forward_tokens": self.forward_tokens,
            "backward_tokens": self.backward_tokens,
            "flops": flops,
            "seconds": self.seconds,
            "updates": self.updates,
            **self.extra,
        }

    def state_dict(self) -> dict:
        return {k: v for k, v in self.as_dict().items() if k != "flops"}

    def load_state_dict(self, state: dict) -> None:
        self.forward_tokens, self.backward_tokens = int(state["forward_tokens"]), int(state["backward_tokens"])
        self.seconds, self.updates = float(state["seconds"]), int(state["updates"])


class Timer:
    """Adds the wall-clock time of a `with` block to a Cost."""

    def __init__(self, cost: Cost):
        self.cost = cost

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.cost.seconds += time.perf_counter() - self.t0


def input_tokens(inputs: dict) -> int:
    """Tokens a forward pass over `inputs` processes (attention mask when there is one)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())


def token_losses(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token loss (B, T−1) (0 where masked) and its mask (B, T−1), as the training loss defines it."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits  # (B, T, V)
    labels = inputs["labels"][:, 1:]  # (B, T−1)
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss, labels != -100


def simplex(p) -> list[float]:
    """`p` clipped at 0 and normalised; a MixingError when nothing positive is left."""
    a = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    if not np.isfinite(a).all() or a.sum() <= 0:
        raise MixingError(f"proportions {list(p)} are not non-negative with a positive sum")
    return (a / a.sum()).tolist()


def domain_ids(meta) -> torch.Tensor:
    ids = meta["domain_ids"] if isinstance(meta, dict) else meta.domain_ids
    return torch.as_tensor(ids).long().cpu()


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state
