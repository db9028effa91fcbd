"""Running the grid: each cell's domains, one `rbvl.train.train` per cell, its results.jsonl line, then the report.

    run_experiment("experiments/digits.yaml")                     # runs what is missing, then writes OUT/report.md
    run_experiment("experiments/digits.yaml", report_only=True)   # the report from OUT/results.jsonl alone

Manifests come first: `regrouped` by `rbvl.regroup.regroup` at each k needed, `original` by grouping the same
records by the source's own label (`write_label_manifest`; no embedding). Each run is
`rbvl.train.train(load_config(recipe, overrides))`; its line in OUT/results.jsonl (resolved config, final eval
losses, wall clock, the mixer's measured cost) is written when it finishes, so an interrupted experiment resumes:
finished cells are skipped, a cell with a checkpoint continues from it. Under torchrun only rank 0 writes manifests
and results.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rbvl import manifest as manifest_file
from rbvl.config import ConfigError, load_config, to_dict
from rbvl.experiment.oracle import ORACLE, SEARCH, search, weights_override
from rbvl.experiment.readme import check_readme, update_readme
from rbvl.experiment.report import METRIC, write_report
from rbvl.experiment.spec import (
    Cell,
    ExperimentSpec,
    append_result,
    drop_results,
    expand,
    load_experiment,
    plan,
    read_results,
)
from rbvl.records import RecordSpool, Rejects, images
from rbvl.regroup import RegroupOptions, outdir, regroup
from rbvl.regroup.write import cluster_entry, write_shards

# ---------------------------------------------------------------------------------------------------------------------
# Each cell's domains
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
    opts = RegroupOptions(**{**spec.data.regroup, "k": str(k), "out": str(target), "overwrite": True})
    regroup(opts)
    return target / "manifest.json"


def original_manifest(spec: ExperimentSpec, out: Path) -> Path:
    """The manifest of the records grouped by their original label (written once; other ranks wait for it)."""
    if spec.data.original:
        return Path(spec.data.original)
    target = out / "shards" / "original"
    if not (target / "manifest.json").exists():
        if _rank() != 0:
            return _wait_for(target / "manifest.json")
        write_label_manifest(RegroupOptions(**{**spec.data.regroup, "out": str(target), "overwrite": True}))
    return target / "manifest.json"


def write_label_manifest(opts: RegroupOptions) -> dict:
    """Shards + manifest with one domain per original label (the source's own grouping), in Regroup's format.

    Read, rejects and writing are Regroup's: one streaming pass into a spool (OUT/.cache), one `Rejects` collector,
    each split written in a seeded random order (`opts.seed`, recorded as the manifest's `shard_order`), the output
    staged and moved into place with the manifest last. Train records without a label, and eval records whose label
    no train record has, go to rejects.jsonl (`missing_field`), so the counts add up as in Regroup; so do eval ids
    also in train (`duplicate_id`, as Regroup does).
    """
    from rbvl.regroup.pipeline import read_options, read_split  # embedders, k-means: torch, sklearn

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
    """The silhouette Regroup measured at k (None for original domains or a manifest without it)."""
    if k is None:
        return None
    sweep = manifest_file.read(manifest_path).get("sweep") or []
    return next((s.get("silhouette") for s in sweep if s.get("k") == k), None)


# ---------------------------------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------------------------------


def run_experiment(
    path: str | Path,
    out: str | None = None,
    report_only: bool = False,
    progress: bool = True,
    readme: str | None = None,
    dry_run: bool = False,
) -> Path:
    """Run every missing cell of the experiment at `path`, then write the report (and the README's results block
    for it, with `readme`); returns OUT/report.md. The plan (groups, seeds, runs) is printed first; `dry_run` stops
    there."""
    spec, cell_specs = load_experiment(path)
    out_dir = Path(out or spec.out)
    cells = expand(spec, cell_specs)
    if not report_only:  # a typo in the 20th cell fails now, with --plan too, not after 19 runs
        check_cells(spec, cells)
    done = {r["cell"] for r in read_results(out_dir)}
    todo = [c for c in cells if c.id not in done]
    if _rank() == 0 and not report_only:
        print(plan(spec, cells, done & {c.id for c in cells}), file=sys.stderr)
    if dry_run:
        return out_dir / "report.md"
    if readme:
        check_readme(Path(readme), out_dir)  # before any run: a README without the block fails now, not hours later
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.yaml").write_text(Path(path).read_text())
    if not report_only and todo:
        bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(todo),
            desc=f"experiment {spec.name}",
            unit="run",
            disable=not progress,
        )
        with bar:  # closed (its line ended) before an error is printed, so the error is a line of its own in a log
            for n, cell in enumerate(todo):
                bar.set_postfix_str(cell.id)
                row = run_cell(spec, cell, out_dir)
                if _rank() == 0:
                    append_result(out_dir, row)
                    if n == 0 and len(todo) > 1:  # the first run prices the rest
                        eta = row["wall_s"] * (len(todo) - 1)
                        bar.write(f"first run took {row['wall_s']:.0f} s: about {eta / 60:.0f} min for the other {len(todo) - 1}")  # fmt: skip
                bar.update(1)
    if spec.oracle.domains and not report_only:
        run_oracle(spec, out_dir)
    if _rank() != 0:
        return out_dir / "report.md"
    rows = read_results(out_dir)
    report = write_report(spec, cells, rows, out_dir, source=str(path))
    if readme:
        update_readme(Path(readme), out_dir)
    return report


def run_oracle(spec: ExperimentSpec, out: Path) -> list[float]:
    """The oracle (rbvl/experiment/oracle.py): static `manual` runs that search the simplex at `oracle.search_seeds`,
    then the best mixture at `headline_seeds`. Each run is a results.jsonl row like any cell's, so an interrupted
    search resumes where it stopped. Returns the best mixture."""
    o = spec.oracle
    k = spec.data.k if o.domains == "regrouped" else None
    manifest = original_manifest(spec, out) if o.domains == "original" else regrouped_manifest(spec, k, out)
    clusters = manifest_file.read(manifest)["clusters"]
    names = [c["name"] for c in clusters]
    natural = [c["n_train"] for c in clusters] if o.natural else None
    rows = {r["cell"]: r for r in read_results(out)}

    def train(label: str, p, seed: int) -> float:
        cell = Cell(o.domains, k, "manual", seed, [weights_override(names, p)], label)
        if label == ORACLE and cell.id in rows and not _same_weights(rows[cell.id], names, p):
            # the search has a new winner since these ran (a candidate was added to it): they are redone with it
            if _rank() == 0:
                drop_results(out, cell.id)
                shutil.rmtree(out / "runs" / cell.dirname, ignore_errors=True)
            del rows[cell.id]
        if cell.id not in rows:
            rows[cell.id] = run_cell(spec, cell, out)
            if _rank() == 0:
                append_result(out, rows[cell.id])
        return rows[cell.id][METRIC]

    def score(j: int, p) -> float:
        return float(np.mean([train(f"{SEARCH}{j}", p, s) for s in o.search_seeds]))

    best, tried = search(names, o, score, natural)
    for seed in spec.headline_seeds:
        train(ORACLE, best, seed)
    if _rank() == 0:
        print(f"oracle: best of {len(tried)} static mixtures: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, best)),
              file=sys.stderr)  # fmt: skip
    return best.tolist()


def _same_weights(row: dict, names: list[str], p) -> bool:
    """Whether a finished oracle run trained mixture p (its weights as `weights_override` wrote them)."""
    ran = (row.get("config") or {}).get("mixing", {}).get("weights") or {}
    return all(abs(float(ran.get(n, 0.0)) - float(f"{w:.4f}")) < 1e-6 for n, w in zip(names, p))


def check_cells(spec: ExperimentSpec, cells: list[Cell]) -> None:
    """Every cell's run config, resolved as `run_cell` will (the manifest and run folder stand in): a ConfigError
    naming the cell for a strategy or override the recipe does not take."""
    seen = set()
    for cell in cells:
        extra = [*spec.strategy_overrides.get(cell.strategy, []), *cell.overrides]
        key = (cell.strategy, tuple(extra))
        if key in seen:
            continue
        seen.add(key)
        overrides = [*spec.overrides, *extra, f"seed={cell.seed}", f"mixing.strategy={cell.strategy}"]
        if cell.strategy == "doremi":
            overrides.append("mixing.reference=the-stratified-cell")
        try:
            load_config(spec.recipe, overrides)
        except ConfigError as e:
            raise ConfigError(f"cell {cell.group}: {e}") from None


def run_cell(spec: ExperimentSpec, cell: Cell, out: Path) -> dict:
    """Train one cell (continuing from its newest checkpoint when one is there); returns its results.jsonl row."""
    from rbvl.train import checkpoint as ckpt  # torch, transformers: only when a cell runs
    from rbvl.train import train
    from rbvl.train.metrics import mixture_summary

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
        "mixture": mixture_summary(run_dir),
        "train_tokens": summary.get("train_tokens"),
        "train_flops": summary.get("train_flops"),
        "config": to_dict(cfg),
        "base": base_info(cfg.model.name),
        "machine": machine(),
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def base_info(name: str) -> dict | None:
    """What a pretrained base was trained on (BASE/base.json, written by `python -m data_tools.base BASE` beside its
    BASE/model folder), so that a report states its regime from results.jsonl alone; None for any other model."""
    info = Path(name).parent / "base.json"
    if not Path(name).is_dir() or not info.is_file():
        return None
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return None


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
