"""The data users already have, end to end: every input shape of tests/user_datasets.py through rbvl-regroup (records
in = written + rejected; the conversation text and the images survive into the shard) and a few `rbvl train` steps;
multi-image samples on two families; rejects a person can act on (a count and an example per reason, hints)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_regroup import read_shards
from user_datasets import BUILDERS, Case, N, qa

from data_tools.regroup import main as regroup
from rbvl.model.families import TINY_FAMILIES

TINY = ["--embedder", "open_clip:rbvl-tiny", "--no-progress", "--no-plots", "--num-workers", "0", "--k", "2"]
TRAIN = [
    "max_steps=2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.save_every=0",
    "balance.update_every=2",
    "balance.warmup_steps=0",
    "eval.every=0",
    "data.num_workers=0",
    "data.max_length=512",
    "logging.progress=false",
    "logging.plots=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def regrouped(tmp_path_factory):
    """shape → (Case, output folder, regroup's stdout), each shape built and regrouped once per module."""
    done: dict[str, tuple[Case, Path, str]] = {}

    def get(shape: str, capsys) -> tuple[Case, Path, str]:
        if shape not in done:
            root = tmp_path_factory.mktemp(shape)
            case = BUILDERS[shape](root)
            capsys.readouterr()
            assert regroup([*case.args, "--out", str(root / "out"), *TINY]) == 0
            done[shape] = (case, root / "out", capsys.readouterr().out)
        return done[shape]

    return get


def sample_images(out: Path, split: str = "train") -> dict[str, list[bytes]]:
    """id → its images' bytes in placeholder order, read back with plain webdataset."""
    import webdataset as wds

    found = {}
    for tar in sorted((out / split).glob("cluster_*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(s["json"])
            members = meta.get("images") or [e for e in ("png", "jpg", "webp") if e in s]
            found[meta["id"]] = [s[m] for m in members]
    return found


@pytest.mark.parametrize("shape", sorted(BUILDERS))
def test_every_shape_regroups_with_its_text_and_images(shape, regrouped, capsys):
    case, out, stdout = regrouped(shape, capsys)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]["train"]
    rejects = (out / "rejects.jsonl").read_text().splitlines()
    assert counts == {"in": N, "written": N, "rejected": 0} and rejects == []
    assert "rbvl-regroup: reading " in stdout and stdout.count("rbvl-regroup: reading") == 1  # --format auto said so

    samples, images = read_shards(out, "train"), sample_images(out)
    assert set(samples) == set(case.expected)
    for rid, (turns, pictures) in case.expected.items():
        assert samples[rid]["conversation"] == turns, rid
        assert images[rid] == pictures, rid  # PNG bytes kept as they came, in placeholder order
    assert manifest["input"]["max_images"] == max(len(p) for _, p in case.expected.values())


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(BUILDERS))
def test_every_shape_trains(shape, regrouped, capsys, tmp_path):
    from rbvl.config import load_config
    from rbvl.train import train
    from rbvl.train.metrics import read_metrics

    _, out, _ = regrouped(shape, capsys)
    train(
        load_config(
            "recipes/demo_tiny_rnb.yaml", [f"manifest={out / 'manifest.json'}", f"output_dir={tmp_path}", *TRAIN]
        )
    )
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [1, 2] and all(r["dropped"] == 0 for r in rows)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-image samples
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_multi_image_samples_train_with_an_image_domain_per_image(name, regrouped, capsys, tmp_path):
    """Each image reaches the projector at its placeholder with its sample's domain: the stream's image_domain_ids
    have one entry per projector row (LLaVA: one per image), and `balance.params=head` trains on them."""
    from rbvl.config import load_config
    from rbvl.data import MixtureStream, load_domains
    from rbvl.data.collate import Encoder
    from rbvl.model import load_model
    from rbvl.train import train
    from rbvl.train.metrics import read_metrics

    _, out, _ = regrouped("llava_multi_image", capsys)
    fam = TINY_FAMILIES[name]
    cfg = load_config(None, [f"model.name={name}", f"manifest={out / 'manifest.json'}", f"output_dir={tmp_path}",
                             "balance.params=head", *TRAIN, "max_steps=3"])  # fmt: skip
    _, processor = load_model(cfg.model)
    domains = load_domains(out / "manifest.json")

    class Uniform:
        def at(self, step):
            import torch

            return torch.full((len(domains),), 1 / len(domains))

    stream = MixtureStream(domains, Uniform(), batch_size=6, collate=Encoder(processor, max_length=512))
    seen_multi = False
    for _, (batch, meta) in zip(range(4), stream):
        n_tokens = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(fam.image_token)).sum(1)
        seen_multi |= bool((n_tokens > n_tokens.min()).any())
        if fam.projector_rows == "image":  # one projector row per image: two for a two-image sample
            per_sample = (n_tokens // n_tokens.min()).tolist()
            assert meta.image_domain_ids.tolist() == [
                d for d, k in zip(meta.domain_ids.tolist(), per_sample) for _ in range(k)
            ]
        assert meta.image_domain_ids.numel() >= len(meta.domain_ids) and meta.dropped == 0
    assert seen_multi, "no two-image sample in four batches"

    train(cfg)
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["dropped"] == 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_the_family_tables_multi_image_column_is_what_training_does(name, regrouped, capsys):
    """README's table (markdown_table, kept equal to the README by test_families) says multi-image yes / no per family:
    a two-image sample from regrouped shards collates for every `yes` (one projector row or more per image, or one
    per sample for `samples`, each with the sample's domain), and the stream refuses multi-image shards for every family without it."""
    from rbvl.data import MixtureStream, load_domains
    from rbvl.data.collate import Encoder
    from rbvl.data.shards import DataError, decode, read_shard
    from rbvl.model.families import markdown_table
    from rbvl.model.tiny import build

    fam = TINY_FAMILIES[name]
    row = next(line for line in markdown_table().splitlines() if line.startswith(f"| {fam.model_type} |"))
    claim = row.split(" | ")[7]  # text-only / multi-image samples
    _, out, _ = regrouped("llava_multi_image", capsys)
    domains = load_domains(out / "manifest.json")
    shards = [shard for d in domains.domains for shard in d.train_shards]
    two = next(
        s for s in (decode(raw) for shard in shards for raw in read_shard(shard)) if len(s.get("images", [])) == 2
    )
    encoder = Encoder(build(name)[1], max_length=512, family=fam)
    if fam.multi_image:
        assert claim.endswith("/ yes")
        batch, info = encoder([two], [1])
        per_sample = fam.projector_rows == "samples"  # Mllama: one projector row per sample, whatever its images
        assert info["dropped"] == 0 and info["image_domain_ids"].numel() >= (1 if per_sample else 2)
        assert set(info["image_domain_ids"].tolist()) == {1}
    else:
        assert claim in ("n/a (text)", "yes / no", "no / no")
        with pytest.raises(DataError, match=f"model family '{fam.model_type}' takes one image per sample"):
            MixtureStream(domains, None, batch_size=2, collate=encoder)


def test_a_family_that_takes_one_image_refuses_multi_image_shards_in_one_line(regrouped, capsys, tmp_path):
    import subprocess

    _, out, _ = regrouped("llava_multi_image", capsys)
    r = subprocess.run(
        [sys.executable, "-m", "rbvl.cli", "train", "recipes/demo_tiny_rnb.yaml", "model.name=tiny-llama",
         "lora.target_modules=null", "lora.modules_to_save=null", f"manifest={out / 'manifest.json'}",
         f"output_dir={tmp_path / 'run'}", *TRAIN],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    errors = [line for line in r.stderr.splitlines() if ": error:" in line]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "model family 'llama' takes one image per sample" in errors[0], r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------------
# Rejects a person can act on
# ---------------------------------------------------------------------------------------------------------------------


def _llava_without_root(root: Path, n: int, n_text: int, prefix: str = "r") -> Path:
    """LLaVA JSON beside an images/ folder, the paths relative to images/ (so --image-root is needed)."""
    from user_datasets import photo

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        q, a = qa(i)
        if i < n_text:
            rows.append(
                {"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            )
            continue
        (root / "images" / f"{prefix}{i}.png").write_bytes(photo(i))
        rows.append({"id": f"{prefix}{i}", "image": f"{prefix}{i}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})  # fmt: skip
    path = root / f"{prefix}.json"
    path.write_text(json.dumps(rows))
    return path


def test_forgotten_image_root_gives_counts_per_reason_examples_and_a_hint(tmp_path, capsys):
    train = _llava_without_root(tmp_path / "data", 28, 8)
    evals = _llava_without_root(tmp_path / "data", 6, 2, prefix="e")
    out = tmp_path / "out"
    assert regroup(["--input", str(train), "--eval", str(evals), "--out", str(out), *TINY]) == 0
    got = capsys.readouterr()
    assert "train: 28 in = 8 written + 20 rejected" in got.out
    assert f"rejected: missing_image 20 (e.g. r8: {train.parent / 'r8.png'}: no such file)" in got.out
    assert f"rejected: missing_image 4 (e.g. e2: {evals.parent / 'e2.png'}: no such file)" in got.out  # eval too
    assert "20 of 28 train records name an image file that is not there" in got.err
    assert "did you pass --image-root?" in got.err

    summary = (out / "summary.md").read_text()
    assert (
        "## Rejected" in summary
        and "| train | missing_image | 20 | r8:" in summary
        and "| eval | missing_image | 4 |" in summary
    )
    assert "**Hint:**" in summary
    page = (out / "gallery" / "index.html").read_text()
    assert 'id="rejected"' in page and "missing_image" in page and "<code>r8</code>" in page

    # with the default k sweep the next error names the rejects, not only k
    assert regroup(["--input", str(train), "--out", str(tmp_path / "out2"), *TINY[:-2]]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "k=32 is larger than the number of usable train records (8; 20 rejected: missing_image 20" in line
    assert "did you pass --image-root?" in line


def test_everything_rejected_names_the_main_reasons(tmp_path, capsys):
    path = _llava_without_root(tmp_path / "data", 32, 0)
    rows = json.loads(path.read_text())
    for row in rows[:4]:
        row["conversations"] = [{"from": "human", "value": "hi"}]  # no answer: malformed
        row.pop("image")
    path.write_text(json.dumps(rows))
    assert regroup(["--input", str(path), "--out", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "no usable train records in" in err[0] and "(32 rejected: missing_image 28 (e.g. r4:" in err[0]
    assert "malformed_conversation 4 (e.g. r0: no assistant turn)" in err[0] and "did you pass --image-root?" in err[0]


def test_unknown_columns_list_what_was_looked_for_and_what_the_file_has(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"utterance": f"hi {i}", "reply": "yo", "pic": None}) + "\n" for i in range(5)))
    assert regroup(["--input", str(path), "--out", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no usable train records" in err and "missing_field 5" in err
    assert "conversations|conversation|messages" in err and "the row has: utterance, reply, pic" in err
    assert "--prompt-field" in err

    # the same file, its columns named by flags
    out = tmp_path / "named"
    args = ["--input", str(path), "--prompt-field", "utterance", "--response-field", "reply", "--out", str(out)]
    assert regroup([*args, *TINY]) == 0
    assert read_shards(out, "train")["train-3"]["conversation"][0] == {"role": "user", "content": "hi 3"}


def test_named_columns_and_a_dataset_in_the_local_hugging_face_cache(tmp_path, capsys, monkeypatch):
    """--conversation-field / --image-field / --id-field, and `org/name:split` read from HF_HUB_CACHE offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from user_datasets import photo

    rows = [{"uid": f"u{i}", "dialog": [{"role": "user", "content": f"<image>\n{qa(i)[0]}"},
                                        {"role": "assistant", "content": qa(i)[1]}],
             "pics": [{"bytes": photo(i), "path": None}]} for i in range(12)]  # fmt: skip
    snapshot = tmp_path / "hub" / "datasets--someone--photos" / "snapshots" / "abc123" / "data"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), snapshot / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), snapshot / "test-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    names = ["--conversation-field", "dialog", "--image-field", "pics", "--id-field", "uid"]
    ok = regroup(["--input", "someone/photos", "--eval", "someone/photos:test", *names, "--out", str(out), *TINY])
    assert ok == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == {"in": 12, "written": 12, "rejected": 0}
    assert manifest["counts"]["eval"] == {"in": 4, "written": 0, "rejected": 4}  # the same ids as train
    assert sample_images(out)["u5"] == [photo(5)]

    # `datasets`' own prepared Arrow files (load_dataset's cache), when the hub cache has no Parquet of it
    prepared = tmp_path / "datasets" / "other___chat" / "default" / "0.0.0" / "f00d"
    prepared.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(prepared / "chat-train.arrow"), table.schema) as sink:
        sink.write_table(table)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert regroup(["--input", "other/chat", *names, "--out", str(tmp_path / "o3"), *TINY]) == 0
    assert json.loads((tmp_path / "o3" / "manifest.json").read_text())["counts"]["train"]["written"] == 12

    assert regroup(["--input", "someone/nothing", "--out", str(tmp_path / "o2"), *TINY]) == 1
    assert "no dataset of that name in the local Hugging Face cache" in capsys.readouterr().err


def test_bad_tables_are_one_line(tmp_path, capsys):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert regroup(["--input", str(bad), "--out", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: not a readable Parquet file after 0 rows" in err[0]

    folder = tmp_path / "dsdict"
    (folder / "train").mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert regroup(["--input", str(folder), "--out", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a Hugging Face DatasetDict with splits train, test" in err[0]
    assert f"--input {folder / 'train'}" in err[0]
