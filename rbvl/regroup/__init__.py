"""Regroup (the R of R&B): embed records, cluster them into semantic domains, write per-cluster shards + manifest.

    from rbvl.regroup import RegroupOptions, regroup
    regroup(RegroupOptions(input=["data/llava.json"], out="shards/", embedder="open_clip:rbvl-tiny", k="4,8"))

Modules: `embed` (embedders, DataLoader decoding, resumable memmap cache), `cluster` (k-means, silhouette sweep,
eval assignment), `write` (shards, rejects, manifest), `report` (summary.md, plots), `gallery` + `gallery_page`
(gallery/index.html, `rbvl gallery`), `pipeline` (end to end). The command line is `rbvl-regroup`
(data_tools/regroup.py); `rbvl bench regroup` (rbvl/bench/regroup.py) measures it.
"""

from rbvl.regroup.errors import RegroupError
from rbvl.regroup.options import RegroupOptions, load_options


def regroup(opts: RegroupOptions) -> dict:
    """Run Regroup end to end; returns the manifest (see `rbvl.regroup.pipeline.regroup`)."""
    from rbvl.regroup.pipeline import regroup as _regroup

    return _regroup(opts)


__all__ = ["RegroupError", "RegroupOptions", "load_options", "regroup"]
