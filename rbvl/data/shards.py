"""Reading one domain's shards: raw samples by position, readers that split a domain fairly, and the decode to
{"id", "conversation", "image"[, "images"]} (the image contract: rbvl.records.images).

    for raw in read_shard("shards/train/cluster_000/shard-000000.tar", start=10, stop=20):
        sample = decode_or_none(raw)   # None (logged) for a sample that cannot be used

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
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np

from rbvl.records.images import SHARD_EXTS, open_rgb

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A manifest, shard set or mixing setting that cannot be used; the message names it."""


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
    """A raw shard sample → {"id", "conversation", "image": PIL RGB or None} (the image contract: rbvl.records.images),
    plus "images": [PIL RGB, ...] for a multi-image sample ("image" is then its first). A one-image sample holds its
    image as `png` / `jpg` / `webp`; a multi-image one the members its JSON lists in `images` (`0.png`, `1.jpg` ...),
    in placeholder order.

    Raises DataError when the sample is unusable, e.g. its conversation places an `<image>` but the sample holds no
    image (a shard cut inside a sample).
    """
    if "__error__" in sample:
        raise DataError(sample["__error__"])
    meta = json.loads(sample["json"])
    members = meta.get("images") or [next((ext for ext in SHARD_EXTS if ext in sample), None)]
    missing = [m for m in members if m is not None and m not in sample]
    if missing:
        raise DataError(f"sample {sample['__key__']}: its JSON lists images {missing} the sample does not hold")
    images = [open_rgb(sample[m]) for m in members if m is not None]
    placeholders = sum(str(turn.get("content", "")).count("<image>") for turn in meta["conversation"])
    if placeholders != len(images):
        raise DataError(
            f"sample {sample['__key__']}: the conversation places {placeholders} <image> but the sample holds "
            f"{len(images)} image(s) (a shard cut inside a sample?)"
        )
    out = {"id": meta.get("id", sample["__key__"]), "conversation": meta["conversation"], "image": None}
    if images:
        out["image"] = images[0]
    if len(images) > 1:
        out["images"] = images
    return out


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
