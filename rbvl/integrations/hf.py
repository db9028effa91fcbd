"""R&B Balance inside a Hugging Face `Trainer` or TRL `SFTTrainer`: a few lines in an existing script.

    from rbvl.integrations.hf import BalanceTrainer
    trainer = BalanceTrainer(model=peft_model, args=training_args, train_dataset=ds, data_collator=collator,
                             n_domains=m, domain_column="domain", target=q,       # q: eval shares, None = uniform
                             balance={"update_every": 10, "lam": 3.0, "params": "lora"})
    trainer.train()
    trainer.proportions                                                        # current p, on the simplex

Each train example carries its domain id (an int column, `domain` by default). What the mixin does, and why:
- Trainer callbacks never see a batch, so the collator is wrapped: it takes the domain column out of each example
  and hands the ids over as `domain_ids`; `compute_loss` pops them and gives them to the GradientTracker before the
  forward pass. `remove_unused_columns` is turned off so the column reaches the collator.
- The data follows p through a sampler: each optimizer step's examples are drawn by domain from p, then uniformly
  within the domain (with replacement), with an RNG seeded by (seed, step). The p for step s is
  `Balancer.proportions_at(s)`: an update made after step s' applies from step s' + lag + 1, where
  lag = 1 + ceil(num_workers · prefetch_factor / grad_accum) covers what the DataLoader and Accelerate fetch ahead.
  So the indices never depend on timing, and on resume, when the Trainer replays the sampler to skip the batches
  already seen, it regenerates exactly the same ones. Accelerate deals the sampler's batches out to the ranks.
- After each optimizer step the Balancer adds up the window (tracker.sync all-reduces it across ranks), and every
  `update_every` steps turns it into G and a new p. The tracker sums over the micro-batches of gradient accumulation.
- Balance state (p history, the window's accumulators) is saved in every checkpoint folder and restored on resume;
  p is logged with every Trainer log line (so `report_to` gets it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from rbvl.balance import Balancer, GradientTracker
from rbvl.config import BalanceConfig, from_dict

log = logging.getLogger(__name__)

BALANCE_STATE = "rbvl_balance.json"
TRACKER_STATE = "rbvl_tracker.pt"


class BalanceMixin:
    """Adds R&B Balance to a `transformers.Trainer` subclass (put it first in the bases)."""

    def __init__(self, *args, n_domains: int, domain_column: str = "domain", target=None, balance=None, **kwargs):
        training_args = kwargs.get("args")
        if training_args is not None and getattr(training_args, "remove_unused_columns", False):
            log.info(
                "BalanceTrainer: remove_unused_columns=False so the '%s' column reaches the collator", domain_column
            )
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        if isinstance(balance, dict) or balance is None:
            balance = from_dict(BalanceConfig, balance or {}, prefix="balance.")
        self.balance_config: BalanceConfig = balance
        self.domain_column = domain_column
        self.n_domains = n_domains
        ahead = self.args.dataloader_num_workers * (self.args.dataloader_prefetch_factor or 2)
        lag = 1 + math.ceil(ahead / self.args.gradient_accumulation_steps)
        self.balancer = Balancer.from_config(n_domains, balance, target=target, lag=lag)
        self.tracker = GradientTracker(self.model, n_domains, params=balance.params)
        self.data_collator = DomainCollator(self.data_collator, domain_column)
        self.add_callback(_BalanceCallback(self))

    @property
    def proportions(self) -> list[float]:
        return list(self.balancer.proportions)

    # -- data --------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            log.warning("BalanceTrainer: an iterable dataset cannot be reweighted here; use rbvl.data.MixtureStream")
            return super()._get_train_sampler(train_dataset)
        unit = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        return DomainSampler(domain_ids_of(dataset, self.domain_column), self.balancer, unit, self.args.seed, self)

    # -- the step ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        domain_ids = inputs.pop("domain_ids", None)
        if domain_ids is None:
            raise KeyError(f"BalanceTrainer: the batch has no domain ids (is '{self.domain_column}' in each example?)")
        if model.training:  # evaluation passes through here too; it must not count as training data
            self.tracker.set_domains(domain_ids)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for i, p in enumerate(self.balancer.proportions):
                logs[f"balance/p_{i}"] = round(p, 6)
        super().log(logs, *args, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        # Rank 0 writes the whole window: fold every rank's part into it; the others restart at zero.
        self.tracker.sync()
        if self.args.process_index != 0:
            self.tracker.reset()
        if self.args.should_save:
            state = {"balancer": self.balancer.state_dict(), "config": asdict(self.balance_config)}
            with open(os.path.join(folder, BALANCE_STATE), "w") as f:
                json.dump(state, f, indent=1)
            torch.save(self.tracker.state_dict(), os.path.join(folder, TRACKER_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, BALANCE_STATE)
        if not os.path.exists(path):
            log.warning("BalanceTrainer: %s holds no Balance state; p restarts from uniform", resume_from_checkpoint)
            return
        with open(path) as f:
            self.balancer.load_state_dict(json.load(f)["balancer"])
        if self.args.process_index == 0:
            self.tracker.load_state_dict(
                torch.load(os.path.join(resume_from_checkpoint, TRACKER_STATE), weights_only=True)
            )


class _BalanceCallback(TrainerCallback):
    def __init__(self, trainer: BalanceMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        info = self.trainer.balancer.step(state.global_step, self.trainer.tracker)
        if info is not None and info.get("degenerate"):
            log.warning("balance update at step %d: %s", state.global_step, info["degenerate"])
        return control


class DomainCollator:
    """Wraps the user's collator: takes the domain column out of each example, adds `domain_ids` to the batch."""

    def __init__(self, collator, column: str):
        self.collator, self.column = collator, column

    def __call__(self, features: list[dict]):
        try:
            ids = [int(f[self.column]) for f in features]
        except KeyError:
            raise KeyError(f"a training example has no '{self.column}' column (the domain id)") from None
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch["domain_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


def domain_ids_of(dataset, column: str) -> np.ndarray:
    if hasattr(dataset, "column_names") and column in dataset.column_names:  # datasets.Dataset: read one column
        return np.asarray(dataset[column], dtype=np.int64)
    return np.asarray([int(dataset[i][column]) for i in range(len(dataset))], dtype=np.int64)


class DomainSampler(Sampler):
    """Indices drawn by domain from the Balancer's p, step by step, replayable exactly (see the module docstring).

    `unit` = examples per optimizer step over all ranks; an epoch is `len(self)` indices, a whole number of steps.
    """

    def __init__(self, domains: np.ndarray, balancer: Balancer, unit: int, seed: int, trainer=None):
        self.by_domain = [np.flatnonzero(domains == d) for d in range(balancer.m)]
        empty = [d for d, idx in enumerate(self.by_domain) if len(idx) == 0]
        if empty:
            raise ValueError(f"no training example has domain id(s) {empty}; n_domains={balancer.m}")
        self.balancer, self.unit, self.seed, self.trainer = balancer, unit, seed, trainer
        self.steps_per_epoch = max(1, math.ceil(len(domains) / unit))
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.unit

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for k in range(self.steps_per_epoch):
            step = self.epoch * self.steps_per_epoch + k + 1  # the optimizer step these examples train
            self._check_not_ahead(step)
            p = np.asarray(self.balancer.proportions_at(step), dtype=np.float64)
            rng = np.random.default_rng([self.seed, step])
            for d in rng.choice(len(p), size=self.unit, p=p / p.sum()):
                pool = self.by_domain[d]
                yield int(pool[rng.integers(len(pool))])

    def _check_not_ahead(self, step: int) -> None:
        """Every update that applies to `step` must already be made, or the draw would depend on timing."""
        if self.trainer is None:
            return
        done = self.trainer.state.global_step
        if done < step - self.balancer.lag - 1:
            raise RuntimeError(
                f"the data loader runs {step - 1 - done} steps ahead of training, more than Balance's lag "
                f"({self.balancer.lag}); lower dataloader_num_workers or dataloader_prefetch_factor"
            )


class BalanceTrainer(BalanceMixin, Trainer):
    """`transformers.Trainer` with R&B Balance (see the module docstring)."""


try:
    from trl import SFTTrainer

    class BalanceSFTTrainer(BalanceMixin, SFTTrainer):
        """TRL's `SFTTrainer` with R&B Balance; works with `peft_config=` (the adapters are tracked)."""

except ImportError:  # TRL is optional

    class BalanceSFTTrainer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("BalanceSFTTrainer needs TRL: pip install trl")
