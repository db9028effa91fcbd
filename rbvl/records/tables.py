"""Tables as rows: Parquet files, Arrow files, `datasets` `save_to_disk` folders, and datasets in the local Hugging Face
cache by name; read batch by batch with pyarrow (memory holds one batch), never through a full `datasets` import.

    for source, row in table_rows("train.parquet", "parquet"):   # ("train.parquet[3]", {"messages": [...], ...})
        ...
    folder_inputs(Path("ds/train"))          # [("ds/train/data-00000-of-00001.arrow", "arrow")]
    cached_dataset_files("HuggingFaceM4/ChartQA:test")   # the Parquet / Arrow files of that split, offline

A Hugging Face `Image` column arrives as {"bytes", "path"} per row (rbvl.records.rows reads both).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rbvl.records.record import RecordsError

BATCH = 256  # rows per pyarrow batch: image columns make rows heavy
_NAME = re.compile(r"(?:hf:)?([\w.-]+)/([\w.-]+)(?::([\w.-]+))?")


def table_rows(path: str, fmt: str) -> Iterator[tuple[str, dict]]:
    """(source, row) for every row of a Parquet (`fmt` "parquet") or Arrow IPC file ("arrow"), in order.

    Raises:
        RecordsError: a file pyarrow cannot read, naming it and how many rows it gave.
    """
    i = 0
    try:
        for batch in _batches(path, fmt):
            for row in batch.to_pylist():
                yield f"{path}[{i}]", row
                i += 1
    except RecordsError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        kind = "Parquet" if fmt == "parquet" else "Arrow"
        problem = " ".join(str(e).split()) or type(e).__name__
        raise RecordsError(f"{path}: not a readable {kind} file after {i} rows: {problem}") from None


def _batches(path: str, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH)
        return
    with pa.memory_map(path) as source:  # `datasets` writes the IPC stream format; Feather v2 is the file format
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        batches = (reader.get_batch(k) for k in range(reader.num_record_batches)) if is_file else reader
        for batch in batches:
            for start in range(0, batch.num_rows, BATCH):
                yield batch.slice(start, BATCH)


def folder_inputs(folder: Path) -> list[tuple[str, str]]:
    """The files a folder input stands for: a `save_to_disk` folder's Arrow files (in its state.json order), else its
    tar shards, Parquet files or Arrow files.

    Raises:
        RecordsError: a DatasetDict folder (it holds several splits: the message names them), or a folder holding
            none of these.
    """
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits") or sorted(p.name for p in folder.iterdir())
        raise RecordsError(
            f"{folder}: a Hugging Face DatasetDict with splits {', '.join(map(str, splits))}; pass one split's folder, "
            f"e.g. --input {folder / str(splits[0])}"
        )
    if (folder / "state.json").is_file():
        files = [folder / f["filename"] for f in _json(folder / "state.json").get("_data_files", [])]
        return [(str(f), "arrow") for f in files]
    for pattern, fmt in (("*.tar", "webdataset"), ("*.parquet", "parquet"), ("*.arrow", "arrow")):
        found = sorted(folder.glob(pattern))
        if found:
            return [(str(f), fmt) for f in found]
    raise RecordsError(f"{folder}: a folder with no .tar shards, .parquet or .arrow files (nor a save_to_disk state)")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecordsError(f"{path}: cannot be read as JSON: {e}") from None


def is_dataset_name(spec: str) -> bool:
    """Whether `spec` looks like a Hugging Face dataset name (`org/name`, `hf:org/name`, `org/name:split`) rather
    than a file: no file of that name exists, and it does not end like one of the files rbvl reads."""
    files = (".json", ".jsonl", ".parquet", ".arrow", ".tar")
    return bool(_NAME.fullmatch(str(spec))) and not str(spec).endswith(files) and not Path(spec).exists()


def cached_dataset_files(spec: str) -> list[tuple[str, str]]:
    """The Parquet / Arrow files of dataset `org/name[:split]` (split `train` by default) in the local Hugging Face
    caches: the hub's downloads (HF_HUB_CACHE) and `datasets`' prepared Arrow files (HF_DATASETS_CACHE). Offline: no
    network, no `datasets` import. An empty list when the dataset is not there."""
    org, name, split = _NAME.fullmatch(spec).groups()
    split = split or "train"
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub") / f"datasets--{org}--{name}" / "snapshots"
    within = re.compile(rf"(^|[/_-]){re.escape(split)}([/_.-]|$)")
    for snapshot in sorted(hub.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True):
        files = sorted(p for p in snapshot.rglob("*.parquet") if within.search(p.relative_to(snapshot).as_posix()))
        if files:
            return [(str(f), "parquet") for f in files]
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets") / f"{org}___{name}"
    files = sorted(prepared.rglob(f"*-{split}.arrow")) + sorted(prepared.rglob(f"*-{split}-*.arrow"))
    if files:  # several prepared versions: the newest one
        newest = max(files, key=lambda p: p.stat().st_mtime).parent
        files = [f for f in files if f.parent == newest]
    return [(str(f), "arrow") for f in files]
