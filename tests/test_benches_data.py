"""`rbvl bench stream` and `rbvl bench regroup` (embedding, and --synthetic-records) run end to end on tiny inputs."""

import json

import pytest
import torch

from rbvl.cli import main


def test_bench_stream_prints_both_rates_and_the_ratio(capsys):
    args = ["--samples", "40", "--maxcount", "16", "--domains", "2", "--batches", "3", "--warmup", "1"]
    assert main(["bench", "stream", *args, "--rounds", "1", "--num-workers", "0", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "rbvl MixtureStream + Collator" in out and "raw webdataset" in out and "ratio" in out


@pytest.mark.slow
def test_bench_regroup_synthetic_reads_and_writes_every_record(tmp_path, capsys):
    from rbvl.bench.regroup import make_synthetic_llava

    size = make_synthetic_llava(tmp_path / "x.json", 50, image_share=0.5)
    rows = json.loads((tmp_path / "x.json").read_text())
    assert len(rows) == 50 and size == (tmp_path / "x.json").stat().st_size
    assert all(("image" in r) == r["conversations"][0]["value"].startswith("<image>") for r in rows)
    args = ["--synthetic-records", "300", "--synthetic-image-share", "0.3", "--workdir", str(tmp_path / "w")]
    assert main(["bench", "regroup", *args]) == 0
    out = capsys.readouterr().out
    assert "peak RSS" in out and "300 synthetic LLaVA records" in out and "beyond the imports" in out
    shards = list((tmp_path / "w" / "out" / "train").glob("cluster_*/*.tar"))
    assert shards and not (tmp_path / "w" / "out" / ".cache" / "records.bin").exists()


def test_bench_regroup_embedding_names_its_bound(capsys):
    """The pipeline, the raw encode and the data path alone (the pipeline with an encoder that returns zeros) are
    each timed; a model that encodes faster than the data path reads is reported as decode-bound, against that bound."""
    from rbvl.bench import regroup
    from rbvl.regroup.embed import load_embedder

    embedder = load_embedder("open_clip:rbvl-tiny", "image", seed=0)
    data_only = regroup._data_only(embedder)
    assert torch.equal(data_only.encode({"index": torch.arange(3)}), torch.zeros(3, embedder.dim))
    assert "encode" not in vars(embedder)  # the copy's zeros never reach the embedder the pipeline side runs

    args = ["--n", "48", "--repeats", "1", "--num-workers", "0", "--batch-size", "16", "--image-size", "48"]
    result = main(["bench", "regroup", *args, "--kmeans-sizes", ""])
    assert result == 0
    out = capsys.readouterr().out
    assert "pipeline (read+decode+preprocess+encode+memmap)" in out and "data path alone" in out
    rates = {
        line.split("  ")[1].split(" (")[0].strip(): float(line.split()[-2])
        for line in out.splitlines()
        if line.rstrip().endswith("rec/s")
    }
    assert set(rates) == {"pipeline", "raw encode on ready tensors", "data path alone"}
    decode_bound = rates["data path alone"] < rates["raw encode on ready tensors"]
    assert ("decode-bound" in out) == decode_bound
