"""The mixture stream: regrouped domains drawn by proportions p that change during training, resumable exactly.

    domains = load_domains("shards/manifest.json")
    schedule = ProportionSchedule(len(domains), initial=p0, lag=loader_lag(2, 2))   # rbvl.balance; shared memory
    stream = MixtureStream(domains, schedule, batch_size=8, collate=Encoder(processor), num_workers=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2)
    for step, (inputs, meta) in enumerate(loader, 1):                # meta: BatchMeta (domain ids, bookkeeping)
        stream.consumed(meta)                                         # advance the resumable state
        ...
        schedule.publish(p_new, after_step=step)                      # applies from step + 1 + lag

How p reaches the data, and why resume is exact. Micro-batches carry a running index i (per rank); batch i belongs
to optimizer step s = i // grad_accum + 1. Its samples' domains are drawn with an RNG seeded by (seed, rank, i) from
the schedule's p for step s. A p published after step s applies from step s + 1 + lag, where lag =
`loader_lag(num_workers, prefetch_factor, grad_accum)`: a DataLoader never has more than num_workers ×
prefetch_factor batches requested ahead, so when a worker starts a batch every update that applies to it is already
in shared memory. The draw never depends on timing, and a resumed run draws what the first run drew. Which samples
of a domain a batch gets is the readers' business (rbvl.data.shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rbvl.data.domains import Domains
from rbvl.data.probe import check_images_per_sample, needed_length
from rbvl.data.shards import DataError, ShardError, decode, decode_or_none, domain_samples, read_shard


def loader_lag(num_workers: int, prefetch_factor: int, grad_accum: int = 1) -> int:
    """Optimizer steps a DataLoader may run ahead: a p published after step s can reach step s + 1 + this.

    With W workers × P prefetch, at most W·P micro-batches are requested beyond the one being trained on, so the
    first step none of whose batches has been started is ceil(W·P / grad_accum) steps later.
    """
    return math.ceil(num_workers * prefetch_factor / grad_accum) if num_workers else 0


@dataclass
class BatchMeta:
    """What the stream says about a micro-batch besides the model inputs (never passed to the model)."""

    index: int  # running micro-batch index on this rank
    reader: int  # which reader (rank × worker slot) made it
    drawn: list[int]  # samples drawn per domain (before any were dropped)
    domain_ids: torch.Tensor  # (B,) domain of each sample
    image_domain_ids: torch.Tensor | None  # (n_images,) domain of each image the vision tower sees, in order
    label_tokens: torch.Tensor  # (B,) label tokens per sample (what the loss averages over)
    truncated: int = 0
    dropped: int = 0


class MixtureStream(IterableDataset):
    """Collated micro-batches whose samples' domains are drawn from the schedule's p (see the module docstring)."""

    def __init__(
        self,
        domains: Domains,
        schedule,
        batch_size: int,
        collate,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        grad_accum: int = 1,
        shuffle_buffer: int = 100,
    ):
        """`schedule`: a `rbvl.balance.ProportionSchedule` (anything with `at(step) -> p`), built with
        lag = `loader_lag(num_workers, prefetch_factor, grad_accum)`; micro-batch i belongs to step i // grad_accum + 1.
        """
        self.domains, self.schedule, self.batch_size, self.collate = domains, schedule, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.grad_accum = num_workers, shuffle_buffer, grad_accum
        self.slots = max(1, num_workers)
        check_images_per_sample(domains, getattr(collate, "family", None))
        self.next_batch = 0  # index of the next batch the main process will receive
        self.cursors = {r: [0] * len(domains) for r in range(rank * self.slots, (rank + 1) * self.slots)}
        self.counts = {"truncated": 0, "dropped": 0}  # since the last log line
        self.totals = {"drawn": 0, "truncated": 0, "dropped": 0}  # since this process started

    # -- main process ---------------------------------------------------------------------------------------------

    def consumed(self, meta: BatchMeta) -> None:
        """Record that the micro-batch `meta` describes reached the training loop."""
        for d, n in enumerate(meta.drawn):
            self.cursors[meta.reader][d] += n
        self.counts["truncated"] += meta.truncated
        self.counts["dropped"] += meta.dropped
        self.totals["drawn"] += sum(meta.drawn)
        self.totals["truncated"] += meta.truncated
        self.totals["dropped"] += meta.dropped
        self.next_batch = meta.index + 1

    def pop_counts(self) -> dict:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def state_dict(self) -> dict:
        return {
            "next_batch": self.next_batch,
            "cursors": {str(k): v for k, v in self.cursors.items()},
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers or state["world_size"] != self.world_size:
            raise DataError(
                f"the stream was saved with num_workers={state['num_workers']}, world_size={state['world_size']}; "
                f"this run has num_workers={self.num_workers}, world_size={self.world_size}: an exact resume needs "
                "the same layout"
            )
        if int(state.get("rank", self.rank)) != self.rank:
            raise DataError(f"this stream state belongs to rank {state['rank']}, not rank {self.rank}")
        self.next_batch = int(state["next_batch"])
        self.cursors = {int(k): list(v) for k, v in state["cursors"].items()}

    # -- workers --------------------------------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (self.next_batch + worker) % self.slots
        reader = self.rank * self.slots + slot
        n_readers = self.world_size * self.slots
        sources = []
        for d, domain in enumerate(self.domains.domains):
            cursor = self.cursors[reader][d]  # resume: skip what was handed out, without reading it
            it = domain_samples(
                domain.train_shards, reader, n_readers, self.seed, d, self.shuffle_buffer, domain.shard_sizes, cursor
            )
            sources.append(it)
        m = len(sources)
        index = self.next_batch + worker
        starved = _Starved(getattr(self.collate, "max_length", None))
        while True:
            rng = np.random.default_rng([self.seed, self.rank, index])
            drawn = np.zeros(m, dtype=np.int64)
            truncated = dropped = 0
            batch = None
            while batch is None:  # a batch whose samples were all too long is drawn again
                p = self.schedule.at(index // self.grad_accum + 1).numpy()
                # sorted: each domain's rows are contiguous, so the tracker splits the gradient with views, not copies
                ids = np.sort(rng.choice(m, size=self.batch_size, p=p / p.sum()))
                np.add.at(drawn, ids, 1)
                samples, kept = [], []
                for d in ids.tolist():
                    sample = decode_or_none(next(sources[d]))
                    if sample is None:  # a sample that no longer decodes is skipped and counted, never a crash
                        dropped += 1
                        continue
                    samples.append(sample)
                    kept.append(d)
                batch, info = self.collate(samples, kept) if samples else (None, {})
                truncated += info.get("truncated", 0)
                dropped += info.get("dropped", 0)
                starved.check(len(ids), info if batch is not None else {**info, "label_tokens": None})
            meta = BatchMeta(
                index=index,
                reader=reader,
                drawn=drawn.tolist(),
                domain_ids=info["domain_ids"],
                image_domain_ids=info["image_domain_ids"],
                label_tokens=info["label_tokens"],
                truncated=truncated,
                dropped=dropped,
            )
            yield batch, meta
            index += self.slots


class _Starved:
    """Stops a stream that cannot make a usable batch instead of redrawing forever: after `LIMIT` samples in a row
    that were dropped or kept no label token, a DataError says which length the data needs."""

    LIMIT = 128  # samples: at a 90% drop rate, 128 in a row happen with probability 1e-6

    def __init__(self, max_length: int | None):
        self.max_length, self.in_a_row, self.seen = max_length, 0, {}

    def check(self, n_drawn: int, info: dict) -> None:
        labels = info.get("label_tokens")
        useful = 0 if labels is None else int((labels > 0).sum())
        if useful:
            self.in_a_row = 0
            return
        self.in_a_row += n_drawn
        for key in ("image_tokens", "answer_starts"):
            self.seen[key] = max(self.seen.get(key, 0), info.get(key, 0))
        if self.in_a_row >= self.LIMIT:
            raise DataError(self.message())

    def message(self) -> str:
        head = f"none of the last {self.in_a_row} training samples can be trained on"
        return needed_length(head, self.seen, self.max_length)


def iter_eval_batches(domains: Domains, d: int, batch_size: int, collate, max_samples: int = 0, counts=None):
    """Domain d's eval shards, in order, once, as collated batches (`counts`, a dict: the collator's "truncated" and
    "dropped" samples are added to it).

    Never silently short: a shard that breaks, holds fewer samples than the manifest lists, or a sample that does not
    decode raises DataError naming the shard (and the sample), since eval counts are part of the manifest.
    """
    domain = domains.domains[d]
    sizes = domain.eval_shard_sizes or [None] * len(domain.eval_shards)
    samples = []
    seen = 0
    for shard, size in zip(domain.eval_shards, sizes):
        got = 0
        try:
            for raw in read_shard(shard):
                if max_samples and seen >= max_samples:
                    break
                got += 1
                seen += 1
                try:
                    samples.append(decode(raw))
                except Exception as e:  # noqa: BLE001 - bad JSON, a broken image: named, never skipped
                    raise DataError(f"eval shard {shard}: sample {raw['__key__']}: {type(e).__name__}: {e}") from None
                if len(samples) == batch_size:
                    batch = _collated(collate, samples, d, counts)
                    samples = []
                    if batch is not None:
                        yield batch
        except GeneratorExit:  # closed early (or at interpreter exit): nothing to report
            raise
        except ShardError as e:
            raise DataError(f"eval shard {e}") from None
        if max_samples and seen >= max_samples:
            break
        if size is not None and got != size:
            raise DataError(f"eval shard {shard}: read {got} samples, the manifest lists {size} (truncated?)")
    if samples:
        batch = _collated(collate, samples, d, counts)
        if batch is not None:
            yield batch


def _collated(collate, samples: list, d: int, counts: dict | None):
    batch, info = collate(samples, [d] * len(samples))
    if counts is not None:
        for key in ("truncated", "dropped"):
            counts[key] = counts.get(key, 0) + int(info.get(key, 0))
    return batch
