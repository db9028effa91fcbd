"""Records: one training example whatever its source, the readers that make them, and the rejects that explain what
could not be used (see `docs/formats.md` for the field-by-field contract).

    from rbvl.records import ReadOptions, Record, Reject, read_records
    for item in read_records(["data/llava.json"], ReadOptions(image_root="data/images")):
        ...  # a Record, or a Reject(id, source, reason, detail)

One pass, bounded memory: a JSON array is parsed as a stream (ijson), JSON lines line by line, Parquet and Arrow by batch;
`RecordSpool` keeps read records on disk (an offset index in memory) for the stages after reading, and one `Rejects`
collector gathers what read, embed and write could not use, to be written once as rejects.jsonl.

    record.py    Record, Reject, Rejects, the reject reasons, conversation normalisation, shard keys
    readers.py   read_records: which container an input is (JSON / JSONL, Parquet, Arrow, save_to_disk folders, a
                 dataset in the local Hugging Face cache, WebDataset shards), and the tar reader
    rows.py      one row of any shape → Record or Reject (LLaVA / ShareGPT conversations, chat `messages` with
                 content parts and an `images` column, prompt/response pairs, S1 traces)
    jsonfiles.py JSON arrays and JSON lines as a stream of rows
    tables.py    Parquet / Arrow files as rows (pyarrow, batch by batch), dataset folders and the local HF cache
    spool.py     RecordSpool: records on disk, read back by row (DataLoader workers included)
    images.py    the shard image contract shared by Regroup and the stream (`from rbvl.records import images`)

Nothing here imports torch or training code: Regroup and data tools use it alone.
"""

from rbvl.records.readers import FORMATS, ReadOptions, detect_format, expand_inputs, read_records
from rbvl.records.record import (
    IMAGE_TOKEN,
    REASONS,
    Record,
    RecordsError,
    Reject,
    Rejects,
    normalise_conversation,
    sanitize_key,
)
from rbvl.records.rows import PRESETS
from rbvl.records.spool import RecordSpool, SpoolRows

__all__ = [
    "FORMATS",
    "IMAGE_TOKEN",
    "PRESETS",
    "REASONS",
    "ReadOptions",
    "Record",
    "RecordSpool",
    "RecordsError",
    "Reject",
    "Rejects",
    "SpoolRows",
    "detect_format",
    "expand_inputs",
    "normalise_conversation",
    "read_records",
    "sanitize_key",
]
