"""Regroup writes each cluster in a seeded random order: the stream's order is unrelated to the input order."""

import numpy as np
from scipy.stats import spearmanr

from rbvl.data import domain_samples, read_shard
from rbvl.records import Record, Rejects
from rbvl.regroup.write import write_shards


def text_records(n: int) -> list[Record]:
    return [
        Record(f"r{i:05d}", [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}], text=f"Q{i}")
        for i in range(n)
    ]


def write(tmp_path, records, clusters, seed=0, maxcount=400):
    writer = write_shards(
        tmp_path, "train", records, clusters, np.zeros(len(records)), maxcount, seed, Rejects(), False
    )
    return {c: [str(tmp_path / s) for s in writer.shards(c)[0]] for c in writer.shard_sizes}, writer


def test_stream_order_is_uncorrelated_with_input_order(tmp_path):
    n = 5000
    records = text_records(n)
    clusters = np.arange(n) % 2  # two clusters, each in input order before the write
    shards, writer = write(tmp_path, records, clusters)
    for c in (0, 1):
        sizes = writer.shards(c)[1]
        it = domain_samples(shards[c], 0, 2, seed=0, domain=c, shuffle_buffer=100, sizes=sizes)  # one of 2 readers
        keys = [next(it)["__key__"] for _ in range(sum(sizes) // 2)]
        position = np.array([int(k[1:]) for k in keys])  # input index of each streamed sample
        rho = spearmanr(np.arange(len(position)), position).statistic
        assert abs(rho) < 0.1, f"cluster {c}: Spearman {rho:.3f} between stream order and input order"
        first = position[: len(position) // 5]  # the first fifth of the stream spans the whole input
        assert first.min() < 0.1 * n and first.max() > 0.9 * n


def test_write_order_is_seeded(tmp_path):
    records = text_records(300)
    clusters = np.zeros(300, dtype=int)

    def keys(folder, seed):
        shards, _ = write(folder, records, clusters, seed=seed, maxcount=100)
        return [s["__key__"] for shard in shards[0] for s in read_shard(shard)]

    a, b, c = keys(tmp_path / "a", 0), keys(tmp_path / "b", 0), keys(tmp_path / "c", 1)
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(r.id for r in records)


def test_a_record_whose_image_vanished_goes_to_the_same_rejects(tmp_path):
    records = text_records(5)
    records[2].image_path = str(tmp_path / "gone.png")  # embedded earlier, deleted before the write
    rejects = Rejects()
    writer = write_shards(tmp_path, "train", records, np.zeros(5, dtype=int), np.zeros(5), 10, 0, rejects, False)
    assert sum(writer.shards(0)[1]) == 4 and rejects.count("train") == 1
    ((split, reject),) = rejects.items
    assert (split, reject.id, reject.reason) == ("train", "r00002", "missing_image")
