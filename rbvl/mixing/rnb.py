"""R&B's Balance as a mixer (Ge et al. 2025, arXiv 2505.00358): p from the Gram matrix of the domains' gradients.

The GradientTracker reads each domain's gradient off the ordinary backward pass (no extra pass); every
`balance.update_every` optimizer steps the Balancer turns the window into G and a new p:
p = softmax(λ · G q / ‖G q‖). Both live in rbvl.balance, which imports torch alone, so a user's own loop can use
them without this class; here they get the hooks every strategy gets.
"""

from __future__ import annotations

from rbvl.balance import Balancer, GradientTracker
from rbvl.mixing.base import MixContext, Mixer, MixingError


class RnbMixer(Mixer):
    """`rnb`: the tracker watches every micro-batch; the Balancer updates p at the end of each window."""

    name = "rnb"
    log_kind = "balance"

    def __init__(self, tracker: GradientTracker, balancer: Balancer, ctx: MixContext | None = None):
        self.tracker, self.balancer = tracker, balancer
        self._spread = ctx.spread if ctx is not None else None

    @classmethod
    def build(cls, n_domains: int, target, balance, ctx: MixContext, seed: int = 0) -> RnbMixer:
        """From `balance` (BalanceConfig's fields) and the run's context (model, schedule, head patterns, fp16)."""
        if ctx.model is None or ctx.schedule is None or balance is None:
            raise MixingError(
                "mixing.strategy=rnb needs the model, the run's schedule and balance settings: its Balancer reads "
                "the domain gradients off the model's backward pass"
            )
        tracker = GradientTracker(  # sketched, its memory is m × sketch_dim
            ctx.model,
            n_domains,
            params=balance.params,
            sketch_dim=balance.sketch_dim,
            seed=seed,
            guard_nonfinite=ctx.fp16,
            head_patterns=ctx.head_patterns,
        )
        tracker.to(ctx.device)  # where the step computes (FSDP2 with CPU offload keeps the sharded weights on the CPU)
        return cls(tracker, Balancer.from_config(n_domains, balance, target=target, schedule=ctx.schedule), ctx)

    @property
    def proportions(self) -> list[float]:
        return self.balancer.proportions

    def before_forward(self, meta) -> None:
        self.tracker.set_domains(meta.domain_ids, tokens=meta.label_tokens, image_domain_ids=meta.image_domain_ids)

    def watch_loss(self, loss, normalizer) -> None:
        self.tracker.watch_loss(loss, normalizer=normalizer)  # so it can undo 1/grad_accum and the fp16 scale

    def step(self, step: int, ctx: MixContext, skipped: bool = False) -> dict | None:
        info = self.balancer.step(step, self.tracker, skip=skipped)  # sync → G → p → reset → publish
        if info is not None and self._spread is not None:
            info["p_rank_spread"] = self._spread(info["p"])  # 0 when every rank holds the same p
        return info

    def state_dict(self) -> dict:
        # the run's checkpoint holds the schedule itself; the Balancer's own part (Ḡ of balance.gram_ema, ...) is here
        return {"tracker": self.tracker.state_dict(), "balancer": self.balancer.update_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("tracker"):
            raise MixingError("it holds no Balance window (was it written with mixing.strategy=rnb?)")
        self.tracker.load_state_dict(state["tracker"])
        self.balancer.load_state_dict(state.get("balancer", {}))  # absent in checkpoints written before it

    @property
    def cost(self) -> dict:
        return {"forward_tokens": 0, "backward_tokens": 0, "flops": self.tracker.extra_flops}

    def close(self) -> None:
        self.tracker.remove()
