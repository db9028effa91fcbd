"""The mixture stream and collate: frequencies follow p, a new p arrives after the documented lag, readers are
disjoint, resume is exact, and labels cover exactly the assistant turns."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_manifest
from torch.utils.data import DataLoader

from rbvl.balance import ProportionSchedule
from rbvl.data import (
    DataError,
    MixtureStream,
    decode,
    domain_samples,
    load_domains,
    loader_lag,
    read_shard,
)
from rbvl.data.collate import Encoder, to_messages
from rbvl.mixing import initial_proportions
from rbvl.model import tiny


@pytest.fixture(scope="module")
def processor():
    return tiny.build("tiny-llava")[1]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return load_domains(write_tiny_manifest(tmp_path_factory.mktemp("shards"), n_train=40, n_eval=4))


def make_stream(domains, processor, p0, workers=0, batch_size=8, seed=0, **kw):
    schedule = ProportionSchedule(len(domains), initial=p0, lag=loader_lag(workers, 2))
    stream = MixtureStream(
        domains,
        schedule,
        batch_size=batch_size,
        collate=Encoder(processor, max_length=128),
        seed=seed,
        num_workers=workers,
        **kw,
    )
    return stream, schedule


def loader(stream, workers):
    return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


def counts_within(observed, p, n):
    """Every domain's count within 4.5 standard deviations of n · p_i."""
    expected = n * np.asarray(p)
    sd = np.sqrt(n * np.asarray(p) * (1 - np.asarray(p))) + 1e-9
    return np.all(np.abs(observed - expected) <= 4.5 * sd + 1e-9)


@pytest.mark.parametrize(
    "strategy, weights", [("stratified", None), ("natural", None), ("manual", {"cluster_000": 3, "cluster_002": 1})]
)
def test_domain_frequencies_follow_p(domains, processor, strategy, weights):
    p0 = initial_proportions(strategy, domains, weights)
    stream, _ = make_stream(domains, processor, p0)
    observed = np.zeros(3)
    for _, (_, meta) in zip(range(60), loader(stream, 0)):
        stream.consumed(meta)
        observed += np.bincount(meta.domain_ids.numpy(), minlength=3)
    assert counts_within(observed, p0, observed.sum()), (observed, p0)
    if strategy == "manual":
        assert observed[1] == 0


def test_manual_weights_name_real_domains(domains):
    with pytest.raises(DataError, match="unknown domain 'cluster_009'"):
        initial_proportions("manual", domains, {"cluster_009": 1})


def test_a_new_p_arrives_after_the_lag_with_workers(domains, processor):
    stream, schedule = make_stream(domains, processor, [1 / 3] * 3, workers=2)
    assert schedule.lag == 4  # num_workers · prefetch_factor batches = 4 steps of one micro-batch
    seen = []
    for _, meta in loader(stream, 2):
        index = meta.index
        stream.consumed(meta)
        seen.append((index, meta.domain_ids.tolist()))
        if index == 5:  # batch 5 is step 6
            applies = schedule.publish([0.0, 0.0, 1.0], after_step=index + 1)
            assert applies == 11  # step 11 = batch 10
        if index == 30:
            break
    before = [d for i, ids in seen if i < 10 for d in ids]
    after = [d for i, ids in seen if i >= 10 for d in ids]
    assert set(before) == {0, 1, 2}
    assert set(after) == {2}, "from batch 10 on, only domain 2 is drawn"


def test_readers_are_disjoint_and_cover_a_domain(domains):
    shards = domains.domains[0].train_shards
    keys = []
    for reader in range(4):  # 2 ranks × 2 workers
        it = domain_samples(shards, reader, 4, seed=0, domain=0, shuffle_buffer=5)
        keys += [next(it)["__key__"] for _ in range(10)]
    assert len(keys) == len(set(keys)) == 40
    every = {s["__key__"] for shard in shards for s in read_shard(shard)}
    assert set(keys) == every


def test_a_small_domain_never_runs_dry(domains, processor):
    stream, _ = make_stream(domains, processor, [0.0, 1.0, 0.0])
    it = iter(loader(stream, 0))
    for _ in range(20):  # 160 draws from a 40-sample domain
        _, meta = next(it)
        stream.consumed(meta)
    assert stream.cursors[0][1] == 160


def test_resume_is_exact_with_workers(domains, processor):
    def run(n, state=None, stop_at=None):
        stream, schedule = make_stream(domains, processor, [1 / 3] * 3, workers=2)
        if state is not None:  # the stream's cursors and the p schedule (which training saves with Balance)
            stream.load_state_dict(state[0])
            schedule.load_state_dict(state[1])
        out = []
        for batch, meta in loader(stream, 2):
            index = meta.index
            stream.consumed(meta)
            out.append((index, batch["input_ids"].tolist(), meta.domain_ids.tolist()))
            if index == 7:
                schedule.publish([0.6, 0.1, 0.3], after_step=index + 1)
            if (stop_at is not None and index == stop_at) or len(out) == n:
                return out, (stream.state_dict(), schedule.state_dict())

    full, _ = run(24)
    first, state = run(None, stop_at=12)
    rest, _ = run(11, state=state)
    assert first + rest == full

    other, _ = make_stream(domains, processor, [1 / 3] * 3, workers=1)
    with pytest.raises(DataError, match="num_workers=2"):
        other.load_state_dict(state[0])


