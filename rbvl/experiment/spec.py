"""EXPERIMENT.yaml as typed dataclasses, the grid of runs it describes, and results.jsonl (one line per finished run).

    spec, cell_specs = load_experiment("experiments/digits.yaml")   # every key checked; an unknown one is named
    grid = expand(spec, cell_specs)                                   # every run: Cell(domains, k, strategy, seed)
    rows = read_results(Path(spec.out))                               # the runs that finished

Each key of the file is documented once, on the field it fills: `ExperimentSpec` (the top level), `DataSpec`
(`data:`), `CellSpec` (each entry of `cells:`), `SweepSpec` (`k_sweep:`). experiments/*.yaml are worked examples.
Relative paths stay relative to the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rbvl.config import ConfigError, from_dict

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"

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
    """The `mixing.strategy` trained at each k."""
    seeds: list[int] = field(default_factory=list)
    """Empty = the experiment's seeds."""


@dataclass
class OracleSpec:
    """`oracle:` the best static mixture at the same budget (rbvl/experiment/oracle.py)."""

    domains: str = ""
    """`original` or `regrouped`: the domains whose best static mixture is searched (empty = no oracle)."""
    search_seeds: list[int] = field(default_factory=lambda: [100])
    """Seeds of the search runs, apart from the reported seeds so that the winner is scored on fresh seeds."""
    candidates: int = 12
    """Dirichlet(1) draws of the first round (above `grid_max_m` domains), beside the uniform point."""
    refine: int = 6
    """Draws around the best candidate of the first round."""
    concentration: float = 30.0
    """Dirichlet concentration of the refinement (higher = closer to the best)."""
    grid_step: float = 0.25
    """Grid step of the simplex when there are at most `grid_max_m` domains."""
    grid_max_m: int = 4
    """Up to this many domains the first round is the full grid (no refinement)."""
    seed: int = 0
    """Seed of the draws."""
    natural: bool = True
    """Also try the natural mixture (each domain's share of the train rows, what not mixing gives), scored last."""


@dataclass
class ControlSpec:
    """`control:` p on a planted domain here against the same cells run on clean data (rbvl/experiment/mixture.py)."""

    out: str = ""
    """The control experiment's folder (its results.jsonl): the same cells on the rows with the defect removed."""
    domain: str = ""
    """The planted domain whose p is compared (e.g. `noise`); its p is tabled for every cell even without `out`."""


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    """Names the experiment in the report's title and the README block."""
    role: str = ""
    """`development` (defaults may be chosen on it) or `held-out` (run untouched); said in the report and README."""
    out: str = "experiments/out/experiment"
    """Report folder: report.md, results.jsonl, plots, runs/, shards/ (`--out` replaces it)."""
    recipe: str = ""
    """Base recipe of every run (required; each cell sets `mixing.strategy`)."""
    overrides: list[str] = field(default_factory=list)
    """Recipe overrides (`key=value`) applied to every run, e.g. `max_steps=300`."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of every cell."""
    headline_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Seeds of the headline and baseline cells (added to `seeds`)."""
    headline: str = "regrouped/rnb"
    """domains/strategy of the headline comparison (run at headline_seeds)."""
    baseline: str = "regrouped/stratified"
    """domains/strategy every other cell is compared with, seed by seed."""
    strategy_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Overrides for every cell of a strategy (e.g. a peer's update interval): `{dga: [mixing.dga.update_every=10]}`."""
    data: DataSpec = field(default_factory=DataSpec)
    """Where each cell's domains come from (see `DataSpec`)."""
    cells: list[dict] = field(default_factory=lambda: [dict(c) for c in DEFAULT_CELLS])
    """The cells (see `CellSpec`); default: R&B, its ablations and the peers (`DEFAULT_CELLS`)."""
    k_sweep: SweepSpec = field(default_factory=SweepSpec)
    """One strategy trained at several k (see `SweepSpec`): does loss follow the clusters' silhouette?"""
    oracle: OracleSpec = field(default_factory=OracleSpec)
    """The oracle: the best static mixture, searched on its own seeds and reported at `headline_seeds`, and the
    headroom it leaves stratified (see `OracleSpec`)."""
    control: ControlSpec = field(default_factory=ControlSpec)
    """A clean control for a planted domain (see `ControlSpec`)."""
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
    data = tree.get("data") if isinstance(tree, dict) else None
    if isinstance(data, dict) and isinstance(data.get("regrouped"), dict):  # `4: path` as YAML reads it: an int key
        data["regrouped"] = {str(k): v for k, v in data["regrouped"].items()}
    spec = from_dict(ExperimentSpec, tree)
    cells = [from_dict(CellSpec, c, prefix=f"cells[{i}].") for i, c in enumerate(spec.cells)]
    if spec.oracle.domains not in ("", "original", "regrouped"):
        raise ConfigError(f"{path}: oracle.domains: '{spec.oracle.domains}' is not original or regrouped")
    if spec.role not in ("", "development", "held-out"):
        raise ConfigError(f"{path}: role: '{spec.role}' is not development or held-out")
    if not spec.recipe:
        raise ConfigError(f"{path}: `recipe` (the base recipe of every run) is required")
    return spec, cells


