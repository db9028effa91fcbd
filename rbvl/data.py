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
in shared memory. The draw never depends on timing, and a resumed run draws what the first run drew.

Who reads what. With W workers the DataLoader asks them round-robin, so batch i comes from slot i mod W; each
(rank, slot) is a reader with one sample iterator per domain (`domain_samples`). Regroup wrote each domain's samples
in a seeded random order; each round, the readers split that sequence into contiguous ranges of equal size (±1),
disjoint and together covering the domain once, and rotate the ranges between rounds, so every sample is drawn equally
often in expectation whatever the shard sizes and reader count, and any window sees a uniform sample of each domain.
A reader opens only the shards its range overlaps. The main process counts what each reader handed out per domain;
on resume a reader skips that many samples of its seeded sequence without reading them.
Faults: a train shard that is unreadable or shorter than the manifest says is skipped sample by sample (counted as
dropped, one warning per shard); eval shards are checked when the manifest is loaded and never read short.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rbvl import manifest as manifest_file

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
    shard_sizes: list[int] | None = None  # samples per train shard (None: a manifest written before they were)
    eval_shard_sizes: list[int] | None = None


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


def load_domains(manifest_path: str | Path, check_eval: bool = True) -> Domains:
    """Read and check a regroup manifest.json; shard paths are relative to its folder.

    Every listed shard must exist and the per-shard sizes must add up to the cluster's counts. With `check_eval`, each
    eval shard's samples are counted from its tar headers (cheap) and must match the manifest, so a truncated or
    corrupt eval shard stops the run at its start, not at the end-of-run evaluation.
    """
    path = Path(manifest_path)
    if not str(manifest_path):
        raise DataError("no manifest given: set manifest=path/to/manifest.json (written by rbvl-regroup)")
    try:
        manifest = manifest_file.read(path)
    except manifest_file.ManifestError as e:
        raise DataError(str(e)) from None
    clusters = manifest["clusters"]
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
        domain = Domain(c["name"], train, int(c["n_train"]), evals, int(c.get("n_eval", 0)))
        domain.shard_sizes = _sizes(path, c, "shard_sizes", train, domain.n_train)
        domain.eval_shard_sizes = _sizes(path, c, "eval_shard_sizes", evals, domain.n_eval)
        if check_eval:
            _check_eval_shards(domain)
        domains.append(domain)
    q = manifest.get("eval_distribution") or None
    if q is not None and (len(q) != len(domains) or sum(q) <= 0):
        raise DataError(f"{path}: eval_distribution has {len(q)} entries for {len(domains)} domains")
    return Domains(domains, q, root, manifest)


def _sizes(path: Path, cluster: dict, key: str, shards: list[str], total: int) -> list[int] | None:
    sizes = cluster.get(key)
    if sizes is None:
        return None
    if len(sizes) != len(shards) or sum(sizes) != total:
        raise DataError(
            f"{path}: {cluster.get('name')}: {key} lists {len(sizes)} sizes summing to {sum(sizes)} for "
            f"{len(shards)} shards holding {total} samples"
        )
    return [int(x) for x in sizes]


def _check_eval_shards(domain: Domain) -> None:
    counted = []
    for shard in domain.eval_shards:
        try:
            counted.append(count_samples(shard))
        except ShardError as e:
            raise DataError(f"eval shard {e} (domain {domain.name})") from None
    expected = domain.eval_shard_sizes or [None] * len(counted)
    for shard, got, want in zip(domain.eval_shards, counted, expected):
        if want is not None and got != want:
            raise DataError(f"eval shard {shard} holds {got} samples, the manifest lists {want} (truncated?)")
    if sum(counted) != domain.n_eval:
        raise DataError(f"domain {domain.name}: eval shards hold {sum(counted)} samples, the manifest {domain.n_eval}")


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


class ShardError(DataError):
    """A shard that cannot be read to the end (corrupt, truncated, not a tar); names it and what was read."""

    def __init__(self, path: str, n_read: int, problem: str):
        super().__init__(f"{path}: unreadable after {n_read} samples: {problem}")
        self.path, self.n_read, self.problem = path, n_read, problem


