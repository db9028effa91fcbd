"""`rbvl bench stream` and `rbvl bench regroup --synthetic-records` run end to end on tiny inputs."""

import json

import pytest

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
    assert "peak RSS" in out and "300 synthetic LLaVA records" in out
    shards = list((tmp_path / "w" / "out" / "train").glob("cluster_*/*.tar"))
    assert shards and not (tmp_path / "w" / "out" / ".cache" / "records.bin").exists()
