"""Regroup end to end: read → embed → cluster (k by silhouette) → assign eval → write shards, report, manifest.

    from rbvl.regroup import RegroupOptions, regroup
    manifest = regroup(RegroupOptions(input=["data/llava.json"], image_root="data/images", out="shards/",
                                      embedder="open_clip:rbvl-tiny", k="4,8"))

Every record that enters leaves in exactly one shard or in rejects.jsonl with its reason; the manifest's counts
say so (in = written + rejected, train and eval separately). Records are read in one streaming pass into a spool on
disk (OUT/.cache/records*.bin, removed at the end); one `Rejects` collector gathers the rejects of every stage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

from rbvl import manifest as manifest_file
from rbvl.records import ReadOptions, RecordSpool, Reject, Rejects, images, read_records
from rbvl.records.readers import expand_inputs, file_tags
from rbvl.regroup import cluster as C
from rbvl.regroup import gallery, outdir, report
from rbvl.regroup.embed import check_embedder_name, embed_records, load_embedder
from rbvl.regroup.errors import RegroupError
from rbvl.regroup.options import RegroupOptions
from rbvl.regroup.write import cluster_entry, cluster_name, save_centroids, write_shards
from rbvl.runtime import fsfault


def read_options(opts: RegroupOptions) -> ReadOptions:
    return ReadOptions(
        format=opts.format,
        image_root=opts.image_root,
        preset=opts.preset,
        text_fields=opts.text_fields,
        label_field=opts.label_field,
        with_trajectory=opts.with_trajectory,
        allow_outside_root=opts.allow_outside_root,
        conversation_field=opts.conversation_field,
        image_field=opts.image_field,
        id_field=opts.id_field,
        prompt_field=opts.prompt_field,
        response_field=opts.response_field,
        announce=lambda line: print(f"rbvl-regroup: reading {line}"),
    )


def read_split(
    paths: list[str],
    opts: ReadOptions,
    spool: RecordSpool,
    rejects: Rejects,
    split: str,
    exclude: set | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[int, set[str]]:
    """Append one split's records to `spool` and its rejects to `rejects`, in one streaming pass.

    Records whose id is in `exclude` (eval ids also in train) are rejected as duplicates. `tags`: the names rows
    without an id take from their file (`file_tags` over every split's files, so that no two splits make the same).
    Returns (items that came in, ids of the records kept).
    """
    n_in, ids, textless = 0, set(), 0
    for item in read_records(paths, opts, tags):
        n_in += 1
        if isinstance(item, Reject):
            rejects.add(split, item)
        elif exclude is not None and item.id in exclude:
            rejects.add(split, item, "duplicate_id", "id also in the train set")
        else:
            spool.append(item)
            ids.add(item.id)
            textless += not item.text
    if opts.text_fields and textless:  # named columns (a typo, or the wrong ones) would embed as empty text
        fields = ",".join(opts.text_fields)
        if textless == len(ids):
            raise RegroupError(
                f"--text-fields {fields}: no {split} record has text in {'it' if len(opts.text_fields) == 1 else 'them'}"
                f" (in {', '.join(map(str, paths))}): name the columns that hold the text to embed"
            )
        _warn(
            f"--text-fields {fields}: {textless} of {len(ids)} {split} records have no text there; they embed as empty text"
        )
    return n_in, ids


def regroup(opts: RegroupOptions) -> dict:
    """Run Regroup with `opts` and return the manifest (also written to OUT/manifest.json, last).

    On any failure the staging folder is removed and a previous output in OUT stays as it was.

    Raises:
        RegroupError: bad options, no usable records, k larger than N (or than the distinct embeddings), an existing
            output without overwrite.
        RecordsError: fatal input problems found by the reader.
        OSError: a file-system fault (full disk, read-only, permissions); its file name says where.
    """
    opts.validate()
    ks = C.parse_k(opts.k)
    check_embedder_name(opts.embedder)  # a typo fails before any reading
    # every input found (a missing one fails before the output folder is made); rows without ids are named per file
    tags = file_tags(f for f, _ in expand_inputs([*opts.input, *(opts.eval or [])], opts.format))
    rank, world = _distributed()
    final = Path(opts.out)  # outputs are staged in `out` and moved here at the end; the embedding cache lives here
    out = outdir.prepare(final, opts.overwrite) if rank == 0 else outdir.staging_path(final)
    _barrier(world)
    try:
        with fsfault.writing(out):  # a write that fails without naming its file names the staging folder
            return _regroup(opts, ks, final, out, rank, world, tags)
    except BaseException:  # an error, a full disk, Ctrl-C: no partial output is left, the previous one stands
        if rank == 0:
            outdir.abandon(out, final)
        raise


def _regroup(
    opts: RegroupOptions, ks: list[int], final: Path, out: Path, rank: int, world: int, tags: dict[str, str]
) -> dict:
    """The stages of `regroup`, writing into the staging folder `out` and committing it to `final` at the end."""
    timings: dict[str, float] = {}

    # ---- read (one streaming pass per split into a spool on disk: train rows, then eval rows)
    t0 = time.perf_counter()
    spool = RecordSpool(final / outdir.CACHE / (f"records-{rank}.bin" if world > 1 else "records.bin"))
    rejects = Rejects()
    read_opts = read_options(opts)
    n_in_train, train_ids = read_split(opts.input, read_opts, spool, rejects, "train", tags=tags)
    n_train = len(spool)
    n_in_eval = 0
    if opts.eval:
        n_in_eval = read_split(opts.eval, read_opts, spool, rejects, "eval", exclude=train_ids, tags=tags)[0]
    everything = spool.finish()
    del train_ids
    _warn_outside_root(rejects, opts)
    if not n_train or max(ks) > n_train:
        everything.close()
    if not n_train or max(ks) > n_train:
        why = report.rejected(rejects, "train", n_in_train, opts.image_root)
        hints = "".join(f"; {h}" for h in why.hints)
        if not n_train:
            raise RegroupError(f"no usable train records in {', '.join(opts.input)} ({why.headline()}){hints}")
        raise RegroupError(
            f"k={max(ks)} is larger than the number of usable train records ({n_train}; {why.headline()}); "
            f"use {C.k_that_fits(ks, n_train)}{hints}"
        )
    timings["read_s"] = time.perf_counter() - t0

    # ---- embed (train rows, then eval rows, one cache)
    t0 = time.perf_counter()
    with _quiet_loading(not opts.progress):  # --no-progress: no loading bars of transformers either
        embedder = load_embedder(opts.embedder, opts.combine, opts.seed, opts.device)
    embed = dict(
        embedder=embedder,
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        chunk_size=opts.chunk_size,
        resume=opts.resume,
        key_extra=f"seed={opts.seed}",
    )
    if world == 1:
        emb, errors, embed_stats = embed_records(
            everything, cache_dir=final / ".cache", progress=opts.progress, **embed
        )
    else:
        emb, errors, embed_stats = _embed_across_ranks(everything, final, rank, world, opts.progress, embed)
        if rank != 0:  # rank 0 clusters and writes; the others are done
            everything.close()
            _barrier(world)
            return {}
    timings["embed_s"] = time.perf_counter() - t0
    train_rows, eval_rows = _embedded_rows(everything, errors, n_train, rejects)
    train, evals = everything.rows(train_rows), everything.rows(eval_rows)
    if not len(train):
        everything.close()
        raise RegroupError("no usable train records: every image failed to decode")

    # ---- cluster train, assign eval
    t0 = time.perf_counter()
    x_train = np.asarray(emb[train_rows], dtype=np.float32)  # (N, d)
    x_eval = np.asarray(emb[eval_rows], dtype=np.float32)  # (N_eval, d)
    cl = C.cluster(x_train, ks, opts.seed, opts.minibatch_above, opts.silhouette_sample, opts.progress)
    _warn(C.sweep_edge(cl.sweep, cl.k))  # the best k at an end of the sweep: widen it
    eval_labels, eval_dist = C.assign(x_eval, cl.centroids) if len(evals) else (np.zeros(0, int), np.zeros(0))
    train_labels_src = [everything.labels[i] for i in train_rows]
    labels = C.label_metrics(x_train, cl.labels, train_labels_src, opts.seed, opts.silhouette_sample)
    if opts.label_field and not labels:  # asked for by name: say why the comparison is missing
        found = len({lab for lab in train_labels_src if lab is not None})
        _warn(
            f"--label-field {opts.label_field}: {'no training row has it' if not found else 'one value only'}, so the "
            f"clusters are not compared with the source's labels (NMI)"
        )
    timings["cluster_s"] = time.perf_counter() - t0

    # ---- write shards (each cluster in a seeded random order), rejects, centroids
    t0 = time.perf_counter()
    w_train = write_shards(
        out, "train", train, cl.labels, cl.distances, opts.maxcount, opts.seed, rejects, opts.progress
    )
    w_eval = write_shards(out, "eval", evals, eval_labels, eval_dist, opts.maxcount, opts.seed, rejects, opts.progress)
    rejects.write(out / "rejects.jsonl")
    n_notes = images.write_notes(out, w_train.notes + w_eval.notes)  # images re-encoded, rescaled or cut to a frame
    centroids = save_centroids(out, cl.centroids)
    timings["write_s"] = time.perf_counter() - t0

    # ---- manifest (last)
    tops = C.top_labels(cl.labels, train_labels_src, cl.k)
    examples = report.examples_per_cluster(train, cl.labels, cl.distances, cl.k)
    clusters = [
        cluster_entry(c, cluster_name(c), w_train, w_eval, top_labels=tops[c], examples=examples[c])
        for c in range(cl.k)
    ]
    counts = _counts(clusters, n_in_train, n_in_eval, rejects)
    manifest = manifest_file.build(
        clusters,
        eval_distribution=C.distribution(eval_labels, cl.k),
        created=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        embedder=embedder.manifest_entry(),
        input={
            "train": list(opts.input),
            "eval": list(opts.eval),
            "format": _input_format(train, opts),
            "max_images": max(w_train.max_images, w_eval.max_images),  # per sample; > 1: multi-image samples
        },
        sweep=cl.sweep,
        centroids=centroids,
        train_distribution=C.distribution(cl.labels, cl.k),
        labels=labels,
        counts=counts,
        seed=opts.seed,
        shard_order={"shuffled": True, "seed": opts.seed},
        clustering={
            "algorithm": "MiniBatchKMeans" if len(train) > opts.minibatch_above else "KMeans",
            "metric": "euclidean on L2-normalised embeddings",
        },
        rejects="rejects.jsonl",
        image_notes={"file": images.NOTES if n_notes else None, "count": n_notes},
    )
    why = [
        report.rejected(rejects, split, n, opts.image_root) for split, n in (("train", n_in_train), ("eval", n_in_eval))
    ]
    report.write_summary(out, manifest, x_train, cl.labels, train_labels_src, plots=opts.plots, rejects=why)
    everything.close()
    outdir.commit(out, final, manifest)  # the old output out (only with --overwrite), the new one in, manifest last
    report.print_summary(manifest, {**timings, **embed_stats}, final, rejects=why)
    gallery.after_regroup(final, manifest, w_train.ids, x_train, opts.gallery, opts.plots)  # OUT/gallery/
    _barrier(world)
    return manifest


def _embedded_rows(records, errors: dict[int, str], n_train: int, rejects: Rejects) -> tuple[np.ndarray, np.ndarray]:
    """The train and eval rows that embedded; a row whose image failed to decode (or has a sliver's aspect ratio)
    goes to the rejects."""
    ok = np.ones(len(records), dtype=bool)
    for row, err in sorted(errors.items()):
        ok[row] = False
        reason, detail = images.untagged(err)
        path = getattr(records[row], "image_path", None)  # an image read from disk: which file
        detail = f"{path}: {detail}" if path and reason == "unreadable_image" and path not in detail else detail
        rejects.add("train" if row < n_train else "eval", records[row], reason, detail)
    return np.flatnonzero(ok[:n_train]), n_train + np.flatnonzero(ok[n_train:])


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    """transformers' progress bars (a sentence-transformers model's 'Loading weights') off while `quiet`."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _warn(line: str | None) -> None:
    if line:
        print(f"rbvl-regroup: warning: {line}", file=sys.stderr)


def _warn_outside_root(rejects: Rejects, opts: RegroupOptions) -> None:
    """One warning when image paths pointed outside the image root (a dataset with absolute paths rejects them all)."""
    n = sum(rejects.by_reason(split).get("image_outside_root", 0) for split in ("train", "eval"))
    if n:
        root = opts.image_root or "each input file's folder"
        print(
            f"rbvl-regroup: warning: {n} record{'s' if n != 1 else ''} rejected as image_outside_root: their image paths resolve outside "
            f"the image root ({root}); set --image-root to the folder that holds them, or pass --allow-outside-root",
            file=sys.stderr,
        )


def _counts(clusters: list[dict], n_in_train: int, n_in_eval: int, rejects: Rejects) -> dict:
    """Records in, written and rejected per split; they must add up. Warns when the eval set came out empty."""
    n_written_train = sum(c["n_train"] for c in clusters)
    n_written_eval = sum(c["n_eval"] for c in clusters)
    counts = {
        "train": {"in": n_in_train, "written": n_written_train, "rejected": rejects.count("train")},
        "eval": {"in": n_in_eval, "written": n_written_eval, "rejected": rejects.count("eval")},
    }
    for split, cnt in counts.items():
        if cnt["in"] != cnt["written"] + cnt["rejected"]:  # a bug, not a user error: say it loudly
            raise AssertionError(f"{split} counts do not add up: {cnt}")
    if n_written_eval == 0:  # Balance then targets a uniform q, and training has no eval loss to report
        why = f"all {n_in_eval} eval records were rejected" if n_in_eval else "no --eval input was given"
        print(
            f"rbvl-regroup: warning: the eval set is empty ({why}): Balance will target uniform proportions and "
            "`rbvl train` will report no eval loss",
            file=sys.stderr,
        )
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Embedding across the processes of torchrun
# ---------------------------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun (a gloo group is started if none is), else (0, 1)."""
    from rbvl.runtime.distributed import Distributed

    dist = Distributed.from_env(device="cpu")
    return dist.rank, dist.world_size


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def close_distributed() -> None:
    """Barrier, free, then destroy the process group (see rbvl.runtime.distributed.close)."""
    from rbvl.runtime.distributed import close

    close()


def _embed_across_ranks(records: list, out: Path, rank: int, world: int, progress: bool, embed: dict):
    """Each rank embeds a contiguous share of the rows into its own cache part; rank 0 then reads every part.

    The parts are ordinary resumable caches, so rank 0 reading them re-embeds nothing, and an interrupted
    multi-process run resumes part by part.
    """
    bounds = np.linspace(0, len(records), world + 1).astype(int)
    parts = [(bounds[r], bounds[r + 1], out / ".cache" / f"part-{r:03d}-of-{world:03d}") for r in range(world)]
    lo, hi, cache = parts[rank]
    _, _, mine = embed_records(records[lo:hi], cache_dir=cache, progress=progress and rank == 0, **embed)
    counts = {"embedded": mine["embedded"], "reused": mine["reused"]}
    Path(f"{cache}.counts.json").write_text(json.dumps(counts))  # what this rank did, for rank 0's summary
    _barrier(world)
    if rank != 0:
        return None, None, mine
    pieces, errors = [], {}
    stats = {"embedded": 0, "reused": 0, "ranks": world}  # every rank's share, summed
    for lo, hi, cache in parts:
        emb, errs, _ = embed_records(records[lo:hi], cache_dir=cache, progress=False, **embed)
        pieces.append(np.asarray(emb))
        errors.update({lo + row: msg for row, msg in errs.items()})
        for key, n in json.loads(Path(f"{cache}.counts.json").read_text()).items():
            stats[key] += n
    return np.concatenate(pieces), errors, stats


def _input_format(records, opts: RegroupOptions) -> str | None:
    if opts.format:
        return opts.format
    meta = getattr(records[0], "meta", None) or {}
    fmt = meta.get("format")
    if fmt:
        return fmt
    suffix = Path(opts.input[0]).suffix.lower()
    return {".json": "llava", ".tar": "webdataset", ".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix)
