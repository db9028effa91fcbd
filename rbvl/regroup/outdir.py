"""The output folder of Regroup: written into a fresh staging folder, moved into place at the end, manifest last.

    staging = prepare(Path("shards"), overwrite=False)   # checks OUT, locks it, makes OUT/.staging (fresh)
    ...                                                   # shards, rejects, summary, plots → staging
    commit(staging, Path("shards"), manifest)             # old output out (if --overwrite), new in, manifest last

Rules (docs/formats.md, "Output folders"): OUT is a new folder, an empty one, or a previous regroup output
(recognised by its manifest.json). Regroup never deletes what it did not write: `--overwrite` removes exactly the
files the previous manifest lists under `files` (older manifests: its shards and the fixed report names), and a
folder holding anything else is refused, naming what it found. OUT/.cache (the resumable embedding cache) is kept;
OUT/gallery/ (written after the manifest, so a crash can leave it beside none) is regroup's too and is replaced at
the end of the run.
One regroup at a time per OUT (`rbvl.runtime.runlock`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from rbvl import manifest as manifest_file
from rbvl.regroup.errors import RegroupError
from rbvl.runtime import fsfault, runlock

MANIFEST = manifest_file.FILENAME

STAGING = ".staging"
PREVIOUS = ".previous"  # the previous output's files while a commit moves the new ones in
MARK = ".rbvl-staging"  # inside the staging folder: it is ours to remove
CACHE = ".cache"
# What an older manifest (without `files`) wrote besides its shards.
KNOWN = ("rejects.jsonl", "centroids.npy", "summary.md", "sweep.png", "cluster_sizes.png", "projection.png")
GALLERY = (
    "gallery",
    "gallery.tmp",
    "gallery.old",
)  # written after the manifest (rbvl.regroup.gallery), so never in its `files`
OURS = {STAGING, PREVIOUS, CACHE, runlock.LOCK_NAME, *GALLERY}


def staging_path(out: Path) -> Path:
    return Path(out) / STAGING


def prepare(out: str | Path, overwrite: bool) -> Path:
    """Check OUT, lock it for this process, and return a fresh, empty staging folder inside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RegroupError(f"--out {out} is a file, not a folder")
    has_manifest = (out / MANIFEST).is_file()
    if has_manifest and not overwrite:
        raise RegroupError(f"{out} already holds a {MANIFEST}; pass --overwrite to replace that regroup output")
    if out.is_dir() and not has_manifest:
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in OURS)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RegroupError(
                f"--out {out} is not empty and is not a regroup output (no {MANIFEST}; found {shown}); "
                "choose a new or empty folder (regroup never deletes files it did not write)"
            )
    if has_manifest:
        previous_files(out)  # an unreadable manifest fails here, before any work
    runlock.acquire(out, "rbvl-regroup")
    staging = staging_path(out)
    with fsfault.writing(staging):
        _fresh(staging)  # an interrupted run's partial output is ours to remove
    return staging


def previous_files(out: Path) -> list[str]:
    """The files (relative to OUT) that the regroup output in OUT wrote, from its manifest."""
    try:
        manifest = manifest_file.read(out / MANIFEST)
    except manifest_file.ManifestError as e:
        raise RegroupError(f"{e}; remove the old output by hand") from None
    if "files" in manifest:
        files = list(manifest["files"])
    else:
        files = [
            s for c in manifest.get("clusters", []) for s in [*c.get("train_shards", []), *c.get("eval_shards", [])]
        ]
        files += [name for name in KNOWN if (out / name).is_file()]
    root = out.resolve()
    for rel in files:
        target = (out / rel).resolve()
        if root not in target.parents or Path(rel).parts[0] in OURS:
            raise RegroupError(f"{out / MANIFEST} lists '{rel}', outside the output; remove the old output by hand")
    return files