def read_shard(path: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples of one tar ({"__key__", "__url__", "json": bytes, "png": bytes, ...}), in file order, undecoded.

    Samples before `start` are passed over by reading their tar headers only (their bytes are seeked past); reading
    ends at sample `stop` (exclusive). Samples are grouped like webdataset's (files sharing the name before the first
    dot; extensions lower-cased).

    Raises:
        ShardError: the tar cannot be read (not a tar, a corrupt header, data cut short), naming the path and how many
            samples it gave. A tar cut exactly between two files ends early without an error: compare the count with
            the manifest's `shard_sizes` (`domain_samples` and `iter_eval_batches` do).
    """
    from webdataset.tariterators import base_plus_ext

    index, current, n_out = -1, None, 0
    try:
        with tarfile.open(path, mode="r:*") as tf:
            while True:
                info = tf.next()
                tf.members = []  # TarFile keeps every header it read; a long shard needs none of them
                if info is None:
                    break
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None and index >= start:
                        yield current
                        n_out += 1
                    index += 1
                    if stop is not None and index >= stop:
                        return
                    current = {"__key__": key, "__url__": path}
                if index >= start:  # only the samples asked for are read; the rest is seeked over
                    current[ext.lower()] = tf.extractfile(info).read()
            if current is not None and index >= start and (stop is None or index < stop):
                yield current
    except GeneratorExit:  # closed early (or at interpreter exit): nothing to report
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ShardError(path, n_out, f"{type(e).__name__}: {e}") from None


def count_samples(path: str) -> int:
    """Samples in one tar, from its headers alone (their bytes are seeked past); raises ShardError like read_shard."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for info in iter(tf.next, None):
                tf.members = []
                key = base_plus_ext(info.name)[0] if info.isreg() else None
                if key is not None and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ShardError(path, n, f"{type(e).__name__}: {e}") from None
    return n


def domain_samples(
    shards: list[str],
    reader: int,
    n_readers: int,
    seed: int,
    domain: int,
    shuffle_buffer: int,
    sizes: list[int] | None = None,
    skip: int = 0,
):
    """Endless raw samples of one domain for one reader: equal, disjoint, contiguous ranges of the domain's samples.

    The domain's samples, in manifest order (shards in order, samples in file order: an order Regroup shuffled), form
    a sequence of N. Round e cuts it into `n_readers` contiguous ranges whose sizes differ by at most one,
    starting at a seeded offset o_e (ranges wrap around the end), and reader r takes range (r + e) mod n_readers: in
    every round the readers are disjoint and together cover the domain once, and over n_readers rounds each reader
    takes every range size once, so every sample is drawn equally often in expectation whatever the shard sizes and
    reader count. A reader opens only the shards its range overlaps, seeking past samples before the range (IO ~1x).
    Within a round, output order is a `shuffle_buffer`-sample shuffle buffer over the range, simulated on positions,
    so `skip` (resume) jumps over whole rounds and over samples already handed out without reading their bytes.

    A shard that cannot be read, or holds fewer samples than `sizes` says, yields a marker
    {"__key__", "__url__", "__error__"} for each missing sample (so positions, counts and resume stay aligned):
    `decode_or_none` skips it with one warning per shard. A round in which nothing could be read raises DataError.

    Args:
        shards: the domain's shard paths, in manifest order.
        reader: this reader's index (rank × workers + worker slot); n_readers: all readers of all ranks.
        seed, domain: seed the round offsets and the shuffle buffer (per reader and round).
        shuffle_buffer: samples held for shuffling (<= 1: range order).
        sizes: samples per shard (the manifest's `shard_sizes`); counted from the tar headers when None.
        skip: samples of this reader's sequence to pass over (what it already handed out before a resume).
    """
    sizes = [count_samples(s) for s in shards] if sizes is None else [int(x) for x in sizes]
    if len(sizes) != len(shards):
        raise DataError(f"domain {domain}: {len(sizes)} shard sizes for {len(shards)} shards")
    n = sum(sizes)
    if n == 0:
        raise DataError(f"domain {domain}: its shards hold no samples ({shards[0] if shards else 'no shards'} ...)")
    bounds = np.concatenate([[0], np.cumsum(sizes)])  # shard i holds positions [bounds[i], bounds[i + 1])
    epoch = 0
    while True:
        offset = int(np.random.default_rng([seed, domain, epoch]).integers(n)) if epoch else 0
        j = (reader + epoch) % n_readers
        lo, hi = j * n // n_readers, (j + 1) * n // n_readers
        length = hi - lo
        if skip >= length:  # a whole round already handed out: nothing to read
            skip -= length
            epoch += 1
            continue
        rng = np.random.default_rng([seed, domain, reader, epoch])
        order = _buffer_order(length, shuffle_buffer, rng)[skip:]  # range positions, in output order
        skip = 0
        good = yield from _emit_range(shards, bounds, (offset + lo) % n, length, n, order)
        if good == 0:  # None: an empty range (a domain smaller than the reader count)
            raise DataError(
                f"domain {domain}: no sample of reader {reader}'s share could be read in round {epoch} "
                f"(shards {shards[0]} ...; see the warnings above)"
            )
        epoch += 1


