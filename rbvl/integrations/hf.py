"""R&B Balance inside a Hugging Face `Trainer` or TRL `SFTTrainer`: a few lines in an existing script.

    from rbvl.integrations.hf import BalanceTrainer
    trainer = BalanceTrainer(model=peft_model, args=training_args, train_dataset=ds, data_collator=collator,
                             n_domains=m, domain_column="domain", target=q,       # q: eval shares, None = uniform
                             balance={"update_every": 10, "lam": 3.0, "params": "lora"})
    trainer.train()
    trainer.proportions                                                        # current p, on the simplex

Each train example carries its domain id (an int column, `domain` by default). What the mixin does, and why:
- Trainer callbacks never see a batch, so the collator is wrapped: the user's collator gets the examples as they
  are (domain column included, so a collator that reads it works), the ids are read from the examples, the column
  is removed from whatever the collator returns, and the ids ride along as `domain_ids`; `compute_loss` pops them
  and gives them to the GradientTracker before the forward pass. `remove_unused_columns` is turned off so the
  column reaches the collator.
- g_i is the gradient of domain i's token-mean loss (see rbvl.balance): `compute_loss` tells the tracker each
  sample's label tokens and what the Trainer divides the summed token loss by (`num_items_in_batch` when the model
  takes it, else the micro-batch's label tokens); the tracker reads gradient accumulation, the world-size factor
  and fp16 loss scaling off the loss's gradient.
- The data follows p through a sampler: each optimizer step's examples are drawn by domain from p, then uniformly
  within the domain (with replacement), with an RNG seeded by (seed, step). The p for step s is
  `Balancer.proportions_at(s)`: an update made after step s' applies from step s' + lag + 1, where
  lag = 1 + ceil(num_workers · prefetch_factor / grad_accum) covers what the DataLoader and Accelerate fetch ahead.
  So the indices never depend on timing, and on resume, when the Trainer replays the sampler to skip the batches
  already seen, it regenerates exactly the same ones. Accelerate deals the sampler's batches out to the ranks.
- After each optimizer step the Balancer commits the step to the window, and every `update_every` steps sums the
  window over ranks (tracker.sync) and turns it into G and a new p. The same `ProportionSchedule` as `rbvl train`
  holds p over steps.
- Balance state (the p schedule; each rank's part of the window, like the Trainer's per-rank RNG files) is saved
  in every checkpoint folder and restored on resume; p is logged with every Trainer log line (so `report_to` gets it).
- Under accelerate's FSDP2 (`fsdp=True, fsdp_config={"version": 2}`) the tracked linears read the all-gathered weights
  inside their forward, as in `rbvl train` (rbvl/runtime/sharding.py). Rank 0's trainable parameters are broadcast
  before accelerate shards the model, as DDP does when it wraps one (`broadcast_trainable`): accelerate shards each
  rank's own tensors, and adapters built from the unseeded global RNG differ between ranks. Every rank must run the
  same modules: a rank whose micro-batch has no image runs the vision tower on a dummy image times zero
  (`SameForwardPaths`); the dummy is one collated training example that has an image (or `dummy_images=`), and an
  optimizer step that saw no image on any rank drops the vision side's zero gradients, as DDP leaves them. ZeRO-3
  is refused at the start (its partitioned weights are not what the tracked linears read); ZeRO-1/2 need nothing.
"""

from __future__ import annotations

import difflib
import glob
import inspect
import json
import logging
import math
import os
import re
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from rbvl.balance import Balancer, GradientTracker, ProportionSchedule, label_tokens
from rbvl.balance.layers import VISION_SIDE
from rbvl.config import BalanceConfig, from_dict
from rbvl.integrations.hf_data import (
    DomainCollator,
    DomainSampler,
    domain_ids_of,
    given_domain_ids,
    refuse_packing,
)
from rbvl.model.families import head_patterns

log = logging.getLogger(__name__)

BALANCE_STATE = "rbvl_balance.json"
TRACKER_STATE = "rbvl_tracker-rank{:03d}.pt"