def commit(staging: Path, out: Path, manifest: dict) -> Path:
    """Move the staged output into OUT (replacing the previous regroup output) and write the manifest last.

    The previous output's files are first moved aside (OUT/.previous, renames within one file system), so a fault
    while moving the new files in or writing the manifest (a full disk, a read-only remount) puts them back: OUT then
    holds the previous output exactly as it was, and the error propagates.
    """
    new = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and p.name != MARK)
    old = set(previous_files(out)) if (out / MANIFEST).is_file() else set()
    clash = [rel for rel in new if (out / rel).exists() and rel not in old]
    if clash:
        raise RegroupError(f"{out / clash[0]} exists and was not written by regroup; move it away and rerun")
    aside, moved_in = out / PREVIOUS, []
    with fsfault.writing(aside):
        _fresh(aside)
    moved_aside = _move(out, aside, [MANIFEST, *sorted(old)])  # from here on OUT holds no complete output
    try:
        _prune_empty(out, {str(Path(rel).parent) for rel in old})
        for rel in new:
            with fsfault.writing(out / rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out / rel)
            moved_in.append(rel)
        with fsfault.writing(out / MANIFEST):
            path = manifest_file.write(out, {**manifest, "files": new})
    except BaseException:
        _put_back(out, aside, moved_in, moved_aside)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    runlock.release(out)
    return path


def abandon(staging: Path, out: Path) -> None:
    """After a failed run: remove its staging folder and read spool (ours), release OUT. The embedding cache stays
    (a rerun continues it); a cache folder the run left empty goes."""
    if (staging / MARK).exists():
        shutil.rmtree(staging, ignore_errors=True)
    cache = Path(out) / CACHE
    for spool in cache.glob("records*.bin"):
        spool.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (an embedding cache to continue), or not there
        cache.rmdir()
    (Path(out) / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    runlock.release(out)


def _fresh(folder: Path) -> None:
    """An empty folder marked as ours (a leftover of a crashed run is ours too, when it carries the mark)."""
    if folder.exists():
        if not (folder / MARK).exists():
            raise RegroupError(f"{folder} exists and was not made by regroup; move it away")
        if folder.name == PREVIOUS and any(p.is_file() and p.name != MARK for p in folder.rglob("*")):
            raise RegroupError(f"{folder} holds files of an earlier output that could not be put back; move them")
        shutil.rmtree(folder)
    folder.mkdir()
    (folder / MARK).write_text("partial rbvl-regroup output; removed by the next run\n")


def _move(src: Path, dst: Path, rels: list[str]) -> list[str]:
    """Rename src/rel → dst/rel for each rel that exists; returns those moved (if one fails, the moved go back)."""
    moved = []
    try:
        for rel in rels:
            if (src / rel).is_file():
                with fsfault.writing(dst / rel):
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src / rel, dst / rel)
                moved.append(rel)
    except BaseException:
        _put_back(src, dst, [], moved)
        raise
    return moved


def _put_back(out: Path, aside: Path, moved_in: list[str], moved_aside: list[str]) -> None:
    """Undo a commit: the new files leave OUT (deleted: the staging copy is gone), the previous ones come back."""
    for rel in moved_in:
        (out / rel).unlink(missing_ok=True)
    _prune_empty(out, {str(Path(rel).parent) for rel in moved_in})
    (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    for rel in moved_aside:
        try:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(aside / rel, out / rel)
        except OSError:  # keep going: every file that can come back does; the rest stay in OUT/.previous
            continue
    if not any(p.is_file() and p.name != MARK for p in aside.rglob("*")):
        shutil.rmtree(aside, ignore_errors=True)


def _prune_empty(out: Path, folders: set[str]) -> None:
    """Remove the folders the old output's files lived in, deepest first, when they are now empty."""
    candidates = set()
    for folder in folders:
        parts = Path(folder).parts
        candidates |= {Path(*parts[: i + 1]) for i in range(len(parts))}
    for rel in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        path = out / rel
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