def _buffer_order(length: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """The order in which a shuffle buffer of `buffer` items emits items 0..length-1 read in order."""
    if buffer <= 1:
        return list(range(length))
    out, held = [], []
    for t in range(length):
        held.append(t)
        if len(held) >= buffer:
            out.append(held.pop(int(rng.integers(len(held)))))
    while held:
        out.append(held.pop(int(rng.integers(len(held)))))
    return out


def _emit_range(shards: list[str], bounds: np.ndarray, first: int, length: int, n: int, order: list[int]):
    """Yield the samples at range positions `order` (range = `length` positions from `first`, wrapping at n).

    Reads the range once, in order, from its first needed position; holds only samples read but not yet due.
    Returns how many real (not marker) samples were yielded (None when `order` is empty).
    """
    if not order:
        return None
    needed = set(order)  # after a resume, some positions past the first needed one were already handed out
    due = iter(order)
    want = next(due)
    held: dict[int, dict] = {}
    good = 0
    for t, sample in _read_positions(shards, bounds, first, length, n, start=min(order)):
        if t in needed:
            held[t] = sample
        while want is not None and want in held:
            out = held.pop(want)
            good += "__error__" not in out
            yield out
            want = next(due, None)
        if want is None:
            break
    return good


def _read_positions(shards: list[str], bounds: np.ndarray, first: int, length: int, n: int, start: int = 0):
    """(range position, raw sample) for range positions start..length-1, shard by shard; markers for what is missing."""
    t = start
    while t < length:
        g = (first + t) % n  # position in the domain sequence
        i = int(np.searchsorted(bounds, g, side="right")) - 1
        a = g - int(bounds[i])  # first sample wanted in shard i
        b = min(int(bounds[i + 1]) - int(bounds[i]), a + (length - t))  # wanted up to here (the range or the shard)
        got, problem = 0, None
        try:
            for sample in read_shard(shards[i], a, b):
                yield t, sample
                t += 1
                got += 1
        except GeneratorExit:  # closed early (or at interpreter exit): nothing to report
            raise
        except ShardError as e:
            problem = e.problem
        if a + got < b:  # a shard shorter than the manifest says, or one that broke while reading
            what = problem or f"holds {a + got} samples, the manifest lists {int(bounds[i + 1] - bounds[i])}"
            marker = f"{shards[i]}: unreadable after sample {a + got}: {what}"
            for k in range(a + got, b):
                yield t, {"__key__": f"missing-{k}", "__url__": shards[i], "__error__": marker}
                t += 1


_WARNED: set[str] = set()  # shards already warned about in this process


def decode(sample: dict) -> dict:
    """A raw shard sample → {"id", "conversation", "image": PIL RGB or None} (the image contract: rbvl.images).

    Raises DataError when the sample is unusable, e.g. its conversation places an `<image>` but the sample holds no
    image (a shard cut inside a sample).
    """
    from rbvl.images import open_rgb

    if "__error__" in sample:
        raise DataError(sample["__error__"])
    meta = json.loads(sample["json"])
    image = next((open_rgb(sample[ext]) for ext in IMAGE_EXTS if ext in sample), None)
    placeholders = sum(str(turn.get("content", "")).count("<image>") for turn in meta["conversation"])
    if placeholders != (image is not None):
        raise DataError(
            f"sample {sample['__key__']}: the conversation places {placeholders} <image> but the sample holds "
            f"{int(image is not None)} image (a shard cut inside a sample?)"
        )
    return {"id": meta.get("id", sample["__key__"]), "conversation": meta["conversation"], "image": image}


def decode_or_none(sample: dict) -> dict | None:
    """`decode`, or None for a sample that cannot be used (logged: per sample, or once per unreadable shard)."""
    if "__error__" in sample:
        if sample["__url__"] not in _WARNED:
            _WARNED.add(sample["__url__"])
            log.warning("skipping unreadable shard samples (counted as dropped): %s", sample["__error__"])
        return None
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
            cursor = self.cursors[reader][d]  # resume: skip what was handed out, without reading it
            it = domain_samples(
                domain.train_shards, reader, n_readers, self.seed, d, self.shuffle_buffer, domain.shard_sizes, cursor
            )
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
    """Domain d's eval shards, in order, once, as collated batches.

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
                    batch, _ = collate(samples, [d] * len(samples))
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
        batch, _ = collate(samples, [d] * len(samples))
        if batch is not None:
            yield batch
