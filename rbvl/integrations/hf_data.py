"""The data side of `BalanceTrainer` (rbvl/integrations/hf.py): each example's domain id read and checked, the
collator wrapper that carries the ids to `compute_loss`, and the sampler that draws examples by the Balancer's p.

Domain ids are integers 0..n_domains-1 in one column (`domain` by default). A column that is missing, a value that
is no integer, or an id outside the range is an error naming the example and the value, before any training: such
examples could never be drawn, and a domain left without examples would be drawn from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from rbvl.balance import Balancer, label_tokens


class DomainCollator:
    """Wraps the user's collator: the examples go to it unchanged; the domain column is taken out of what it returns
    (the model must not see it) and the ids, read from the examples, are added as `domain_ids`.

    One row per example, in order, is what lets an id name its row. A collator that drops examples (rbvl's `Encoder`
    drops over-long ones) returns the kept rows' ids as `domain_ids` in its batch, which then win; a batch whose rows
    do not match its examples (packing, TRL's padding_free) is an error. Examples without the column at all (an eval
    set) pass without ids: only a training step needs them (`compute_loss`)."""

    def __init__(self, collator, column: str):
        self.collator, self.column = collator, column

    def __call__(self, features: list[dict]):
        have = [isinstance(f, Mapping) and self.column in f for f in features]
        ids = None
        if all(have):  # types only: an eval set's ids are never used, and training's were range-checked at init
            ids = checked_domain_ids([f[self.column] for f in features], self.column, None, "example")
        elif any(have):
            i = have.index(False)
            keys = sorted(features[i]) if isinstance(features[i], Mapping) else type(features[i]).__name__
            raise KeyError(
                f"example {i} of the batch has no '{self.column}' column (the domain id), which the others have; "
                f"it has {keys}"
            )
        batch = self.collator(features)
        if batch is None:
            raise ValueError(
                f"the data collator returned no batch for {len(features)} examples (it dropped every one: too long "
                f"for its max_length?)"
            )
        batch.pop(self.column, None)
        own = batch.pop("domain_ids", None)  # the collator's own: the domains of the rows it kept
        if own is not None:
            own = own.cpu().numpy() if isinstance(own, torch.Tensor) else own
            # types only, as for the examples' ids: an eval set may hold other domains (training checks the range)
            ids = checked_domain_ids(list(np.asarray(own).reshape(-1)), "domain_ids", None, "the collator's batch: row")
        rows = _rows(batch)
        if own is not None and rows is not None and rows != len(ids):
            raise ValueError(
                f"the data collator returned {len(ids)} 'domain_ids' for the {rows} row(s) of its batch: one per row, "
                f"the domain of each row it kept"
            )
        if ids is not None and rows is not None and rows != len(ids):
            raise ValueError(
                f"the data collator returned {rows} row(s) for {len(ids)} examples: Balance needs each row's domain. "
                f"A collator that drops examples can return the kept rows' ids as 'domain_ids' in its batch; packing "
                f"and padding_free (several examples in one row) are not supported"
            )
        if ids is not None:
            # numpy, not tensors: the Trainer moves tensors to the GPU, and reading them back would stall every step
            batch["domain_ids"] = ids
        if isinstance(batch.get("labels"), torch.Tensor):
            batch["label_tokens"] = label_tokens(batch["labels"]).numpy()
        if isinstance(batch.get("image_domain_ids"), torch.Tensor):
            batch["image_domain_ids"] = batch["image_domain_ids"].numpy()
        elif "image_domain_ids" in batch and batch["image_domain_ids"] is None:
            del batch["image_domain_ids"]
        return batch  # an `image_domain_ids` the user's collator returns (params: head on a VLM) rides along


def _rows(batch) -> int | None:
    """The batch's rows (examples), from its labels or input ids; None when it has neither as a tensor."""
    for key in ("labels", "input_ids"):
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def refuse_packing(args) -> None:
    """TRL's packing and padding_free put several examples, of any domains, in one row: Balance needs each row's."""
    for name in ("packing", "padding_free"):
        if getattr(args, name, False):
            raise ValueError(
                f"BalanceTrainer: {name}=True is not supported: it puts several examples, of different domains, in "
                f"one row, and Balance needs each row's domain; set {name}=False"
            )


