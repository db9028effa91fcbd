"""p over optimizer steps (`ProportionSchedule`) and when and how it changes (`Balancer`).

`Balancer.step` is the one place that runs a window's end, for `rbvl train` and the Trainer integration alike:
commit the step → is the window over? → sum it over ranks → G → new p → empty the tracker → publish p.
"""

from __future__ import annotations

import logging

import torch

from rbvl.balance.tracker import GradientTracker
from rbvl.balance.update import checked_count, checked_target, diagnostics, update_proportions_with_info

log = logging.getLogger(__name__)


class ProportionSchedule:
    """The proportions p over optimizer steps: a p published after step s applies from step s + 1 + lag.

    `lag` covers what a data loader prepares ahead (`rbvl.data.loader_lag`), so the data drawn for a step never
    depends on timing and a resumed run draws what the first one drew. The table lives in shared memory, so
    DataLoader workers (forked after it is built) read every p the training process publishes.
    """

    def __init__(self, n_domains: int, initial=None, lag: int = 0, capacity: int = 4096):
        n_domains = checked_count("ProportionSchedule: n_domains", n_domains, 1)
        lag, capacity = (
            checked_count("ProportionSchedule: lag", lag, 0),
            checked_count("ProportionSchedule: capacity", capacity, 1),
        )
        self.m, self.lag, self.capacity = n_domains, lag, capacity
        self.table = torch.zeros(capacity + 1, n_domains, dtype=torch.float64).share_memory_()  # (updates, m)
        self.applies_from = torch.zeros(capacity + 1, dtype=torch.long).share_memory_()  # (updates,) step
        self.count = torch.ones(1, dtype=torch.long).share_memory_()
        uniform = [1.0 / n_domains] * n_domains
        self.table[0] = self._checked(initial if initial is not None else uniform, "initial")

    def _checked(self, p, what: str) -> torch.Tensor:
        """p as (m,) float64 on the simplex: m finite shares >= 0, not all 0, divided by their sum; else a ValueError."""
        try:
            t = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"ProportionSchedule {what}: a list of {self.m} shares, got {p!r}") from None
        if t.numel() != self.m:
            raise ValueError(f"ProportionSchedule {what}: {t.numel()} shares for {self.m} domains, got {t.tolist()}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or not t.sum() > 0:
            raise ValueError(f"ProportionSchedule {what}: shares must be finite, >= 0 and not all 0, got {t.tolist()}")
        return t / t.sum()

    def publish(self, p, after_step: int) -> int:
        """Make `p` (m shares >= 0, divided by their sum) apply from optimizer step `after_step + 1 + lag`; returns
        that step. Steps only go forward: a p published after an earlier step than the last one's is an error."""
        n = int(self.count.item())
        if n > self.capacity:
            raise RuntimeError(f"more than {self.capacity} proportion updates; raise ProportionSchedule capacity")
        start = int(after_step) + 1 + self.lag
        if n > 1 and start < int(self.applies_from[n - 1]):
            raise ValueError(
                f"ProportionSchedule.publish: a p after step {after_step} would apply from step {start}, before the "
                f"last one published (from step {int(self.applies_from[n - 1])}): publish in step order"
            )
        self.table[n] = self._checked(p, f"publish after step {after_step}")
        self.applies_from[n] = start
        self.count[0] = n + 1  # written last: a reader never sees a half-written row
        return start

    def at(self, step: int) -> torch.Tensor:
        """(m,) the p for the batches of optimizer step `step` (1-based), normalised."""
        n = int(self.count.item())
        eligible = (self.applies_from[:n] <= step).nonzero().flatten()
        p = self.table[int(eligible[-1])]
        return p / p.sum()

    def current(self) -> list[float]:
        """The newest published p (which may not apply yet)."""
        return self.table[int(self.count.item()) - 1].tolist()

    def history(self) -> list[tuple[int, list[float]]]:
        """[(applies_from_step, p)] for every published p, the initial one first (from step 0)."""
        n = int(self.count.item())
        return [(int(s), p) for s, p in zip(self.applies_from[:n].tolist(), self.table[:n].tolist(), strict=True)]

    def state_dict(self) -> dict:
        n = int(self.count.item())
        return {"p": self.table[:n].tolist(), "applies_from": self.applies_from[:n].tolist(), "lag": self.lag}

    def load_state_dict(self, state: dict) -> None:
        if "lag" in state and int(state["lag"]) != self.lag:
            raise ValueError(
                f"the proportion schedule was saved with lag {state['lag']} (num_workers × prefetch / grad_accum); "
                f"this run has lag {self.lag}: an exact resume needs the same loader settings"
            )
        n = len(state["p"])
        width = {len(p) for p in state["p"]}
        if width and width != {self.table.shape[1]}:
            raise ValueError(
                f"the proportion schedule was saved for {width.pop()} domains; this run has {self.table.shape[1]}: "
                f"resume with the same domains (n_domains)"
            )
        self.table[:n] = torch.tensor(state["p"], dtype=torch.float64)
        self.applies_from[:n] = torch.tensor(state["applies_from"], dtype=torch.long)
        self.count[0] = n


class Balancer:
    """When to update, and how: the every-K-steps bookkeeping of `rbvl train` and the Trainer integration.

    After optimizer step s (counting from 1): if s > warmup_steps and (s − warmup_steps) % update_every == 0, the
    window's domain gradients give G and a new p (`step`). Steps up to `warmup_steps` sample from the initial p
    and their gradients are dropped at the warmup boundary, so every update sees exactly K steps of data. The new p
    goes into `schedule`, which the data side reads.

    How (`rbvl.balance.update.update_proportions_with_info` derives each option): `gram` picks the estimator of G
    ("unbiased" or the paper's "plugin"); `gram_ema` β > 0 feeds the update Ḡ ← β Ḡ + (1 − β) G instead of the
    window's G (the first window starts Ḡ), averaging out the estimator's noise across windows as DoGE and ADO
    average their weights; `update` ("replace", the paper's, or "mirror", with step `eta`, 0 = λ) and `temperature`
    ("fixed" or "sqrt_m") shape the step from G to p; `pull` γ draws mirror's log p back toward the initial p by a
    fraction γ per update, so noise cannot walk it away. The defaults are the paper's rules (gram="plugin",
    update="replace", gram_ema=0): on the development settings the one rule never worse than stratified beyond noise
    (docs/balance.md). If p's L1 change exceeds `unstable_l1` at 3 updates in a row, it warns once per run.
    """

    WARN_AFTER = 3  # consecutive updates with an L1 change above unstable_l1

    def __init__(
        self,
        n_domains: int,
        target=None,
        update_every: int = 20,
        lam: float = 3.0,
        warmup_steps: int = 0,
        floor: float = 0.0,
        smoothing: float = 0.0,
        schedule: ProportionSchedule | None = None,
        gram: str = "plugin",
        update: str = "replace",
        eta: float = 0.5,
        gram_ema: float = 0.0,
        temperature: str = "fixed",
        unstable_l1: float = 0.5,
        pull: float = 0.0,
    ):
        _check_options(
            n_domains, unstable_l1, schedule, update_every=update_every, lam=lam, warmup_steps=warmup_steps,
            floor=floor, smoothing=smoothing, gram=gram, update=update, eta=eta, gram_ema=gram_ema,
            temperature=temperature, pull=pull,
        )  # fmt: skip
        self.m = n_domains = checked_count("Balancer: n_domains", n_domains, 1)
        self.gram = gram  # "unbiased" | "plugin" | "shrunk": the estimator of G (GradientTracker.gram)
        self.rule, self.eta, self.temperature = update, eta, temperature
        self.gram_ema, self.unstable_l1, self.pull = gram_ema, unstable_l1, pull
        self.gram_avg: torch.Tensor | None = None  # (m, m) Ḡ, the EMA of G across windows (gram_ema > 0)
        self.unstable_updates, self.warned_unstable = 0, False
        self.target = checked_target(target, n_domains)
        if floor > 0 and floor * n_domains >= 1:
            log.warning(
                "balance: floor %g >= 1/m (m = %d domains) holds every share at 1/m: p stays uniform", floor, n_domains
            )
        self.update_every, self.lam, self.warmup_steps = update_every, lam, warmup_steps
        self.floor, self.smoothing = floor, smoothing
        self.schedule = schedule if schedule is not None else ProportionSchedule(n_domains)

    @classmethod
    def from_config(cls, n_domains: int, config, target=None, schedule: ProportionSchedule | None = None) -> Balancer:
        """From anything with BalanceConfig's fields (duck-typed, so torch stays the only import here)."""
        return cls(
            n_domains,
            target=target,
            update_every=config.update_every,
            lam=config.lam,
            warmup_steps=config.warmup_steps,
            floor=config.floor,
            smoothing=config.smoothing,
            schedule=schedule,
            gram=getattr(config, "gram", "plugin"),
            update=getattr(config, "update", "replace"),
            eta=getattr(config, "eta", 0.5),
            gram_ema=getattr(config, "gram_ema", 0.0),
            temperature=getattr(config, "temperature", "fixed"),
            pull=getattr(config, "pull", 0.0),
        )

    def restart(self) -> None:
        """Back to the start of a run: the initial p only, nothing carried across windows."""
        self.schedule.count[0] = 1
        self.gram_avg, self.unstable_updates, self.warned_unstable = None, 0, False

    @property
    def proportions(self) -> list[float]:
        """The newest p."""
        return self.schedule.current()

    def due(self, step: int, tracker: GradientTracker | None = None) -> bool:
        """Whether optimizer step `step` ends a window; at the warmup boundary it also empties the tracker."""
        if step <= self.warmup_steps:
            if step == self.warmup_steps and tracker is not None:
                tracker.reset()
            return False
        return (step - self.warmup_steps) % self.update_every == 0

    def update(self, G: torch.Tensor, never_seen=None) -> tuple[list[float], dict]:
        """(m, m) the window's G → the new p (not yet published) and a dict for the logs (`gram`, `eigenvalues`,
        `degenerate`). With `gram_ema` it folds G into Ḡ (a finite G only) and the update reads Ḡ. `never_seen`:
        domains no window has drawn yet; they keep their share (`update_proportions_with_info`)."""
        finite = bool(torch.isfinite(G).all())
        used = G
        if self.gram_ema > 0 and finite:
            beta, avg = self.gram_ema, self.gram_avg
            self.gram_avg = G.clone() if avg is None else beta * avg + (1 - beta) * G
            used = self.gram_avg
        p, info = update_proportions_with_info(
            used, self.target, self.lam, prev=self.proportions, floor=self.floor, smoothing=self.smoothing,
            update=self.rule, eta=self.eta, temperature=self.temperature, pull=self.pull,
            anchor=self.schedule.table[0], never_seen=never_seen,
        )  # fmt: skip
        info.update(gram=G.tolist(), eigenvalues=torch.linalg.eigvalsh(G).tolist() if finite else None)
        return p.tolist(), info

    def _watch_stability(self, l1: float) -> None:
        self.unstable_updates = self.unstable_updates + 1 if l1 > self.unstable_l1 else 0
        if self.unstable_updates >= self.WARN_AFTER and not self.warned_unstable:
            self.warned_unstable = True
            log.warning(
                "balance: p moved by more than %.2f (L1) at each of the last %d updates (now %.2f): the mixture is "
                "following noise. Lower balance.lam, or damp the update: balance.update=mirror (a step from the "
                "previous p) or balance.gram_ema=0.8 (an average of G over windows); in BalanceTrainer, "
                "balance={'update': 'mirror'} or {'gram_ema': 0.8}",
                self.unstable_l1, self.unstable_updates, l1,
            )  # fmt: skip

    def step(self, step: int, tracker: GradientTracker, skip: bool = False) -> dict | None:
        """After optimizer step `step`: the step joins the window; at a window's end, sync → G → p → reset → publish.

        Args:
            step: the optimizer step just taken (1-based).
            tracker: the GradientTracker that read this step's backward passes.
            skip: the optimizer skipped the step (its fp16 gradients overflowed): they do not join the window.

        Returns:
            None between updates. At an update, what to log: `p` (the new p), `p_before` (the p it replaces),
            `gram` (G as a list of lists), `gram_eigenvalues` (None when G is not finite), `tokens` (label tokens per
            domain in the window, over all ranks), `stale` (domains the window missed), `degenerate` (why p kept its
            previous value, else None), `applies_from_step` (the first optimizer step whose data p draws),
            `skipped_steps` (steps dropped from windows so far); diagnostics from the window's G with its unbiased
            diagonal (`rbvl.balance.update.diagnostics`): `grad_norm`, `alignment` (cosine with the target gradient),
            `gram_noise` (plug-in minus unbiased G_ii); `gram_fallback` (domains whose G_ii could not be de-biased:
            "previous" or "plugin"), `p_l1_change` (Σ|p − p_before|) and, with `gram_ema`, `gram_ema` (Ḡ).
        """
        if getattr(tracker, "m", self.m) != self.m:
            raise ValueError(f"Balancer.step: the tracker has {tracker.m} domains, this Balancer {self.m}")
        tracker.commit(skip=skip)
        if not self.due(step, tracker):
            return None
        tracker.sync()  # sum every rank's window: all ranks now hold the same sums
        stale, tokens = tracker.stale(), tracker.tokens.tolist()
        never_seen = [i for i in stale if not tracker.seen[i]]  # no window has drawn them: no score, their share stays
        G, est = tracker.gram(self.gram, with_info=True)  # (m, m) g_i · g_j, token-mean domain gradients of the window
        p_before = self.proportions
        p, info = self.update(G, never_seen)  # p = softmax(λ · G q / ‖G q‖)
        tracker.reset()
        unbiased = G.clone()
        unbiased.diagonal().copy_(torch.tensor(est["unbiased_diag"], dtype=torch.float64))
        l1 = sum(abs(a - b) for a, b in zip(p, p_before, strict=True))
        self._watch_stability(l1)
        return {
            **diagnostics(unbiased, self.target, est["plugin_diag"]),  # grad_norm, alignment, gram_noise
            "gram_fallback": {str(i): why for i, why in est["diag_fallback"].items()},
            "p_l1_change": l1,
            **({"gram_ema": self.gram_avg.tolist()} if self.gram_avg is not None else {}),
            "p": p,
            "p_before": p_before,
            "gram": info["gram"],
            "gram_eigenvalues": info["eigenvalues"],
            "tokens": tokens,
            "stale": stale,
            "degenerate": info["degenerate"],
            "applies_from_step": self.schedule.publish(p, after_step=step),  # the data draws p from this step on
            "skipped_steps": tracker.skipped_steps,
        }

    def proportions_at(self, step: int) -> list[float]:
        """The p for batches of optimizer step `step` (1-based)."""
        return self.schedule.at(step).tolist()

    def state_dict(self) -> dict:
        """The schedule and what the update carries across windows (Ḡ, the instability count): plain lists, so a
        JSON file can hold it."""
        return {"schedule": self.schedule.state_dict(), **self.update_state_dict()}

    def update_state_dict(self) -> dict:
        avg = None if self.gram_avg is None else self.gram_avg.tolist()
        return {"gram_avg": avg, "unstable_updates": self.unstable_updates, "warned_unstable": self.warned_unstable}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state` holds; the update's part may be absent (saved before it existed: nothing carried)."""
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        avg = state.get("gram_avg")
        self.gram_avg = None if avg is None else torch.tensor(avg, dtype=torch.float64)
        self.unstable_updates = int(state.get("unstable_updates", 0))
        self.warned_unstable = bool(state.get("warned_unstable", False))


def _check_options(n_domains, unstable_l1, schedule, **options) -> None:
    """The Balancer's options, checked as `balance:` keys are (rbvl.config.BalanceConfig): a mistake fails here, not
    at the first update, and a negative λ cannot turn the rule around."""
    from rbvl.config import ConfigError
    from rbvl.config.schema import BalanceConfig

    scalars = {k: v.item() if hasattr(v, "item") else v for k, v in options.items()}  # numpy / 0-dim torch numbers
    try:
        BalanceConfig(**scalars)
    except ConfigError as e:
        raise ValueError(f"Balancer: {str(e).removeprefix(BalanceConfig.KEY)}") from None
    if isinstance(unstable_l1, bool) or not isinstance(unstable_l1, (int, float)) or not unstable_l1 >= 0:
        raise ValueError(f"Balancer: unstable_l1 must be a number >= 0, got {unstable_l1!r}")
    if schedule is not None and schedule.m != n_domains:
        raise ValueError(f"Balancer: the schedule has {schedule.m} domains, n_domains is {n_domains}")
