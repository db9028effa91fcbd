"""The mixture stream: regrouped domains drawn by proportions p that change during training, resumable exactly.

    domains = load_domains("shards/manifest.json")
    schedule = ProportionSchedule(len(domains), initial=p0, lag=loader_lag(2, 2))   # rbvl.balance; shared memory
    stream = MixtureStream(domains, schedule, batch_size=8, collate=Collator(processor), num_workers=2)
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
in shared memory. The draw never depends on timing, and a resumed run draws what the first run drew.

Who reads what. With W workers the DataLoader asks them round-robin, so batch i comes from slot i mod W; each
(rank, slot) is a reader with one sample iterator per domain. A domain's shards are split across readers
(shards[k::n_readers]); a domain with fewer shards than readers is split by sample index instead. Readers are
disjoint and together cover each domain once per epoch; at the end of its share a reader starts a new epoch with a
new shard order (domains never run dry). The main process counts what each reader handed out per domain; on resume
the readers replay their seeded sequences and skip that many samples (without decoding them).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rbvl.collate import Encoder, to_messages  # noqa: F401  (to_messages: rbvl 0.1's import path)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class DataError(ValueError):
    """A manifest, shard set or mixing setting that cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------------------------------------
# The manifest's domains
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Domain:
    name: str
    train_shards: list[str]
    n_train: int
    eval_shards: list[str] = field(default_factory=list)
    n_eval: int = 0


@dataclass
class Domains:
    domains: list[Domain]
    eval_distribution: list[float] | None
    root: Path
    manifest: dict

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def __len__(self) -> int:
        return len(self.domains)


def load_domains(manifest_path: str | Path) -> Domains:
    """Read and check a regroup manifest.json; shard paths are relative to its folder."""
    path = Path(manifest_path)
    if not str(manifest_path):
        raise DataError("no manifest given: set manifest=path/to/manifest.json (written by rbvl-regroup)")
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (run rbvl-regroup first; the manifest is written last)")
    try:
        manifest = json.loads(path.read_text())
        clusters = manifest["clusters"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a regroup manifest ({e})") from None
    root = path.parent
    domains = []
    for c in clusters:
        train = [str(root / s) for s in c.get("train_shards", [])]
        evals = [str(root / s) for s in c.get("eval_shards", [])]
        for shard in train + evals:
            if not Path(shard).is_file():
                raise DataError(f"{path}: shard listed but missing: {shard}")
        if not train or c.get("n_train", 0) == 0:
            raise DataError(f"{path}: domain {c.get('name')} has no training samples")
        domains.append(Domain(c["name"], train, int(c["n_train"]), evals, int(c.get("n_eval", 0))))
    q = manifest.get("eval_distribution") or None
    if q is not None and (len(q) != len(domains) or sum(q) <= 0):
        raise DataError(f"{path}: eval_distribution has {len(q)} entries for {len(domains)} domains")
    return Domains(domains, q, root, manifest)


def initial_proportions(strategy: str, domains: Domains, weights: dict | None = None) -> list[float]:
    """p at step 0: uniform (`stratified`, `rnb` and the peer mixers), by size (`natural`), or from named weights
    (`manual`)."""
    m = len(domains)
    if strategy in ("stratified", "rnb", "odm", "dga", "doremi", "aioli"):
        p = np.ones(m)
    elif strategy == "natural":
        p = np.array([d.n_train for d in domains.domains], dtype=float)
    elif strategy == "manual":
        p = np.zeros(m)
        for key, w in (weights or {}).items():
            index = _domain_index(str(key), domains.names)
            p[index] = float(w)
        if p.sum() <= 0:
            raise DataError("mixing.weights give every domain weight 0")
    else:
        raise DataError(f"unknown mixing strategy {strategy!r}")
    return (p / p.sum()).tolist()


def _domain_index(key: str, names: list[str]) -> int:
    if key in names:
        return names.index(key)
    if key.isdigit() and int(key) < len(names):
        return int(key)
    raise DataError(f"mixing.weights names unknown domain '{key}' (domains: {', '.join(names)})")


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


# ---------------------------------------------------------------------------------------------------------------------
# Reading one domain's shards
# ---------------------------------------------------------------------------------------------------------------------


def read_shard(path: str) -> Iterator[dict]:
    """Raw samples of one tar ({"__key__", "json": bytes, "png": bytes, ...}), in file order, nothing decoded."""
    from webdataset import tariterators

    yield from tariterators.tarfile_samples([{"url": path}])


def domain_samples(shards: list[str], reader: int, n_readers: int, seed: int, domain: int, shuffle_buffer: int):
    """Endless raw samples of one domain for one reader: its disjoint share, reshuffled every epoch."""
    if len(shards) >= n_readers:
        mine, keep = shards[reader::n_readers], None
    else:
        mine, keep = shards, reader
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, domain, reader, epoch])
        order = [mine[i] for i in rng.permutation(len(mine))] if keep is None else mine
        produced = 0
        buffer: list[dict] = []
        index = 0
        for shard in order:
            for sample in read_shard(shard):
                index += 1
                if keep is not None and (index - 1) % n_readers != keep:
                    continue
                produced += 1
                if shuffle_buffer <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))
        if produced == 0:
            if keep is None or index == 0:
                raise DataError(f"domain {domain}: its shards hold no samples ({shards[0]} ...)")
            keep = None  # fewer samples than readers: this reader shares the whole (tiny) domain
            mine = shards
        epoch += 1