def domain_ids_of(dataset, column: str, n_domains: int | None = None) -> np.ndarray:
    """Every training example's domain id (`column`), checked (`checked_domain_ids`)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, Sequence) and not isinstance(names, str):  # datasets.Dataset: read one column
        if column not in names:
            raise KeyError(
                f"the train dataset has no '{column}' column (each example's domain id; domain_column= names "
                f"another); its columns: {list(names)}"
            )
        values = _column(dataset, column)
    else:
        values = []
        for i in range(len(dataset)):
            example = dataset[i]
            if not isinstance(example, Mapping) or column not in example:
                keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
                raise KeyError(f"train example {i} has no '{column}' column (its domain id); it has {keys}")
            values.append(example[column])
    return checked_domain_ids(values, column, n_domains, "train example")


def given_domain_ids(values, n_examples: int, n_domains: int) -> np.ndarray:
    """`train_domains=` as checked ids: one per train example."""
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    values = values if isinstance(values, np.ndarray) else list(values)
    if len(values) != n_examples:
        raise ValueError(f"train_domains has {len(values)} domain ids for the {n_examples} train examples: one each")
    return checked_domain_ids(values, "train_domains", n_domains, "train example")


def _column(dataset, column: str):
    """A datasets.Dataset's column: an integer column as one numpy array straight from Arrow (a million rows in
    milliseconds, whatever the dataset's format); any other as Python values, to be checked one by one."""
    try:
        arrow = dataset.with_format("arrow")[column]
        import pyarrow as pa

        if pa.types.is_integer(arrow.type) and arrow.null_count == 0:
            return arrow.to_numpy()
        return arrow.to_pylist()
    except (AttributeError, ImportError, TypeError, ValueError):  # not an Arrow-backed dataset
        return list(dataset[column])


def checked_domain_ids(values, column: str, n_domains: int | None, what: str) -> np.ndarray:
    """`values` as int64 domain ids, or an error naming the first bad one (`what` i): not an integer (a name, a
    fraction, a bool), or outside 0..n_domains-1."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        ids = values.astype(np.int64, copy=False)
    elif isinstance(values, list) and all(type(v) is int for v in values):  # a datasets int column: no bool, no name
        ids = np.asarray(values, dtype=np.int64)
    else:
        ids = _one_by_one(values, column, what)
    if n_domains is not None:
        bad = np.flatnonzero((ids < 0) | (ids >= n_domains))
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{what} {i} has domain id {ids[i]} in '{column}', outside 0..{n_domains - 1} (n_domains={n_domains}); "
                f"{len(bad)} of {len(ids)} are outside"
            )
    return ids


def _one_by_one(values, column: str, what: str) -> np.ndarray:
    """Values of mixed or non-integer types, each checked: the first that is no integer is an error naming it."""
    ids = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # "3", as a CSV gives it
            value = int(value)
        integral = isinstance(value, (int, np.integer)) or (
            isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
        )
        if isinstance(value, (bool, np.bool_)) or not integral:
            raise ValueError(
                f"{what} {i}: the domain id in '{column}' must be an integer 0..m-1, got {value!r}"
                + (
                    " (map domain names to ids 0..m-1 first, in the order target lists them)"
                    if isinstance(value, str)
                    else ""
                )
            )
        ids[i] = int(value)
    return ids


class DomainSampler(Sampler):
    """Indices drawn by domain from the Balancer's p, step by step, replayable exactly (see the module docstring).

    `unit` = examples per optimizer step over all ranks; an epoch is `len(self)` indices, a whole number of steps.
    """

    def __init__(self, domains: np.ndarray, balancer: Balancer, unit: int, seed: int, trainer=None, block: int = 0):
        self.by_domain = [np.flatnonzero(domains == d) for d in range(balancer.m)]
        empty = [d for d, idx in enumerate(self.by_domain) if len(idx) == 0]
        if empty:
            raise ValueError(f"no training example has domain id(s) {empty}; n_domains={balancer.m}")
        self.balancer, self.unit, self.seed, self.trainer = balancer, unit, seed, trainer
        self.block = block  # micro-batch size: each micro-batch's examples come sorted by domain (see __iter__)
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
            drawn = rng.choice(len(p), size=self.unit, p=p / p.sum())
            if self.block:  # sorted within each micro-batch: the tracker splits the gradient with views, not copies
                drawn = np.concatenate([np.sort(drawn[i : i + self.block]) for i in range(0, self.unit, self.block)])
            for d in drawn:
                pool = self.by_domain[d]
                yield int(pool[rng.integers(len(pool))])

    def _check_not_ahead(self, step: int) -> None:
        """Every update that applies to `step` must already be made, or the draw would depend on timing."""
        if self.trainer is None:
            return
        done = self.trainer.state.global_step
        if done < step - self.balancer.schedule.lag - 1:
            raise RuntimeError(
                f"the data loader runs {step - 1 - done} steps ahead of training, more than Balance's lag "
                f"({self.balancer.schedule.lag}); lower dataloader_num_workers or dataloader_prefetch_factor"
            )