def test_collate_labels_only_assistant_turns(processor):
    from PIL import Image

    collate = Encoder(processor, max_length=256)
    samples = [
        {
            "conversation": [
                {"role": "user", "content": "<image>\nWhat digit?"},
                {"role": "assistant", "content": "7"},
                {"role": "user", "content": "Odd or even?"},
                {"role": "assistant", "content": "odd"},
            ],
            "image": Image.new("RGB", (32, 32)),
        },
        {
            "conversation": [
                {"role": "user", "content": "What is 4 + 5?"},
                {"role": "assistant", "content": "4 + 5 = 9."},
            ],
            "image": None,
        },
    ]
    batch, info = collate(samples, [1, 0])
    assert (info["truncated"], info["dropped"]) == (0, 0)
    assert batch["pixel_values"].shape[0] == 1 and info["image_domain_ids"].tolist() == [1]
    assert info["domain_ids"].tolist() == [1, 0] and "domain_ids" not in batch
    assert info["label_tokens"].tolist() == [int((row[1:] != -100).sum()) for row in batch["labels"]]
    tok = processor.tokenizer
    for row, expected in zip(batch["labels"], ["7<|im_end|>\nodd<|im_end|>\n", "4 + 5 = 9.<|im_end|>\n"]):
        labelled = tok.decode(row[row != -100])
        assert labelled.replace("\n", "") == expected.replace("\n", "")


def test_collate_works_with_another_chat_template(processor):
    import copy

    other = copy.deepcopy(processor)
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
        "{% endfor %} [/INST]{% else %} {% for p in m['content'] %}{{ p['text'] }}{% endfor %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{% endif %}"
    )
    batch, _ = Encoder(other)(
        [
            {
                "conversation": [
                    {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "hello friend"},
                ],
                "image": None,
            }
        ],
        [0],
    )
    row = batch["labels"][0]
    assert "hello friend" in other.tokenizer.decode(row[row != -100])
    assert "Hi there" not in other.tokenizer.decode(row[row != -100])


def test_overlong_rules(processor):
    from PIL import Image

    long_text = "What is this digit? " * 30
    samples = [
        {
            "conversation": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "7"}],
            "image": None,
        },
        {
            "conversation": [
                {"role": "user", "content": "<image>\n" + long_text},
                {"role": "assistant", "content": "7"},
            ],
            "image": Image.new("RGB", (32, 32)),
        },
        {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}], "image": None},
    ]
    batch, stats = Encoder(processor, max_length=40, overlong="truncate")(samples, [0, 1, 2])
    assert (stats["truncated"], stats["dropped"]) == (2, 0) and batch["input_ids"].shape == (3, 40)
    batch, stats = Encoder(processor, max_length=40, overlong="drop")(samples, [0, 1, 2])
    assert (stats["truncated"], stats["dropped"]) == (0, 2) and stats["domain_ids"].tolist() == [2]
    assert "pixel_values" not in batch
    batch, stats = Encoder(processor, max_length=10, overlong="truncate")(samples[1:2], [1])
    assert batch is None and stats["dropped"] == 1, "cutting into the image tokens drops the sample"


def test_to_messages_places_the_image():
    msgs = to_messages([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "7"}])
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What?"}]


def test_tiny_model_forward_on_a_collated_batch(domains, processor):
    from rbvl.config import ModelConfig
    from rbvl.model import load_model

    model, _ = load_model(ModelConfig())
    stream, _ = make_stream(domains, processor, [1 / 3] * 3)
    inputs, meta = next(iter(loader(stream, 0)))
    stream.consumed(meta)
    assert torch.isfinite(model(**inputs).loss)


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        load_domains(tmp_path / "nope.json")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(DataError, match="not a regroup manifest"):
        load_domains(tmp_path / "m.json")
    path = write_tiny_manifest(tmp_path / "s")
    next((tmp_path / "s" / "train" / "cluster_001").glob("*.tar")).unlink()
    with pytest.raises(DataError, match="shard listed but missing"):
        load_domains(path)


def test_decode(domains):
    sample = next(read_shard(domains.domains[0].train_shards[0]))
    record = decode(sample)
    assert record["image"].size == (32, 32) and record["conversation"][0]["role"] == "user"


def test_a_broken_sample_is_skipped_and_counted(tmp_path, processor):
    import io
    import json

    import webdataset as wds

    path = write_tiny_manifest(tmp_path / "s", n_domains=1, n_train=4, n_eval=1)
    shard = next((tmp_path / "s" / "train" / "cluster_000").glob("*.tar"))
    conv = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]
    with wds.TarWriter(str(shard)) as sink:  # replace the first shard: one good sample, one broken image
        good = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (32, 32)).save(good, format="PNG")
        sink.write({"__key__": "good", "png": good.getvalue(), "json": json.dumps({"conversation": conv}).encode()})
        sink.write({"__key__": "bad", "png": b"\x89PNG broken", "json": json.dumps({"conversation": conv}).encode()})
    stream, _ = make_stream(load_domains(path), processor, [1.0], batch_size=4, shuffle_buffer=1)
    _, meta = next(iter(loader(stream, 0)))
    stream.consumed(meta)
    assert stream.pop_counts()["dropped"] >= 1
    assert len(meta.domain_ids) >= 1


def test_the_data_package_imports_no_training_code():
    """Dependencies point one way: the loop, the mixers and evaluation import rbvl.data, never the reverse."""
    code = (
        "import sys, rbvl.data, rbvl.data.collate, rbvl.data.synthetic; "
        "print(sorted(m for m in sys.modules if m.startswith(('rbvl.train', 'rbvl.mixing', 'rbvl.evaluate'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
