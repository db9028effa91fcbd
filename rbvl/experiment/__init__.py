"""`rbvl experiment EXPERIMENT.yaml`: a grid of training runs on one machine, and a report a reader can check.

    rbvl experiment experiments/digits.yaml                       # runs what is missing, then writes OUT/report.md
    rbvl experiment experiments/digits.yaml --report-only         # rebuild the report from OUT/results.jsonl
    rbvl experiment experiments/digits.yaml --readme README.md    # ... and the README's results block for it
    rbvl experiment experiments/digits.yaml --out /tmp/digits     # another report folder than the file's `out`

or from Python: `run_experiment("experiments/digits.yaml")`. Cells are (domains: original | regrouped at k,
strategy, seed); an interrupted experiment resumes where it stopped (finished cells are skipped, a cell with a
checkpoint continues from it).

EXPERIMENT.yaml: every key is documented on the dataclass field it fills in `spec.py` (`ExperimentSpec`,
`DataSpec`, `CellSpec`, `SweepSpec`) and checked on load (an unknown key is named); experiments/*.yaml are worked
examples, each opening with the command that runs it.

Modules (imports point one way: spec ← report ← readme; run → spec, report, readme):
    spec     the YAML's typed spec, the grid of cells, results.jsonl
    run      each cell's domains (regrouped at k; original-label manifests), one training run per cell, resume
    report   summaries, paired differences with t intervals, report.md, summary.json, plots
    readme   the README's results blocks
"""

from rbvl.experiment.readme import blocks_in, readme_block, update_readme
from rbvl.experiment.report import METRIC, correlation, paired, summarise, summarise_experiment, write_report
from rbvl.experiment.run import (
    machine,
    original_manifest,
    regrouped_manifest,
    run_cell,
    run_experiment,
    token_weighted,
    write_label_manifest,
)
from rbvl.experiment.spec import (
    DEFAULT_CELLS,
    Cell,
    CellSpec,
    DataSpec,
    ExperimentSpec,
    SweepSpec,
    append_result,
    expand,
    load_experiment,
    read_results,
)

__all__ = [
    "DEFAULT_CELLS",
    "METRIC",
    "Cell",
    "CellSpec",
    "DataSpec",
    "ExperimentSpec",
    "SweepSpec",
    "append_result",
    "blocks_in",
    "correlation",
    "expand",
    "load_experiment",
    "machine",
    "original_manifest",
    "paired",
    "read_results",
    "readme_block",
    "regrouped_manifest",
    "run_cell",
    "run_experiment",
    "summarise",
    "summarise_experiment",
    "token_weighted",
    "update_readme",
    "write_label_manifest",
    "write_report",
]