def decode(sample: dict) -> dict:
    """A raw shard sample → {"id", "conversation", "image": PIL RGB or None}."""
    from PIL import Image

    meta = json.loads(sample["json"])
    image = None
    for ext in IMAGE_EXTS:
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
            break
    return {"id": meta.get("id", sample["__key__"]), "conversation": meta["conversation"], "image": image}


def decode_or_none(sample: dict) -> dict | None:
    try:
        return decode(sample)
    except Exception as e:  # noqa: BLE001 - bad JSON, a broken image: any of them only loses this sample
        log.warning("skipping shard sample %s: %s: %s", sample.get("__key__"), type(e).__name__, e)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------------------------


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
        self.next_batch = 0  # index of the next batch the main process will receive
        self.cursors = {r: [0] * len(domains) for r in range(rank * self.slots, (rank + 1) * self.slots)}
        self.counts = {"truncated": 0, "dropped": 0}

    # -- main process ---------------------------------------------------------------------------------------------

    def consumed(self, meta: BatchMeta) -> None:
        """Record that the micro-batch `meta` describes reached the training loop."""
        for d, n in enumerate(meta.drawn):
            self.cursors[meta.reader][d] += n
        self.counts["truncated"] += meta.truncated
        self.counts["dropped"] += meta.dropped
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
            it = domain_samples(domain.train_shards, reader, n_readers, self.seed, d, self.shuffle_buffer)
            for _ in range(self.cursors[reader][d]):  # resume: skip what was handed out, undecoded
                next(it)
            sources.append(it)
        m = len(sources)
        index = self.next_batch + worker
        while True:
            rng = np.random.default_rng([self.seed, self.rank, index])
            drawn = np.zeros(m, dtype=np.int64)
            truncated = dropped = 0
            batch = None
            while batch is None:  # a batch whose samples were all too long is drawn again
                p = self.schedule.at(index // self.grad_accum + 1).numpy()
                ids = rng.choice(m, size=self.batch_size, p=p / p.sum())
                np.add.at(drawn, ids, 1)
                samples, kept = [], []
                for d in ids.tolist():
                    sample = decode_or_none(next(sources[d]))
                    if sample is None:  # a sample that no longer decodes is skipped and counted, never a crash
                        dropped += 1
                        continue
                    samples.append(sample)
                    kept.append(d)
                if not samples:
                    continue
                batch, info = self.collate(samples, kept)
                truncated += info["truncated"]
                dropped += info["dropped"]
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


def iter_eval_batches(domains: Domains, d: int, batch_size: int, collate, max_samples: int = 0):
    """Domain d's eval shards, in order, once, as collated batches."""
    samples = []
    seen = 0
    for shard in domains.domains[d].eval_shards:
        for raw in read_shard(shard):
            if max_samples and seen >= max_samples:
                break
            seen += 1
            samples.append(decode(raw))
            if len(samples) == batch_size:
                batch, _ = collate(samples, [d] * len(samples))
                samples = []
                if batch is not None:
                    yield batch
    if samples:
        batch, _ = collate(samples, [d] * len(samples))
        if batch is not None:
            yield batch


# ---------------------------------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------------------------------


class Collator(Encoder):
    """Conversations → model inputs with the processor's chat template; loss only on assistant turns.

    Every family (rbvl/families.py): image placeholders expanded by the processor, assistant-only labels, the
    projector's rows and their domains; see rbvl.collate.Encoder.
    """