# ---------------------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run of the grid."""

    domains: str
    """`original` or `regrouped`."""
    k: int | None
    """The regrouping's k (None for original domains)."""
    strategy: str
    seed: int
    overrides: list[str]
    label: str = ""
    sweep: bool = False
    """Added by the k sweep."""

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


def plan(spec: ExperimentSpec, cells: list[Cell], done: set[str]) -> str:
    """What `rbvl experiment` will run, said before it starts: groups × seeds = runs, and where the extra seeds
    come from (the headline and baseline run at `headline_seeds` too; DoReMi needs its stratified reference)."""
    groups: dict[str, list[int]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell.seed)
    lines = [f"experiment {spec.name}: {len(groups)} groups, {len(cells)} runs ({len(cells) - len(done)} to run, "
             f"{len(done)} already in results.jsonl)"]  # fmt: skip
    key_groups = {spec.headline, spec.baseline}
    sweep = {c.group for c in cells if c.sweep}
    asked = {f"{c.domains}/{c.strategy}" for c in cells if not c.sweep}
    for group, seeds in groups.items():
        plain = group.replace(f"-k{spec.data.k}", "") if spec.data.k else group
        why = []
        if plain in key_groups and set(seeds) - set(spec.seeds):
            why.append("headline/baseline: + headline_seeds")
        if group in sweep:
            why.append("k_sweep")
        if plain.endswith("/stratified") and plain.replace("/stratified", "/doremi") in asked:
            why.append("also DoReMi's reference")
        note = f"  ({'; '.join(why)})" if why else ""
        lines.append(f"  {group:36s} seeds {','.join(map(str, seeds))}{note}")
    o = spec.oracle
    if o.domains:
        search = (1 + o.candidates + o.refine) * len(o.search_seeds)
        lines.append(f"  oracle on {o.domains} domains: a search of static mixtures at seeds "
                     f"{','.join(map(str, o.search_seeds))} (the simplex grid up to {o.grid_max_m} domains; above, "
                     f"1 + {o.candidates} draws + {o.refine} refinements = {search} runs), then the best at seeds "
                     f"{','.join(map(str, spec.headline_seeds))} ({len(spec.headline_seeds)} runs); not counted above")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# results.jsonl
# ---------------------------------------------------------------------------------------------------------------------


def read_results(out: Path) -> list[dict]:
    """The finished runs in OUT/results.jsonl (none when it is not there); a line that is not JSON is skipped."""
    path = Path(out) / RESULTS
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


def drop_results(out: Path, cell_id: str) -> None:
    """Remove cell `cell_id`'s lines from OUT/results.jsonl (rewritten beside it, then moved into place)."""
    path = Path(out) / RESULTS
    keep = [line for line in path.read_text().splitlines() if line.strip() and _cell_of(line) != cell_id]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _cell_of(line: str) -> str | None:
    try:
        return json.loads(line).get("cell")
    except json.JSONDecodeError:
        return None


def append_result(out: Path, row: dict) -> None:
    """Add one finished run's line to OUT/results.jsonl (written when the run ends, so a resume skips it)."""
    with (Path(out) / RESULTS).open("a") as f:
        f.write(json.dumps(row) + "\n")
