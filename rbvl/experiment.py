"""`rbvl experiment EXPERIMENT.yaml`: a grid of training runs on one machine, and a report a reader can check.

    rbvl experiment experiments/digits.yaml                 # runs what is missing, then writes OUT/report.md
    rbvl experiment experiments/digits.yaml --report-only   # rebuild the report from OUT/results.jsonl

Cells are (domains: original | regrouped at k, strategy, seed). Manifests come first: `regrouped` by
`rbvl.regroup.regroup` at each k needed, `original` by grouping the same records by the source's own label
(`write_label_manifest`; no embedding). Each run is `rbvl.train.train(load_config(recipe, overrides))`; its line
in OUT/results.jsonl (resolved config, final eval losses, wall clock, the mixer's measured cost) is written when it
finishes, so an interrupted experiment resumes: finished cells are skipped, a cell with a checkpoint continues
from it. The report (rbvl/experiment_report.py) is written from results.jsonl alone.

EXPERIMENT.yaml (every key checked; see experiments/*.yaml):

    name: digits
    out: experiments/out/digits
    recipe: recipes/demo_tiny_rnb.yaml             # base recipe of every run (the cell sets mixing.strategy)
    overrides: [max_steps=300, data.num_workers=0]  # applied to every run
    seeds: [0, 1, 2]                                # every cell
    headline_seeds: [0, 1, 2, 3, 4]                 # the headline and baseline cells
    headline: regrouped/rnb
    baseline: regrouped/stratified
    strategy_overrides: {dga: [mixing.dga.update_every=10]}
    data:
      k: 4                                          # k of the `regrouped` cells
      regroup: {input: [demo/data/train.json], eval: [demo/data/eval.json], embedder: open_clip:rbvl-tiny}
    cells:                                          # default: the ablations of issue 12
      - {domains: original, strategy: stratified}
      - {domains: regrouped, strategy: rnb, overrides: [balance.lam=5], label: lam5}
    k_sweep: {ks: [2, 4, 8], strategy: rnb}
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from rbvl import manifest as manifest_file
from rbvl.config import ConfigError, from_dict

log = logging.getLogger(__name__)

DEFAULT_CELLS = [
    {"domains": "original", "strategy": "stratified"},
    {"domains": "regrouped", "strategy": "stratified"},
    {"domains": "original", "strategy": "rnb"},
    {"domains": "regrouped", "strategy": "rnb"},
    {"domains": "regrouped", "strategy": "natural"},
    {"domains": "regrouped", "strategy": "odm"},
    {"domains": "regrouped", "strategy": "dga"},
    {"domains": "regrouped", "strategy": "doremi"},
    {"domains": "regrouped", "strategy": "aioli"},
]


# ---------------------------------------------------------------------------------------------------------------------
# The experiment file
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CellSpec:
    domains: str = "regrouped"
    """`original` (the source's labels) or `regrouped` (clusters)."""
    strategy: str = "stratified"
    """Any `mixing.strategy`."""
    k: int = 0
    """For regrouped cells: the k (0 = `data.k`)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds of this cell (empty = the experiment's)."""
    overrides: list[str] = field(default_factory=list)
    """Recipe overrides for this cell only."""
    label: str = ""
    """Tells apart two cells with the same domains and strategy (e.g. an ablation of λ)."""

    def __post_init__(self):
        if self.domains not in ("original", "regrouped"):
            raise ConfigError(f"cells[].domains: '{self.domains}' is not original or regrouped")


@dataclass
class DataSpec:
    k: int = 4
    """k of the `regrouped` cells."""
    regroup: dict = field(default_factory=dict)
    """RegroupOptions (input, eval, image_root, embedder, ...) shared by every regrouping; `k` and `out` are set here."""
    original: str = ""
    """A ready original-domains manifest (default: written from the records' labels)."""
    regrouped: dict[str, str] = field(default_factory=dict)
    """Ready regrouped manifests by k (default: regrouped here)."""


@dataclass
class SweepSpec:
    ks: list[int] = field(default_factory=list)
    """k values to regroup at and train (empty = no sweep)."""
    strategy: str = "rnb"
    seeds: list[int] = field(default_factory=list)
    """Empty = the experiment's seeds."""


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    out: str = "experiments/out/experiment"
    """Report folder: report.md, results.jsonl, plots, runs/, shards/."""
    recipe: str = ""
    """Base recipe of every run."""
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    headline_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    headline: str = "regrouped/rnb"
    """domains/strategy of the headline comparison (run at headline_seeds)."""
    baseline: str = "regrouped/stratified"
    """domains/strategy every other cell is compared with, seed by seed."""
    strategy_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Overrides for every cell of a strategy (e.g. a peer's update interval)."""
    data: DataSpec = field(default_factory=DataSpec)
    cells: list[dict] = field(default_factory=lambda: [dict(c) for c in DEFAULT_CELLS])
    k_sweep: SweepSpec = field(default_factory=SweepSpec)
    notes: str = ""
    """Free text copied into the report (what the setting is, how long it takes)."""


def load_experiment(path: str | Path) -> tuple[ExperimentSpec, list[CellSpec]]:
    """Read and check EXPERIMENT.yaml; relative paths stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    spec = from_dict(ExperimentSpec, tree)
    cells = [from_dict(CellSpec, c, prefix=f"cells[{i}].") for i, c in enumerate(spec.cells)]
    if not spec.recipe:
        raise ConfigError(f"{path}: `recipe` (the base recipe of every run) is required")
    return spec, cells


@dataclass
class Cell:
    domains: str
    k: int | None
    strategy: str
    seed: int
    overrides: list[str]
    label: str = ""
    sweep: bool = False

    @property
    def group(self) -> str:
        """domains/strategy[+label]: the rows of the report's tables."""
        where = "original" if self.domains == "original" else f"regrouped-k{self.k}"
        return f"{where}/{self.strategy}" + (f"+{self.label}" if self.label else "")

    @property
    def id(self) -> str:
        return f"{self.group}/seed{self.seed}"

    @property
    def dirname(self) -> str:
        return self.id.replace("/", "_")


def expand(spec: ExperimentSpec, cells: list[CellSpec]) -> list[Cell]:
    """Every run of the grid, references before the DoReMi runs that need them."""
    out: dict[str, Cell] = {}
    key_of = {"headline": spec.headline, "baseline": spec.baseline}
    for c in cells:
        k = (c.k or spec.data.k) if c.domains == "regrouped" else None
        seeds = c.seeds or spec.seeds
        if f"{c.domains}/{c.strategy}" in key_of.values() and not c.label and not c.k:
            seeds = sorted(set(seeds) | set(spec.headline_seeds))
        for s in seeds:
            cell = Cell(c.domains, k, c.strategy, s, list(c.overrides), c.label)
            out.setdefault(cell.id, cell)
    for k in spec.k_sweep.ks:
        for s in spec.k_sweep.seeds or spec.seeds:
            cell = Cell("regrouped", k, spec.k_sweep.strategy, s, [], sweep=True)
            out.setdefault(cell.id, cell)
    for cell in list(out.values()):  # DoReMi's reference: stratified on the same domains and seed
        if cell.strategy == "doremi":
            ref = Cell(cell.domains, cell.k, "stratified", cell.seed, [])
            out.setdefault(ref.id, ref)
    order = {"stratified": 0, "doremi": 2}
    return sorted(out.values(), key=lambda c: (order.get(c.strategy, 1), c.domains, c.k or 0, c.seed, c.label))


# ---------------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes manifests written here and results."""
    return int(os.environ.get("RANK", "0"))


def _wait_for(path: Path, timeout_s: float = 3600.0) -> Path:
    """Ranks > 0 wait for rank 0's manifest (written last, so its presence means the shards are complete)."""
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise ConfigError(f"rank {_rank()}: gave up waiting {timeout_s:.0f} s for {path} from rank 0")
        time.sleep(2.0)
    return path


def regrouped_manifest(spec: ExperimentSpec, k: int, out: Path) -> Path:
    """The manifest of the records regrouped at k (reused when it is already there)."""
    given = spec.data.regrouped.get(str(k))
    if given:
        return Path(given)
    target = out / "shards" / f"k{k}"
    if (target / "manifest.json").exists():
        return target / "manifest.json"
    from rbvl.regroup import RegroupOptions, regroup

    opts = RegroupOptions(**{**spec.data.regroup, "k": str(k), "out": str(target), "overwrite": True})
    regroup(opts)
    return target / "manifest.json"


def original_manifest(spec: ExperimentSpec, out: Path) -> Path:
    if spec.data.original:
        return Path(spec.data.original)
    target = out / "shards" / "original"
    if not (target / "manifest.json").exists():
        if _rank() != 0:
            return _wait_for(target / "manifest.json")
        from rbvl.regroup import RegroupOptions

        write_label_manifest(RegroupOptions(**{**spec.data.regroup, "out": str(target), "overwrite": True}))
    return target / "manifest.json"


def write_label_manifest(opts) -> dict:
    """Shards + manifest with one domain per original label (the source's own grouping), in Regroup's format.

    Read, rejects and writing are Regroup's: one streaming pass into a spool (OUT/.cache), one `Rejects` collector,
    each split written in a seeded random order (`opts.seed`, recorded as the manifest's `shard_order`), the output
    staged and moved into place with the manifest last. Train records without a label, and eval records whose label
    no train record has, go to rejects.jsonl (`missing_field`), so the counts add up as in Regroup; so do eval ids
    also in train (`duplicate_id`, as Regroup does).
    """
    from rbvl.records import RecordSpool, Rejects, images
    from rbvl.regroup import outdir
    from rbvl.regroup.pipeline import read_options, read_split
    from rbvl.regroup.write import cluster_entry, write_shards

    final = Path(opts.out)
    out = outdir.prepare(final, opts.overwrite)  # a staging folder inside opts.out
    spool = RecordSpool(final / outdir.CACHE / "records.bin")
    rejects = Rejects()
    try:
        read_opts = read_options(opts)
        n_train, train_ids = read_split(opts.input, read_opts, spool, rejects, "train")
        n_rows_train = len(spool)
        n_eval = read_split(opts.eval, read_opts, spool, rejects, "eval", exclude=train_ids)[0] if opts.eval else 0
        del train_ids
        spool.finish()
        names = sorted({label for label in spool.labels[:n_rows_train] if label is not None})
        if len(names) < 2:
            raise ConfigError(
                f"{', '.join(opts.input)}: fewer than two original labels; no original domains to compare"
            )
        index = {n: i for i, n in enumerate(names)}
        kept: dict[str, list[int]] = {"train": [], "eval": []}  # spool rows
        for row, label in enumerate(spool.labels):
            split = "train" if row < n_rows_train else "eval"
            if label in index:
                kept[split].append(row)
            else:
                why = "no original label" if label is None else f"label {label!r} has no train records"
                rejects.add(split, spool[row], "missing_field", why)
        writers = {}
        for split, rows in kept.items():
            labels = np.array([index[spool.labels[r]] for r in rows], dtype=np.int64)
            writers[split] = write_shards(
                out, split, spool.rows(rows), labels, np.zeros(len(rows)), opts.maxcount, opts.seed, rejects, False
            )
    finally:
        spool.close()
    rejects.write(out / "rejects.jsonl")
    n_notes = images.write_notes(out, writers["train"].notes + writers["eval"].notes)
    clusters = [cluster_entry(c, name, writers["train"], writers["eval"]) for c, name in enumerate(names)]
    for entry in clusters:  # one label per domain: all of its records
        entry["top_labels"] = [[entry["name"], entry["n_train"]]]
    n_eval_kept = sum(c["n_eval"] for c in clusters)
    q = [c["n_eval"] / n_eval_kept for c in clusters] if n_eval_kept else []
    n_train_kept = sum(c["n_train"] for c in clusters)
    manifest = manifest_file.build(
        clusters,
        eval_distribution=q,
        grouping="original labels",
        embedder={"name": "none (grouped by the source's label)"},
        input={"train": list(opts.input), "eval": list(opts.eval)},
        sweep=[],
        train_distribution=[c["n_train"] / n_train_kept for c in clusters],
        counts={
            "train": {"in": n_train, "written": n_train_kept, "rejected": rejects.count("train")},
            "eval": {"in": n_eval, "written": n_eval_kept, "rejected": rejects.count("eval")},
        },
        seed=opts.seed,
        shard_order={"shuffled": True, "seed": opts.seed},
        rejects="rejects.jsonl",
        image_notes={"file": images.NOTES if n_notes else None, "count": n_notes},
    )
    outdir.commit(out, Path(opts.out), manifest)  # moved into place, manifest last
    return manifest


def silhouette_of(manifest_path: Path, k: int | None) -> float | None:
    if k is None:
        return None
    sweep = manifest_file.read(manifest_path).get("sweep") or []
    return next((s.get("silhouette") for s in sweep if s.get("k") == k), None)


# ---------------------------------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------------------------------


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d is not JSON (an interrupted write?): ignored, the cell runs again", path, n)
    return rows


def run_experiment(
    path: str | Path,
    out: str | None = None,
    report_only: bool = False,
    progress: bool = True,
    readme: str | None = None,
) -> Path:
    """Run every missing cell of the experiment at `path`, then write the report (and the README's results block
    for it, with `readme`); returns OUT/report.md."""
    from tqdm.auto import tqdm

    from rbvl.experiment_report import write_report

    spec, cell_specs = load_experiment(path)
    out_dir = Path(out or spec.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.yaml").write_text(Path(path).read_text())
    cells = expand(spec, cell_specs)
    done = {r["cell"] for r in read_results(out_dir)}
    todo = [c for c in cells if c.id not in done]
    if not report_only and todo:
        bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(todo),
            desc=f"experiment {spec.name}",
            unit="run",
            disable=not progress,
        )
        for cell in todo:
            bar.set_postfix_str(cell.id)
            row = run_cell(spec, cell, out_dir)
            if _rank() == 0:
                with (out_dir / "results.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
        bar.close()
    if _rank() != 0:
        return out_dir / "report.md"
    rows = read_results(out_dir)
    report = write_report(spec, cells, rows, out_dir, source=str(path))
    if readme:
        from rbvl.experiment_report import update_readme

        update_readme(Path(readme), out_dir)
    return report


def run_cell(spec: ExperimentSpec, cell: Cell, out: Path) -> dict:
    """Train one cell (continuing from its newest checkpoint when one is there); returns its results.jsonl row."""
    from rbvl import checkpoint as ckpt
    from rbvl.config import load_config, to_dict
    from rbvl.train import train

    manifest = original_manifest(spec, out) if cell.domains == "original" else regrouped_manifest(spec, cell.k, out)
    run_dir = out / "runs" / cell.dirname
    resume = run_dir.exists() and ckpt.latest(run_dir) is not None
    if run_dir.exists() and not resume and _rank() == 0:
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint (this tool wrote it)
    overrides = [
        *spec.overrides,
        *spec.strategy_overrides.get(cell.strategy, []),
        *cell.overrides,
        f"manifest={manifest}",
        f"output_dir={run_dir}",
        f"seed={cell.seed}",
        f"mixing.strategy={cell.strategy}",
        f"resume={'true' if resume else 'false'}",
    ]
    if cell.strategy == "doremi":
        reference = Cell(cell.domains, cell.k, "stratified", cell.seed, [])
        overrides.append(f"mixing.reference={out / 'runs' / reference.dirname}")
    cfg = load_config(spec.recipe, overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    ev = summary["eval"]
    return {
        "cell": cell.id,
        "group": cell.group,
        "domains": cell.domains,
        "k": cell.k,
        "strategy": cell.strategy,
        "label": cell.label,
        "seed": cell.seed,
        "sweep": cell.sweep,
        "run_dir": str(run_dir),
        "manifest": str(manifest),
        "domain_names": [c["name"] for c in manifest_file.read(manifest)["clusters"]],
        "silhouette": silhouette_of(manifest, cell.k),
        "eval_loss_q": ev["loss"],
        "eval_loss_all": token_weighted(ev),
        "eval": ev,
        "wall_s": wall,
        "resumed": resume,
        "cost": _plain(summary.get("cost")),
        "train_tokens": summary.get("train_tokens"),
        "train_flops": summary.get("train_flops"),
        "config": to_dict(cfg),
        "machine": machine(),
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine() -> dict:
    """Where a run ran, for the report and the README (its timings mean something only there)."""
    import platform

    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def token_weighted(ev: dict) -> float | None:
    """Loss over every eval token, whatever the grouping: Σ_d L_d·tokens_d / Σ_d tokens_d.

    The q-weighted loss depends on how the eval set is grouped, so it compares runs only within one grouping; this
    one is the same eval records scored the same way for original and regrouped domains.
    """
    tokens = ev.get("tokens_per_domain")
    if not tokens:
        return None
    pairs = [(x, t) for x, t in zip(ev["loss_per_domain"], tokens) if x is not None and t]
    total = sum(t for _, t in pairs)
    return sum(x * t for x, t in pairs) / total if total else None


def _plain(value):
    """JSON-safe copy (numpy and torch scalars become floats)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
