"""`rbvl bench stream`: the mixture stream against a raw `webdataset` pipeline over the same shards, in one run.

    rbvl bench stream                                   # generated 4-domain shards, tiny processor, batch 16
    rbvl bench stream --manifest shards/manifest.json --num-workers 2 --batch-size 16

Both sides read the same shards with the same decode (`rbvl.data.decode`), the same collate (`rbvl.data.collate.Encoder`
with the tiny LLaVA processor) and the same DataLoader workers; the raw side is `wds.WebDataset` (shards resampled) → shuffle buffer →
map(decode) → batched(collate), as a user would write it. Rounds alternate (rbvl, raw, rbvl, raw, ...) so drift in
machine speed hits both alike; each round warms its loader up first (workers started, buffers filled) and then times
`--batches` batches. The figure of merit is rbvl's median samples/s over raw's (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from rbvl import manifest as manifest_file
from rbvl.balance import ProportionSchedule
from rbvl.bench._timing import alternate, medians, ratio_line
from rbvl.data import MixtureStream, decode, load_domains, loader_lag
from rbvl.data.collate import Encoder
from rbvl.model import tiny


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=None, help="a regroup manifest.json (default: generated shards)")
    p.add_argument("--domains", type=int, default=4, help="generated domains")
    p.add_argument("--samples", type=int, default=2000, help="generated train samples per domain")
    p.add_argument("--maxcount", type=int, default=500, help="samples per generated shard")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (both sides)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (both sides)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches at the start of each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per side, alternating")
    p.add_argument("--max-length", type=int, default=256, help="collate max_length")


# ---------------------------------------------------------------- input


def make_shards(root: Path, n_domains: int, n: int, maxcount: int, seed: int = 0) -> Path:
    """Regroup-style shards + manifest.json: per domain, 32 px PNG questions (even domains) or text-only ones."""
    rng = np.random.default_rng(seed)
    clusters = []
    for d in range(n_domains):
        folder = root / "train" / f"cluster_{d:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
            for i in range(n):
                key = f"d{d}-{i:06d}"
                sample = {"__key__": key}
                if d % 2 == 0:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    sample["png"] = buf.getvalue()
                    question = "<image>\nWhat is in this picture?"
                else:
                    a, b = rng.integers(0, 100, 2)
                    question = f"What is {a} + {b}?"
                conversation = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(["word"] * int(rng.integers(3, 30)))},
                ]
                sample["json"] = {"id": key, "conversation": conversation, "label": None, "cluster": d}
                sink.write(sample)
        shards = sorted(p.relative_to(root).as_posix() for p in folder.glob("*.tar"))
        sizes = [min(maxcount, n - k * maxcount) for k in range(len(shards))]
        clusters.append(manifest_file.domain_entry(d, f"cluster_{d:03d}", shards, sizes))
    return manifest_file.write(root, manifest_file.build(clusters))


# ---------------------------------------------------------------- the two sides


def n_samples(item) -> int:
    """Samples in one item of either loader (the one place a batch is unpacked: the stream yields (inputs, meta),
    which a DataLoader with batch_size=None hands over as a list)."""
    inputs = item[0] if isinstance(item, (tuple, list)) else item
    return len(inputs["input_ids"])


def rbvl_loader(domains, collate, args):
    m = len(domains)
    lag = loader_lag(args.num_workers, _prefetch(args).get("prefetch_factor", 0))
    schedule = ProportionSchedule(m, initial=[1.0 / m] * m, lag=lag)
    stream = MixtureStream(domains, schedule, args.batch_size, collate, num_workers=args.num_workers)
    return DataLoader(stream, batch_size=None, num_workers=args.num_workers, **_prefetch(args))


def raw_loader(domains, collate, args):
    urls = [s for d in domains.domains for s in d.train_shards]

    def collate_fn(samples):
        return collate([s for s, _ in samples], [d for _, d in samples])[0]

    def decode_with_domain(raw):
        return decode(raw), int(json.loads(raw["json"])["cluster"])

    pipeline = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
        .shuffle(1000)  # shards are resampled at random; a buffer spanning shards mixes their domains
        .map(decode_with_domain)
        .batched(args.batch_size, collation_fn=collate_fn, partial=False)
    )
    return DataLoader(pipeline, batch_size=None, num_workers=args.num_workers, **_prefetch(args))


def _prefetch(args) -> dict:
    return {"prefetch_factor": 2, "persistent_workers": False} if args.num_workers else {}


def timed_round(loader, args) -> float:
    """Samples per second over `args.batches` batches, after `args.warmup` untimed ones."""
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(n_samples(next(it)) for _ in range(args.batches))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def run(args) -> dict:
    loaders = {"rbvl": rbvl_loader, "raw": raw_loader}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or make_shards(Path(tmp), args.domains, args.samples, args.maxcount)
        domains = load_domains(manifest)
        collate = Encoder(tiny.build("tiny-llava")[1], max_length=args.max_length)

        def measure(side: str, _round: int) -> float:  # a fresh loader each round; its warm-up starts the workers
            return timed_round(loaders[side](domains, collate, args), args)

        rates = alternate(tuple(loaders), args.rounds, measure)
    median = medians(rates)
    result = {
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "rbvl_samples_s": median["rbvl"],
        "raw_samples_s": median["raw"],
        "rounds": rates,
    }
    result["ratio"] = result["rbvl_samples_s"] / result["raw_samples_s"]
    print(
        f"stream  batch {args.batch_size}, {args.num_workers} workers, {args.batches} batches x {args.rounds} rounds "
        f"per side (alternating; medians)\n"
        f"  rbvl MixtureStream + Collator      {result['rbvl_samples_s']:9.1f} samples/s  "
        f"(rounds {', '.join(f'{r:.0f}' for r in rates['rbvl'])})\n"
        f"  raw webdataset + same decode/collate {result['raw_samples_s']:7.1f} samples/s  "
        f"(rounds {', '.join(f'{r:.0f}' for r in rates['raw'])})\n" + ratio_line(result["ratio"], goal=0.9)
    )
    return result
