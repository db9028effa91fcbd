"""A data.max_length that leaves a domain no label token is one line at the start, naming the domains and the length
the data needs, never a run that trains on the other domains and drops this one from the eval line (issue 20)."""

import re

import pytest

from rbvl.data import DataError, load_domains
from rbvl.data.collate import Encoder
from rbvl.data.probe import probe_domains
from rbvl.data.stream import _Starved
from rbvl.model.tiny import build
from rbvl.train.metrics import format_eval


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rbvl.data.synthetic import write_tiny_manifest

    manifest = write_tiny_manifest(tmp_path_factory.mktemp("shards"))
    _, processor = build("tiny-llava")
    return load_domains(manifest), processor


def _answer_start(processor, domains, d: int) -> int:
    """The shortest data.max_length that keeps an answer token of one of domain d's first 8 train and eval samples
    (whichever split needs more), from the full, uncut encodings."""
    from rbvl.data.shards import decode, read_shard

    need = 0
    for shards in (domains.domains[d].train_shards, domains.domains[d].eval_shards):
        samples = [decode(raw) for raw in read_shard(shards[0], stop=8)]
        batch, _ = Encoder(processor, max_length=10_000)(samples, [d] * len(samples))
        need = max(need, min(int(row.nonzero()[0]) + 2 for row in batch["labels"][:, 1:] != -100))
    return need


def test_every_domain_that_fits_passes(tiny):
    domains, processor = tiny
    probe_domains(domains, Encoder(processor, max_length=512))


def _suggested(msg: str) -> int:
    m = re.search(r"set data.max_length (above|>=) (\d+)", msg)
    return int(m.group(2)) + (m.group(1) == "above")


def test_images_for_a_text_only_model_say_so(tiny):
    """It guessed a too-short max_length; the cause was only in warnings above it."""
    domains, _ = tiny
    _, tokenizer = build("tiny-qwen2")
    with pytest.raises(
        DataError, match="its samples have images, and the model is a text-only LM; train a vision-language"
    ):
        probe_domains(domains, Encoder(tokenizer, max_length=512))


def test_a_length_below_the_image_tokens_names_the_domains_and_a_length_that_works(tiny):
    domains, processor = tiny
    with pytest.raises(DataError) as err:
        probe_domains(domains, Encoder(processor, max_length=16))
    msg = str(err.value)
    assert msg.startswith("none of the first 8 samples of cluster_000 (train), cluster_000 (eval)")
    assert re.search(r"image tokens (\d+) > data.max_length 16", msg)
    L = _suggested(msg)
    assert L > 16
    probe_domains(domains, Encoder(processor, max_length=L))  # what the line says to do is enough


def test_answers_cut_off_in_some_domains_names_those_and_the_length_that_keeps_them(tiny):
    domains, processor = tiny
    starts = {d: _answer_start(processor, domains, d) for d in (1, 2)}
    short, long = sorted(starts, key=starts.get)
    if starts[short] == starts[long]:
        pytest.skip("the two text domains' answers start at the same token")
    L = starts[long] - 1  # the later domain loses its first answer token, the earlier keeps it
    weights = [0.0, 0.5, 0.5]  # a manual mixture without the image domain: its train split is never drawn
    with pytest.raises(DataError) as err:
        probe_domains(domains, Encoder(processor, max_length=L), weights)
    msg = str(err.value)
    assert f"cluster_00{long} (train)" in msg and f"cluster_00{long} (eval)" in msg
    assert "cluster_000 (train)" not in msg, "a domain the mixture never draws is not probed for training"
    assert "cluster_000 (eval)" in msg, "every domain is evaluated, so every eval split is probed"
    assert f"cluster_00{short}" not in msg
    assert _suggested(msg) >= starts[long]  # (the image domain's eval answers need more)
    probe_domains(domains, Encoder(processor, max_length=_suggested(msg)), weights)


def test_the_stream_still_stops_a_domain_that_starves_later():
    starved = _Starved(max_length=30)
    for _ in range(15):
        starved.check(8, {"label_tokens": None, "answer_starts": 41})
    with pytest.raises(DataError, match=r"none of the last 128 training samples .* set data.max_length >= 41"):
        starved.check(8, {"label_tokens": None, "answer_starts": 41})


def test_an_eval_domain_without_tokens_shows_as_na_instead_of_vanishing():
    line = format_eval(20, ["a", "b", "c"], {"loss": 1.5, "loss_per_domain": [1.0, None, 2.0]})
    assert line == "eval @ 20: mixture 1.5000 | a=1.000 b=n/a c=2.000"
