"""Readers of a domain: every sample drawn equally often whatever the shard layout, disjoint rounds, exact cheap
resume, IO ~1x, and corrupt or truncated shards named (train: skipped and counted; eval: never read short)."""

import json
import logging
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from conftest import write_tiny_manifest

import rbvl.data.shards as data
from rbvl.data import DataError, decode_or_none, domain_samples, iter_eval_batches, load_domains, read_shard


def write_shards(folder, sizes, prefix="s"):
    """Shards of `sizes` samples with keys s<shard>_<i>; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, size in enumerate(sizes):
        path = folder / f"shard-{j:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(size):
                sink.write({"__key__": f"{prefix}{j}_{i:03d}", "json": {"id": f"{prefix}{j}_{i}", "conversation": []}})
        paths.append(str(path))
    return paths


def take(it, n):
    return [next(it)["__key__"] for _ in range(n)]


def readers(shards, sizes, n_ranks, n_workers, buffer=4, seed=0):
    """One iterator per (rank, worker), built as MixtureStream builds them: reader = rank * workers + worker."""
    n = n_ranks * n_workers
    return [
        domain_samples(shards, rank * n_workers + w, n, seed, 0, buffer, sizes)
        for rank in range(n_ranks)
        for w in range(n_workers)
    ]


@pytest.mark.parametrize(
    "sizes, n_ranks, n_workers",
    [([10, 3, 7], 2, 2), ([10, 3, 8], 2, 2), ([10, 3, 8], 3, 1), ([5], 2, 2), ([1, 2], 2, 2), ([2], 3, 1)],
)
def test_every_sample_is_drawn_equally_often(tmp_path, sizes, n_ranks, n_workers):
    """Readers asked a random, equal-in-expectation number of times (as the stream asks them) draw every sample of
    the domain a number of times within a statistical tolerance of the same expectation."""
    shards = write_shards(tmp_path, sizes)
    n = sum(sizes)
    rng = np.random.default_rng(1)
    counts = Counter()
    total = 0
    for it in readers(shards, sizes, n_ranks, n_workers):
        draws = int(rng.binomial(2 * 300 * n // (n_ranks * n_workers), 0.5))  # this domain's share of the draws
        counts.update(take(it, draws))
        total += draws
    assert len(counts) == n
    expected = total / n
    # Each sample's count is a sum over readers of (full rounds + a partial round): sd ~ sqrt(expected) bounds it.
    tol = 4.5 * np.sqrt(expected) + n_ranks * n_workers
    worst = max(abs(c - expected) for c in counts.values())
    assert worst <= tol, f"a sample drawn {worst:.1f} times off the mean {expected:.1f} (tolerance {tol:.1f})"
    # The old split (shards[r::n_readers]) drew shard sizes unevenly: check this test would catch a 2x imbalance.
    assert tol < expected / 2


@pytest.mark.parametrize("sizes, n_readers", [([10, 3, 7], 4), ([10, 3, 8], 3), ([3], 4)])
def test_each_round_is_disjoint_and_covers_the_domain(tmp_path, sizes, n_readers):
    shards = write_shards(tmp_path, sizes)
    n = sum(sizes)
    every = {s["__key__"] for path in shards for s in read_shard(path)}

    def length(r, epoch):  # reader r's range in round `epoch` (docs/formats.md, "Readers")
        j = (r + epoch) % n_readers
        return (j + 1) * n // n_readers - j * n // n_readers

    for epoch in range(3):
        keys = []
        for r in range(n_readers):
            before = sum(length(r, e) for e in range(epoch))  # what this reader handed out in earlier rounds
            keys += take(domain_samples(shards, r, n_readers, 0, 0, 5, sizes, skip=before), length(r, epoch))
        assert len(keys) == len(set(keys)) == n and set(keys) == every, f"round {epoch}"


def test_resume_skip_equals_the_tail_and_reads_no_skipped_bytes(tmp_path, monkeypatch):
    sizes = [10, 3, 7]
    shards = write_shards(tmp_path, sizes)
    full = take(domain_samples(shards, 1, 4, 7, 2, 6, sizes), 60)
    for skip in (0, 3, 5, 11, 27, 59):
        assert take(domain_samples(shards, 1, 4, 7, 2, 6, sizes, skip=skip), 60 - skip) == full[skip:]

    read = []
    real = data.read_shard

    def counting(path, start=0, stop=None):
        for sample in real(path, start, stop):
            read.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(data, "read_shard", counting)
    take(domain_samples(shards, 1, 4, 7, 2, 6, sizes, skip=55), 5)
    assert len(read) <= 5 + 6, "a resume reads at most the remaining samples plus one shuffle buffer"
    read.clear()
    its = readers(shards, sizes, 2, 2, buffer=6)
    for it in its:
        take(it, 5)  # round 0 of every reader: 20 samples
    assert len(read) == sum(sizes), "IO ~1x: each reader reads only its own range"


def test_without_sizes_they_are_counted(tmp_path):
    shards = write_shards(tmp_path, [4, 2])
    a = take(domain_samples(shards, 0, 2, 0, 0, 1), 9)
    b = take(domain_samples(shards, 0, 2, 0, 0, 1, [4, 2]), 9)
    assert a == b and a[:3] == ["s0_000", "s0_001", "s0_002"]


def test_corrupt_and_truncated_train_shards_are_skipped_counted_and_named(tmp_path, caplog):
    sizes = [6, 6]
    shards = write_shards(tmp_path, sizes)
    raw = open(shards[1], "rb").read()
    open(shards[1], "wb").write(raw[: len(raw) // 2])  # cut in half
    it = domain_samples(shards, 0, 1, 0, 0, 1, sizes)
    first = [next(it) for _ in range(12)]
    bad = [s for s in first if "__error__" in s]
    assert 0 < len(bad) < 6 and all(shards[1] in s["__error__"] for s in bad)
    with caplog.at_level(logging.WARNING, logger="rbvl.data"):
        decoded = [decode_or_none(s) for s in first]
    assert sum(d is None for d in decoded) == len(bad)
    warnings = [r.getMessage() for r in caplog.records if shards[1] in r.getMessage()]
    assert len(warnings) == 1 and "unreadable after sample" in warnings[0]

    open(shards[0], "wb").write(b"\x00garbage" * 300)  # not a tar at all
    open(shards[1], "wb").write(b"\x00garbage" * 300)
    it = domain_samples(shards, 0, 1, 0, 0, 1, sizes)
    with pytest.raises(DataError, match="no sample of reader 0's share could be read"):
        take(it, 13)


def test_truncated_eval_shard_is_named_when_the_manifest_is_loaded(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "m", n_domains=2, n_train=8, n_eval=6)
    domains = load_domains(manifest)
    shard = domains.domains[1].eval_shards[0]
    raw = open(shard, "rb").read()
    open(shard, "wb").write(raw[: (len(raw) // 1024) * 512])  # cut mid-shard
    with pytest.raises(
        DataError, match=r"eval shard .*cluster_001/shard-000000.tar(: unreadable after 2 samples| holds 2 samples)"
    ):
        load_domains(manifest)
    # Read without the load-time check, the eval loop itself refuses to come back short.
    domains = load_domains(manifest, check_eval=False)

    def collate(samples, ids):
        return {"n": len(samples)}, {}

    with pytest.raises(
        DataError, match=r"eval shard .*cluster_001/shard-000000.tar: (unreadable after \d samples|read \d samples)"
    ):
        list(iter_eval_batches(domains, 1, 2, collate))
    assert sum(b["n"] for b in iter_eval_batches(domains, 0, 2, collate)) == 6


def test_manifest_shard_sizes_must_add_up(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "m", n_domains=2, n_train=8, n_eval=2)
    m = json.loads(manifest.read_text())
    m["clusters"][0]["shard_sizes"] = [3, 3]
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match="shard_sizes lists 2 sizes summing to 6 for 2 shards holding 8"):
        load_domains(manifest)
