"""RecordSpool: read records kept on disk (an offset index in memory) for the stages after reading.

    spool = RecordSpool("out/.cache/records.bin")
    for record in read_records(paths):
        spool.append(record)
    spool.finish()
    train = spool.rows(range(0, 900))   # a list-like view; spool[i] reads one record back (os.pread)

Memory holds 8 bytes per record (its offset) and the labels, whatever the images weigh.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path

from rbvl.records.record import Record


class RecordSpool:
    """Records kept on disk, one after another, with an offset index in memory (8 bytes per record).

    Regroup spools what it reads and takes records back by row for embedding (in DataLoader workers: reads use
    `os.pread`, which shares no file position across forked processes), for the report and for writing shards.
    Each entry is a small binary header, the record's fields as JSON and its image bytes when it carries them (the
    first image's, then those of `more_images` that came as bytes, their sizes in the JSON).
    """

    _HEAD = struct.Struct("<II")  # JSON length, image length

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "wb")  # closed by finish()
        self.offsets = array("q", [0])  # entry i is bytes offsets[i]..offsets[i + 1]
        self.labels: list[str | None] = []  # kept in memory for clustering metrics (one object per distinct label)
        self._names: dict[str, str] = {}
        self._fd: int | None = None

    def append(self, rec: Record) -> None:
        fields = {k: v for k, v in rec.__dict__.items() if k != "image"}
        blobs = [m["data"] for m in rec.more_images if "data" in m]
        fields["more_images"] = [
            {"ext": m.get("ext"), "size": len(m["data"])} if "data" in m else m for m in rec.more_images
        ]
        head = json.dumps(fields, ensure_ascii=False).encode()
        image = (rec.image or b"") + b"".join(blobs)
        self._out.write(self._HEAD.pack(len(head), len(image)) + head + image)
        self.offsets.append(self.offsets[-1] + self._HEAD.size + len(head) + len(image))
        self.labels.append(None if rec.label is None else self._names.setdefault(rec.label, rec.label))

    def finish(self) -> RecordSpool:
        """Done appending: flush, and from now on read."""
        if self._out is not None:
            self._out.close()
            self._out = None
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SpoolRows(self, range(len(self))[i])
        if self._fd is None:
            self.finish()
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = self.offsets[i], self.offsets[i + 1]
        data = os.pread(self._fd, end - start, start)
        n_head, _ = self._HEAD.unpack_from(data)
        rec = Record(**json.loads(data[self._HEAD.size : self._HEAD.size + n_head]))
        end = len(data)
        for m in reversed(rec.more_images):  # their bytes follow the first image's, in order
            if "size" in m:
                start = end - m.pop("size")
                m["data"], end = data[start:end], start
        if end > self._HEAD.size + n_head:
            rec.image = data[self._HEAD.size + n_head : end]
        return rec

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def rows(self, rows) -> SpoolRows:
        return SpoolRows(self, rows)

    def close(self, delete: bool = True) -> None:
        self.finish()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete:
            self.path.unlink(missing_ok=True)

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn reopen the file themselves
        state = dict(self.__dict__)
        state.update(_out=None, _fd=None)
        return state


class SpoolRows:
    """A list-like view of some rows of a spool (the train rows, the eval rows)."""

    def __init__(self, spool: RecordSpool, rows):
        self.spool, self.rows_ = spool, rows

    def __len__(self) -> int:
        return len(self.rows_)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SpoolRows(self.spool, self.rows_[i])
        return self.spool[int(self.rows_[i])]

    def __iter__(self) -> Iterator[Record]:
        return (self.spool[int(r)] for r in self.rows_)