class BalanceMixin:
    """Adds R&B Balance to a `transformers.Trainer` subclass (put it first in the bases).

    `train_domains`: each train example's domain id, in order, where reading `domain_column` from every example costs
    a pass over the data (a torch Dataset whose items decode images); a `datasets.Dataset` reads only the column."""

    OWN_ARGUMENTS = ("n_domains", "domain_column", "target", "balance", "dummy_images", "train_domains")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        before = cls.__mro__[1 : cls.__mro__.index(BalanceMixin)] if BalanceMixin in cls.__mro__ else ()
        trainer = next((k for k in before if issubclass(k, Trainer) and not issubclass(k, BalanceMixin)), None)
        if trainer is not None:  # the Trainer's __init__ would run first and refuse n_domains=
            bases = ", ".join(b.__name__ for b in cls.__bases__ if b is not BalanceMixin)
            raise TypeError(
                f"class {cls.__name__}: put BalanceMixin first in the bases, before {trainer.__name__}: "
                f"class {cls.__name__}(BalanceMixin, {bases})"
            )

    def __init__(
        self,
        *args,
        n_domains: int,
        domain_column: str = "domain",
        target=None,
        balance=None,
        dummy_images=None,
        train_domains=None,
        **kwargs,
    ):
        refuse_zero3()  # TrainingArguments(deepspeed=...) with stage 3: before the Trainer partitions anything
        self._check_arguments(kwargs)
        training_args = kwargs.get("args")
        refuse_packing(training_args)
        if training_args is not None and getattr(training_args, "remove_unused_columns", False):
            log.info(
                "BalanceTrainer: remove_unused_columns=False: the '%s' column must reach the collator", domain_column
            )
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        refuse_packing(self.args)  # also when the arguments came by position
        refuse_zero3(self.accelerator)  # stage 3 from an `accelerate launch` config
        if self.args.n_gpu > 1:  # one process that sees several GPUs (a model spread by device_map counts as one)
            raise ValueError(
                f"BalanceTrainer does not run under nn.DataParallel, which the Trainer uses when one process sees "
                f"{self.args.n_gpu} GPUs: its replicas would share the tracked layers and the tracker. Launch one "
                f"process per GPU (torchrun --nproc_per_node={self.args.n_gpu} or accelerate launch), or make one "
                f"GPU visible (CUDA_VISIBLE_DEVICES=0)"
            )
        if isinstance(n_domains, bool) or not isinstance(n_domains, (int, np.integer)) or n_domains < 1:
            raise ValueError(
                f"BalanceTrainer: n_domains must be an int >= 1 (domain ids 0..n_domains-1), got {n_domains!r}"
            )
        n_domains = int(n_domains)
        if isinstance(balance, dict) or balance is None:
            balance = from_dict(BalanceConfig, balance or {}, prefix="balance.")
        self.balance_config: BalanceConfig = balance
        self.domain_column = domain_column
        self.n_domains = n_domains
        self.args.remove_unused_columns = False  # also when the arguments came by position
        self._train_domains = None  # (dataset, its examples' domain ids), checked now: a bad id fails before training
        if self.train_dataset is not None:
            if not hasattr(self.train_dataset, "__len__") or isinstance(
                self.train_dataset, torch.utils.data.IterableDataset
            ):
                raise ValueError(
                    "BalanceTrainer: an iterable train dataset cannot be drawn by domain proportions here (its examples "
                    "come in its own order); pass a map-style dataset (datasets.Dataset), or train with rbvl train, "
                    "whose MixtureStream streams each domain"
                )
            if train_domains is None:
                ids = domain_ids_of(self.train_dataset, domain_column, n_domains)
            else:
                ids = given_domain_ids(train_domains, len(self.train_dataset), n_domains)
            self._train_domains = self.train_dataset, ids
        # Accelerate fetches one batch ahead of the step that uses it; workers × prefetch more may be in flight.
        ahead = self.args.dataloader_num_workers * (self.args.dataloader_prefetch_factor or 2)
        lag = 1 + math.ceil(ahead / self.args.gradient_accumulation_steps)
        self.balancer = Balancer.from_config(
            n_domains, balance, target=target, schedule=ProportionSchedule(n_domains, lag=lag)
        )
        self.tracker = GradientTracker(
            self.model,
            n_domains,
            params=balance.params,
            head_patterns=head_patterns(self.model) if balance.params == "head" else None,
            sketch_dim=balance.sketch_dim,
            seed=self.args.seed,
            guard_nonfinite=bool(self.args.fp16),
        )
        if self.args.fsdp and not self.is_fsdp_enabled and self.args.process_index == 0:  # accelerate: GPUs only
            kind = self.accelerator.distributed_type
            runs = "DDP (a whole model on each rank)" if "MULTI" in str(kind) else "one unsharded process"
            log.warning("BalanceTrainer: fsdp was asked for, but accelerate shards on GPUs only: %s runs instead", runs)
        if self.is_fsdp_enabled:
            broadcast_trainable(self.model, self.args.device)  # what DDP does as it wraps; FSDP2 shards each rank's own
        self.paths = self._same_forward_paths(dummy_images) if self.is_fsdp_enabled else None
        self.data_collator = DomainCollator(self.data_collator, domain_column)
        self._balance_diagnostics: dict = {}  # the latest update's, for the next log line
        self.add_callback(_BalanceCallback(self))

    def _check_arguments(self, kwargs: dict) -> None:
        """An argument the Trainer below does not take (a typo of one of Balance's, say): named, with a suggestion."""
        try:
            params = inspect.signature(super().__init__).parameters
        except (TypeError, ValueError):
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            known = [*self.OWN_ARGUMENTS, *params]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{type(self).__name__}: unexpected argument {unknown[0]!r}{hint}")

    @property
    def proportions(self) -> list[float]:
        return list(self.balancer.proportions)

    # -- data --------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):  # refused in __init__; the Trainer never asks for one
            return super()._get_train_sampler(train_dataset)
        if self._train_domains is not None and self._train_domains[0] is dataset:
            ids = self._train_domains[1]
        else:  # a dataset set after __init__
            ids = domain_ids_of(dataset, self.domain_column, self.n_domains)
        unit = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        return DomainSampler(
            ids, self.balancer, unit, self.args.seed, self, block=self.args.per_device_train_batch_size
        )

    # -- sharded models (FSDP2) ---------------------------------------------------------------------------------------

    def _same_forward_paths(self, dummy_images: dict | None):
        """`SameForwardPaths` on a VLM with a dummy image; None for a text-only model (every rank runs the same
        modules anyway) or when no training example has an image (no rank ever runs the tower)."""
        from rbvl.runtime.sharding import SameForwardPaths, _vision_tower

        if _vision_tower(self.model) is None:
            return None
        if dummy_images is None:
            dummy_images = self._first_image_inputs()
            if dummy_images is None:
                log.warning(
                    "BalanceTrainer under FSDP: no image in the first examples of the train set, so no dummy image; "
                    "if a later batch has one, pass dummy_images= (one collated example's image inputs)"
                )
                return None
        dummy = {k: v.to(self.args.device) for k, v in dummy_images.items() if isinstance(v, torch.Tensor)}
        return SameForwardPaths(self.model, dummy)

    def _first_image_inputs(self, tries: int = 64) -> dict | None:
        """The user's collator on one training example that has an image: the first of each domain, then the first
        `tries` examples. The same on every rank (each holds the whole map-style dataset)."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return None
        if self._train_domains is not None and self._train_domains[0] is dataset:
            domains = self._train_domains[1]
        else:
            domains = domain_ids_of(dataset, self.domain_column)
        firsts = [int(np.flatnonzero(domains == d)[0]) for d in range(self.n_domains) if (domains == d).any()]
        for i in dict.fromkeys(firsts + list(range(min(tries, len(dataset))))):
            batch = self.data_collator([dataset[i]])
            if isinstance(batch.get("pixel_values"), torch.Tensor):
                return batch
        return None

    # -- the step ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        domain_ids = inputs.pop("domain_ids", None)
        image_domain_ids = inputs.pop("image_domain_ids", None)  # domain of each projector row, for params: head
        tokens = inputs.pop("label_tokens", None)  # (B,) counted by DomainCollator on the CPU
        training = model.training and torch.is_grad_enabled()  # evaluation passes through here too
        if training and domain_ids is None:
            raise KeyError(
                f"BalanceTrainer: a training batch has no domain ids (is '{self.domain_column}' in each example?)"
            )
        labels = inputs.get("labels")
        if training:
            if tokens is None and labels is not None:
                tokens = label_tokens(labels)
            try:  # the tracker checks the range; the dataset's ids were checked when built: a bad one is a collator's
                self.tracker.set_domains(domain_ids, tokens=tokens, image_domain_ids=image_domain_ids)
            except ValueError:
                bad = [int(d) for d in np.asarray(domain_ids).reshape(-1) if not 0 <= int(d) < self.n_domains]
                if not bad:  # another mistake (token counts): as the tracker says it
                    raise
                raise ValueError(
                    f"BalanceTrainer: the collator's 'domain_ids' hold {bad[0]}, outside 0..{self.n_domains - 1} "
                    f"(n_domains={self.n_domains})"
                ) from None
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if training and labels is not None:
            loss = out[0] if return_outputs else out
            self.tracker.watch_loss(loss, normalizer=self._loss_normalizer(tokens, num_items_in_batch))
        elif training and not self.tracker._warned_unwatched:  # the tracker would advise a call the user never makes
            self.tracker._warned_unwatched = True
            log.warning(
                "BalanceTrainer: a training batch has no 'labels', so Balance cannot count each domain's answer "
                "tokens or read the loss's normaliser: the domains' gradients are not token means. Have the "
                "collator return labels (-100 where no loss is taken)"
            )
        return out

    def _loss_normalizer(self, tokens, num_items_in_batch):
        """What `Trainer.compute_loss` divides the summed token loss by (before any later scaling): a CPU number or
        the Trainer's own tensor, never read back from the GPU here."""
        takes_items = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        if num_items_in_batch is None or not takes_items:
            return torch.as_tensor(tokens).sum()  # the model's own mean over this micro-batch's label tokens
        n = num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = n / (self.accelerator.num_processes // self.get_tp_size())  # compute_loss multiplies the loss by this
        return n

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for i, p in enumerate(self.balancer.proportions):
                logs[f"balance/p_{i}"] = round(p, 6)
            logs.update(self._balance_diagnostics)  # the latest update's, once: what to read to trust Balance
            self._balance_diagnostics = {}
        super().log(logs, *args, **kwargs)

    def _note_update(self, info: dict) -> None:
        """Keep an update's diagnostics for the next log line: the L1 change of p and, per domain, the gradient norm,
        its alignment with the target and the estimator's noise (docs/balance.md)."""
        diagnostics = {}
        if isinstance(info.get("p_l1_change"), (int, float)):
            diagnostics["balance/p_l1_change"] = round(float(info["p_l1_change"]), 6)
        for key in ("grad_norm", "alignment", "gram_noise"):
            for i, value in enumerate(info.get(key) or []):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    diagnostics[f"balance/{key}_{i}"] = round(float(value), 6)
        self._balance_diagnostics = diagnostics

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        # Each rank saves its own part of the window (as the Trainer saves each rank's RNG state); sync sums them.
        torch.save(self.tracker.state_dict(), os.path.join(folder, TRACKER_STATE.format(self.args.process_index)))
        if self.args.should_save:
            state = {"balancer": self.balancer.state_dict(), "config": asdict(self.balance_config)}
            with open(os.path.join(folder, BALANCE_STATE), "w") as f:
                json.dump(state, f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, BALANCE_STATE)
        if not os.path.exists(path):
            log.warning("BalanceTrainer: %s holds no Balance state; p restarts from uniform", resume_from_checkpoint)
            return
        with open(path) as f:
            state = json.load(f)
        self.balancer.load_state_dict(state["balancer"])
        saved, now = state.get("config") or {}, asdict(self.balance_config)
        changed = [f"{k}: {saved[k]!r} → {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed:  # the window and p so far were made under the saved settings
            log.warning("BalanceTrainer: resuming with other Balance settings than saved (%s)", "; ".join(changed))
        # each process saved its part of the window: another number of processes would drop parts or lack them
        saved_ranks = len(glob.glob(os.path.join(resume_from_checkpoint, TRACKER_STATE.replace("{:03d}", "[0-9]*"))))
        if saved_ranks != self.args.world_size:
            raise ValueError(
                f"BalanceTrainer: {resume_from_checkpoint} was written by {saved_ranks} process(es), this run has "
                f"{self.args.world_size}: an exact resume needs the same number (each holds its part of the Balance "
                f"window); launch it as it was, e.g. torchrun --nproc_per_node={saved_ranks}"
            )
        mine = os.path.join(resume_from_checkpoint, TRACKER_STATE.format(self.args.process_index))
        self.tracker.load_state_dict(torch.load(mine, weights_only=True))


def broadcast_trainable(model: torch.nn.Module, device) -> None:
    """Rank 0's trainable parameters on every rank, before accelerate shards the model.

    DDP broadcasts rank 0's parameters when it wraps a model; accelerate's FSDP2 (without `cpu_ram_efficient_loading`)
    keeps each rank's own shard of each rank's own tensors. LoRA adapters initialised from the unseeded global RNG
    (PEFT draws `lora_A` from it; the Trainer seeds only in its __init__, after the model was built) then differ between
    ranks, and the sharded model is a patchwork of them: a different model from DDP's from the first step on. The
    adapters and `modules_to_save` copies are small; the frozen base is the same on every rank that loaded one
    checkpoint, and is left alone. Parameters already sharded (DTensors) are left alone too."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        group = by_dtype[dtype]
        flat = torch.cat([p.detach().reshape(-1).to(device) for p in group])
        torch.distributed.broadcast(flat, src=0)
        with torch.no_grad():
            for p, value in zip(group, flat.split([p.numel() for p in group])):
                p.copy_(value.view_as(p).to(p.device))


def refuse_zero3(accelerator=None) -> None:
    """DeepSpeed ZeRO-3 partitions every weight outside its module's forward: one line that points to FSDP2, at the
    start, rather than a run whose tracked linears read partitions (or ranks that wait on each other)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if is_deepspeed_zero3_enabled() or getattr(plugin, "zero_stage", None) == 3:
        raise ValueError(
            "BalanceTrainer does not run under DeepSpeed ZeRO-3; shard with FSDP2 instead "
            "(TrainingArguments(fsdp=True, fsdp_config={'version': 2}) or fsdp_version: 2 in the accelerate config); "
            "ZeRO-1/2 work as they are"
        )


class _BalanceCallback(TrainerCallback):
    def __init__(self, trainer: BalanceMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # the window where the step computes: accelerate may have placed (FSDP) or offloaded the model since __init__
        self.trainer.tracker.to(args.device)
        balancer = self.trainer.balancer
        if state.global_step == 0:  # a new run, not a resume: a second train() starts Balance over too
            balancer.restart()
            self.trainer.tracker.restart()
        first = balancer.warmup_steps + balancer.update_every
        if 0 < state.max_steps < first:
            log.warning(
                "BalanceTrainer: no Balance update falls in this run (%d steps; the first comes after step %d = "
                "warmup_steps %d + update_every %d): p stays at its start",
                state.max_steps, first, balancer.warmup_steps, balancer.update_every,
            )  # fmt: skip
        paths = self.trainer.paths
        if paths is not None:  # fully_shard has replaced the parameters with DTensors since __init__
            named = self.trainer.model.named_parameters()
            paths.vision_params = [p for n, p in named if p.requires_grad and re.search(VISION_SIDE, n)]
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.paths is not None:  # no image on any rank this step: drop the vision side's zero gradients
            self.trainer.paths.settle(SimpleNamespace(device=args.device, all_reduce=torch.distributed.all_reduce))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # commit the step; every update_every steps: sync → gram → update_proportions → reset → publish
        info = self.trainer.balancer.step(state.global_step, self.trainer.tracker)
        if info is not None:
            self.trainer._note_update(info)
            if info.get("degenerate"):
                log.warning("balance update at step %d: %s", state.global_step, info["degenerate"])
        return control


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
