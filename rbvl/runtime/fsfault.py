"""File-system faults (full disk, read-only, permissions) as one line naming the fault and the path.

    with fsfault.writing(out / ".staging"):      # an OSError without a file name gets this path
        write_shards(...)
    except OSError as e:
        print(f"rbvl-regroup: error: {fsfault.describe(e)}")
        # rbvl-regroup: error: no space left on device writing shards/.staging/train/cluster_000/shard-000000.tar

A write that fails deep inside tarfile or PIL raises an OSError with no file name; `writing` attaches the path the
caller was writing, so the line always says where.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
}


def is_fault(e: BaseException) -> bool:
    """Whether `e` is one of the file-system faults above (not a missing file or a bad path)."""
    return isinstance(e, OSError) and e.errno in FAULTS


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Give an OSError raised inside without a file name the `path` being written (then re-raise it)."""
    try:
        yield
    except OSError as e:
        if getattr(e, "filename", None) is None:
            e.filename = str(path)
        raise


def describe(e: OSError, doing: str = "writing") -> str:
    """`no space left on device writing PATH` for a known fault; the error's own words (and file) otherwise."""
    where = f" {doing} {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno in FAULTS:
        return f"{FAULTS[e.errno]}{where}"
    text = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return f"{text}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}"
