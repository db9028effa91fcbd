"""The manifest's domains: the regrouped clusters a run mixes, with their train and eval shards, checked on load.

    domains = load_domains("shards/manifest.json")
    domains.names, len(domains), domains.eval_distribution   # q: the eval set's distribution over the same clusters

A manifest or shard set that cannot be used (a missing shard, sizes that do not add up, a short eval shard) is a
DataError that names it, at the start of a run rather than at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rbvl import manifest as manifest_file
from rbvl.data.shards import DataError, ShardError, count_samples


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
