"""manifest.json has one writer and one reader: what one writes the other reads, and another format is refused."""

import json

import pytest

from rbvl import manifest
from rbvl.data import DataError, load_domains
from rbvl.data.synthetic import write_tiny_manifest


def test_written_manifest_reads_back(tmp_path):
    clusters = [manifest.domain_entry(0, "cluster_000", ["a.tar", "b.tar"], [3, 2], ["e.tar"], [4])]
    path = manifest.write(tmp_path, manifest.build(clusters, eval_distribution=[1.0], seed=7))
    got = manifest.read(path)
    assert got["format"] == manifest.FORMAT and got["k"] == 1 and got["seed"] == 7
    assert got["clusters"][0]["n_train"] == 5 and got["clusters"][0]["n_eval"] == 4
    assert manifest.read(tmp_path) == got  # the folder holding it reads the same
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, nothing left behind


def test_other_format_is_refused_in_one_line(tmp_path):
    path = write_tiny_manifest(tmp_path / "s")
    data = json.loads(path.read_text())
    data["format"] = "rbvl-regroup/9"
    path.write_text(json.dumps(data))
    with pytest.raises(manifest.ManifestError, match=r"format 'rbvl-regroup/9', this rbvl reads 'rbvl-regroup/1'"):
        manifest.read(path)
    with pytest.raises(DataError, match="regroup the data again"):  # training says the same
        load_domains(path)
    del data["format"]
    path.write_text(json.dumps(data))
    with pytest.raises(manifest.ManifestError, match="manifest format None"):
        manifest.read(path)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(manifest.ManifestError, match=r"manifest.json: not a regroup manifest \(cannot be read"):
        manifest.read(tmp_path)


def test_synthetic_manifest_sizes_add_up(tmp_path):
    domains = load_domains(write_tiny_manifest(tmp_path / "s", n_domains=2, n_train=5, n_eval=3))
    assert [d.n_train for d in domains.domains] == [5, 5] and [d.n_eval for d in domains.domains] == [3, 3]
