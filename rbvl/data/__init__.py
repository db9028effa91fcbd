"""The data side of training: the manifest's domains, their shards, the mixture stream drawn by p, and collate.

    from rbvl.data import MixtureStream, load_domains, loader_lag
    from rbvl.data.collate import Encoder
    domains = load_domains("shards/manifest.json")
    stream = MixtureStream(domains, schedule, batch_size=8, collate=Encoder(processor), num_workers=2)

    domains.py     Domain, Domains, load_domains: the manifest's clusters and their shards, checked on load
    shards.py      read_shard, count_samples, domain_samples (fair, resumable readers), decode; DataError, ShardError
    stream.py      MixtureStream (stateful: exact resume), BatchMeta, loader_lag, iter_eval_batches
    collate.py     Encoder: chat template, image placeholders, assistant-only labels, projector rows, per family
    synthetic.py   write_tiny_manifest: a small regrouped shard set for tests, benchmarks and smoke runs

Collate and synthetic are imported from their modules (`rbvl.data.collate`, `rbvl.data.synthetic`). Nothing here
imports the training loop, the mixers or evaluation: they import this.
"""

from rbvl.data.domains import Domain, Domains, load_domains
from rbvl.data.shards import (
    DataError,
    ShardError,
    count_samples,
    decode,
    decode_or_none,
    domain_samples,
    read_shard,
)
from rbvl.data.stream import BatchMeta, MixtureStream, iter_eval_batches, loader_lag

__all__ = [
    "BatchMeta",
    "DataError",
    "Domain",
    "Domains",
    "MixtureStream",
    "ShardError",
    "count_samples",
    "decode",
    "decode_or_none",
    "domain_samples",
    "iter_eval_batches",
    "load_domains",
    "loader_lag",
    "read_shard",
]
