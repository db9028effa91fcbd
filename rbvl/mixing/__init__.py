"""Mixers: the strategies that set the domain proportions p during training, behind one interface (base.py).

    mixer = build_mixer(cfg.mixing.strategy, m, target=q, cfg_mixing=cfg.mixing, ctx=ctx, balance=cfg.balance)
    for step in range(1, max_steps + 1):
        for micro-batch:
            mixer.before_forward(meta); loss = ...; mixer.watch_loss(loss, n_tokens); loss.backward()
            mixer.observe(inputs, meta, loss_sum, tokens, token_loss=token_loss)
        status = optimizer_step(...)  # ok | overflow (fp16) | nonfinite: the last two skip the update
        info = mixer.step(step, ctx, skipped=status != "ok")   # a new p is in ctx.schedule; info is for the logs
    mixer.cost  # {"forward_tokens", "backward_tokens", "flops", "seconds", ...}: every strategy measured alike

Strategies (`mixing.strategy`), one file each:

- `stratified` / `natural` / `manual` (static.py): p never changes.
- `rnb` (rnb.py): R&B's Balance, p from the Gram matrix of the domains' gradients (rbvl.balance).
- the peers R&B is compared with, each written from its paper and the authors' public code:
  - `odm` (odm.py): Online Data Mixing (Albalak et al. 2023, arXiv 2312.02406): EXP3, training loss as reward.
  - `dga` (dga.py): gradient alignment (DoGE, arXiv 2310.15393; DGA, arXiv 2410.02498): extra backward passes on
    fresh batches of each domain and of the target, multiplicative update from the alignments.
  - `doremi` (doremi.py): DoReMi (Xie et al. 2023, arXiv 2305.10429): clipped excess loss against a reference model.
  - `aioli` (aioli.py): Aioli (Chen et al. 2024, arXiv 2411.05735): LearnParams rounds, interaction matrix,
    exponentiated-gradient update.

A new strategy is one new file with a class that implements `Mixer` and one line in `build_mixer`.
"""

from __future__ import annotations

from typing import Any

from rbvl.mixing.aioli import AioliMixer, aioli_solve, aioli_weights, perturbed_mixture
from rbvl.mixing.base import (
    PEERS,
    STATIC,
    Cost,
    MixContext,
    Mixer,
    MixingError,
    input_tokens,
    simplex,
    token_losses,
)
from rbvl.mixing.dga import DGAMixer, doge_update
from rbvl.mixing.doremi import DoReMiMixer, doremi_update
from rbvl.mixing.odm import ODMMixer, exp3_proportions, odm_eps
from rbvl.mixing.rnb import RnbMixer
from rbvl.mixing.static import StaticMixer, initial_proportions

STRATEGIES = (*STATIC, "rnb", *PEERS)


def build_mixer(
    strategy: str,
    n_domains: int,
    target: list[float] | None,
    cfg_mixing: Any,
    ctx: MixContext,
    initial: list[float] | None = None,
    seed: int = 0,
    balance: Any = None,
) -> Mixer:
    """The mixer for `strategy`.

    Args:
        initial: p at step 0 (static strategies and odm start there; the others start uniform, as their papers).
        seed: seeds the mixer's own RNG (aioli's sweep order, R&B's sketch hashes).
        balance: BalanceConfig's fields (`rnb` only).
    """
    q = simplex(target if target is not None else [1.0] * n_domains)
    if strategy in STATIC:
        return StaticMixer(strategy, initial if initial is not None else [1.0] * n_domains)
    if strategy == "rnb":
        return RnbMixer.build(n_domains, target, balance, ctx, seed=seed)
    if strategy == "odm":
        return ODMMixer(n_domains, cfg_mixing.odm, initial)
    if strategy == "dga":
        return DGAMixer(n_domains, cfg_mixing.dga, ctx)
    if strategy == "doremi":
        if not getattr(cfg_mixing, "reference", ""):
            raise MixingError("mixing.strategy=doremi needs mixing.reference=RUN_DIR (a finished reference run)")
        if ctx.load_reference is None:
            raise MixingError("doremi: the training loop gave no load_reference in MixContext")
        reference = ctx.load_reference(cfg_mixing.reference)
        return DoReMiMixer(n_domains, cfg_mixing.doremi, reference, flops_per_token=ctx.flops_per_token)
    if strategy == "aioli":
        if ctx.evaluate is None:
            raise MixingError("aioli needs evaluate in MixContext (its LearnParams measure eval losses)")
        return AioliMixer(n_domains, cfg_mixing.aioli, q, ctx, seed=seed)
    raise MixingError(f"unknown mixing.strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


__all__ = [
    "PEERS",
    "STATIC",
    "STRATEGIES",
    "AioliMixer",
    "Cost",
    "DGAMixer",
    "DoReMiMixer",
    "MixContext",
    "Mixer",
    "MixingError",
    "ODMMixer",
    "RnbMixer",
    "StaticMixer",
    "aioli_solve",
    "aioli_weights",
    "build_mixer",
    "doge_update",
    "doremi_update",
    "exp3_proportions",
    "initial_proportions",
    "input_tokens",
    "odm_eps",
    "perturbed_mixture",
    "token_losses",
]
