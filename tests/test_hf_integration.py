"""Balance inside transformers.Trainer and TRL's SFTTrainer: p moves, checkpoints hold it, resume is exact."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rbvl.balance import Balancer, ProportionSchedule, label_tokens
from rbvl.integrations.hf import BALANCE_STATE, TRACKER_STATE, DomainCollator, DomainSampler

RECIPES = Path(__file__).parents[1] / "recipes"


def example(name):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_trainer_example", "trl_sft_example"])
def test_example_moves_p_and_resumes_exactly(tmp_path, name):
    main = example(name).main
    full = main(["--output-dir", str(tmp_path / "full"), "--max-steps", "30", "--save-steps", "15"])
    p = full.proportions
    assert abs(sum(p) - 1) < 1e-9 and max(abs(x - 1 / 3) for x in p) > 0.02, p
    ckpt = tmp_path / "full" / "checkpoint-15"
    state = json.loads((ckpt / BALANCE_STATE).read_text())
    lag = full.balancer.schedule.lag
    assert state["balancer"]["schedule"]["applies_from"] == [0, 10 + 1 + lag]  # one update, at step 10
    assert (ckpt / TRACKER_STATE.format(0)).exists()
    logged = [row for row in full.state.log_history if "balance/p_l1_change" in row]
    assert logged, "each update's diagnostics reach the Trainer's log (and so report_to)"
    assert {f"balance/{k}_{i}" for k in ("grad_norm", "alignment") for i in range(3)} <= set(logged[0])
    assert len(logged) <= len([r for r in full.state.log_history if "loss" in r]), "once per update, on a log line"

    (tmp_path / "resumed").mkdir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-15")
    resumed = main(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "30", "--save-steps", "15", "--resume"])
    assert resumed.balancer.schedule.history() == full.balancer.schedule.history()
    assert resumed.proportions == full.proportions

    # a checkpoint two processes wrote (a part of the window each), resumed by one: refused, not half the window
    (tmp_path / "two").mkdir()
    shutil.copytree(ckpt, tmp_path / "two" / "checkpoint-15")
    shutil.copy(ckpt / TRACKER_STATE.format(0), tmp_path / "two" / "checkpoint-15" / TRACKER_STATE.format(1))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1: .* --nproc_per_node=2"):
        main(["--output-dir", str(tmp_path / "two"), "--max-steps", "30", "--save-steps", "15", "--resume"])


def test_sampler_draws_by_p_and_replays():
    domains = np.array([0] * 50 + [1] * 30 + [2] * 20)
    bal = Balancer(3, update_every=1, schedule=ProportionSchedule(3, lag=1))
    bal.schedule.publish([0.7, 0.1, 0.2], after_step=1)  # applies from step 3 (lag 1)
    sampler = DomainSampler(domains, bal, unit=40, seed=0)
    sampler.steps_per_epoch = 30
    indices = list(sampler)
    assert indices == list(sampler), "the same indices on every pass (resume replays them)"
    steps = np.array(indices).reshape(30, 40)
    first = domains[steps[:2]].ravel()  # steps 1-2: uniform
    later = domains[steps[2:]].ravel()
    counts = np.bincount(later, minlength=3)
    expected = np.array([0.7, 0.1, 0.2]) * len(later)
    assert np.all(np.abs(counts - expected) < 4.5 * np.sqrt(expected)), counts
    assert np.all(np.abs(np.bincount(first, minlength=3) - 80 / 3) < 4.5 * np.sqrt(80 / 3))


def test_sampler_refuses_unknown_domains():
    with pytest.raises(ValueError, match=r"domain id\(s\) \[2\]"):
        DomainSampler(np.array([0, 1, 1]), Balancer(3), unit=2, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# The user's collator, as it is
# ---------------------------------------------------------------------------------------------------------------------


def token_examples():
    """Three tokenized examples with a `domain` column, the way `datasets.map(tokenize)` leaves them."""
    return [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 7, 8], "domain": 2},
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6], "domain": 0},
        {"input_ids": [9, 9, 9], "attention_mask": [1, 1, 1], "labels": [-100, 9, 9], "domain": 1},
    ]


def user_collators():
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rbvl.model import tiny

    tok = tiny.build("tiny-llava")[1].tokenizer

    def strip_labels(collator):  # DataCollatorWithPadding pads what the tokenizer knows: no ragged labels
        return lambda feats: collator([{k: v for k, v in f.items() if k != "labels"} for f in feats])

    def forwards_the_column(feats):  # a hand-written collator that reads the domain column and passes it on
        width = max(len(f["input_ids"]) for f in feats)
        return {
            "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in feats]),
            "domain": torch.tensor([f["domain"] for f in feats]),
        }

    return {
        "DataCollatorWithPadding": strip_labels(DataCollatorWithPadding(tok)),
        "DataCollatorForSeq2Seq": DataCollatorForSeq2Seq(tok),
        "trl DataCollatorForLanguageModeling": DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
        "custom, forwards the column": forwards_the_column,
    }


@pytest.mark.parametrize("name", list(user_collators()))
def test_users_collator_gets_the_examples_unchanged(name):
    collator = user_collators()[name]
    seen = []

    def spy(features):
        seen.extend(features)
        return collator(features)

    batch = DomainCollator(spy, "domain")(token_examples())
    assert [f["domain"] for f in seen] == [2, 0, 1], "the examples reach the user's collator as they are"
    assert batch["domain_ids"].tolist() == [2, 0, 1]
    # numpy, which the Trainer leaves on the CPU: the tracker reads them without waiting for the GPU
    assert isinstance(batch["domain_ids"], np.ndarray)
    if "labels" in batch:  # counted where the labels are still on the CPU
        assert isinstance(batch["label_tokens"], np.ndarray)
        assert batch["label_tokens"].tolist() == label_tokens(batch["labels"]).tolist()
    assert "domain" not in batch, "the model never sees the domain column"
    assert batch["input_ids"].shape[0] == 3


def test_collator_names_a_missing_domain_column():
    with pytest.raises(KeyError, match="example 1 of the batch has no 'domain' column"):
        DomainCollator(lambda f: {}, "domain")([{"x": 1, "domain": 0}, {"x": 1}])


def test_collator_that_drops_examples_or_packs_them():
    """A collator that drops an example says which rows it kept (`domain_ids` in its batch, as rbvl's Encoder's info
    has them); one that drops or packs without saying is an error, as is one that keeps nothing."""
    feats = token_examples()

    def drops_first(features, say):
        batch = pad_collate(features[1:])
        return {**batch, "domain_ids": torch.tensor([f["domain"] for f in features[1:]])} if say else batch

    batch = DomainCollator(lambda f: drops_first(f, True), "domain")(feats)
    assert batch["domain_ids"].tolist() == [0, 1] and isinstance(batch["domain_ids"], np.ndarray)
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match=r"returned 2 row\(s\) for 3 examples.*'domain_ids'.*padding_free"):
        DomainCollator(lambda f: drops_first(f, False), "domain")(feats)
    packed = lambda f: {"input_ids": torch.ones(1, 9, dtype=torch.long), "labels": torch.ones(1, 9, dtype=torch.long)}  # noqa: E731
    with pytest.raises(ValueError, match=r"returned 1 row\(s\) for 3 examples"):
        DomainCollator(packed, "domain")(feats)
    with pytest.raises(ValueError, match="returned no batch for 3 examples"):
        DomainCollator(lambda f: None, "domain")(feats)
    two_ids = lambda f: {**pad_collate(f), "domain_ids": torch.tensor([0, 1])}  # noqa: E731
    with pytest.raises(ValueError, match=r"returned 2 'domain_ids' for the 3 row\(s\) of its batch: one per row"):
        DomainCollator(two_ids, "domain")(feats)
    out_of_range = lambda f: {**pad_collate(f), "domain_ids": torch.full((3,), 7)}  # noqa: E731
    assert DomainCollator(out_of_range, "domain")(feats)["domain_ids"].tolist() == [7] * 3, "an eval set may"
    evals = [{k: v for k, v in f.items() if k != "domain"} for f in feats]  # an eval set needs no domain column
    assert "domain_ids" not in DomainCollator(pad_collate, "domain")(evals)


def tiny_trainer(tmp_path, train_dataset, n_domains=3, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from rbvl.integrations.hf import BalanceTrainer

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1,
    )  # fmt: skip
    return BalanceTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=pad_collate, n_domains=n_domains, **kw
    )


def relabel(rows, value, every=3):
    return [{**r, "domain": value} if i % every == 0 else r for i, r in enumerate(rows)]


@pytest.mark.parametrize(
    "make, n_domains, error, message",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "domain"} for r in rows], 3, KeyError,
         "train example 0 has no 'domain' column"),
        (lambda rows: relabel(rows, 3), 3, ValueError, r"train example 0 has domain id 3 in 'domain', outside 0..2 "
         r"\(n_domains=3\); 8 of 24 are outside"),
        (lambda rows: relabel(rows, -1), 3, ValueError, "train example 0 has domain id -1"),
        (lambda rows: rows, 2, ValueError, r"train example 16 has domain id 2 in 'domain', outside 0..1"),
        (lambda rows: relabel(rows, "mul"), 3, ValueError, "must be an integer 0..m-1, got 'mul' .*in the order target lists them"),
        (lambda rows: relabel(rows, 2.7), 3, ValueError, "must be an integer 0..m-1, got 2.7"),
        (lambda rows: relabel(rows, True), 3, ValueError, "must be an integer 0..m-1, got True"),
        (lambda rows: rows, "3", ValueError, "n_domains must be an int >= 1"),
    ],
)  # fmt: skip
def test_trainer_refuses_bad_domain_ids_before_training(tmp_path, make, n_domains, error, message):
    """Out-of-range ids were never drawn and the rest trained silently; names and fractions failed deep in numpy."""
    with pytest.raises(error, match=message):
        tiny_trainer(tmp_path, make(length_examples()), n_domains)


def test_trainer_refuses_what_it_cannot_balance(tmp_path, caplog):
    from datasets import Dataset

    rows = length_examples()
    ds = Dataset.from_list(rows)
    with pytest.raises(KeyError, match=r"the train dataset has no 'cluster' column .*its columns: \['input_ids'"):
        tiny_trainer(tmp_path, ds, domain_column="cluster")
    assert tiny_trainer(tmp_path, ds)._train_domains[1].tolist() == [r["domain"] for r in rows]
    with pytest.raises(ValueError, match="an iterable train dataset cannot be drawn by domain proportions"):
        tiny_trainer(tmp_path, ds.to_iterable_dataset())
    with pytest.raises(ValueError, match=r"target has 2 shares for 3 domains"):
        tiny_trainer(tmp_path, rows, target=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"target shares must be finite and >= 0"):
        tiny_trainer(tmp_path, rows, target=[1.5, -0.5, 0.0])
    with pytest.raises(ValueError, match=r"target: a list of 3 shares, one per domain id in order, got dict"):
        tiny_trainer(tmp_path, rows, target={"add": 0.5, "mul": 0.5})
    with caplog.at_level("WARNING"):
        tiny_trainer(tmp_path, rows, balance={"floor": 0.4})
        assert "floor 0.4 >= 1/m (m = 3 domains) holds every share at 1/m" in caplog.text
        tiny_trainer(tmp_path, rows, balance={"update_every": 50}).train()
        assert "no Balance update falls in this run (2 steps; the first comes after step 50" in caplog.text


def test_trainer_names_misuse_in_one_line(tmp_path):
    """A misspelled argument, the mixin after the Trainer in the bases, TRL's packing: each said plainly, where the
    Trainer would say 'unexpected keyword argument' or blame the dataset's columns."""
    from transformers import Trainer

    from rbvl.integrations.hf import BalanceMixin, refuse_packing

    rows = length_examples()
    with pytest.raises(TypeError, match=r"unexpected argument 'domain_colum'; did you mean 'domain_column'\?"):
        tiny_trainer(tmp_path, rows, domain_colum="domain")
    with pytest.raises(TypeError, match=r"class Mine: put BalanceMixin first .*class Mine\(BalanceMixin, Trainer\)"):

        class Mine(Trainer, BalanceMixin):
            pass

    class Fine(BalanceMixin, Trainer):
        pass

    from rbvl.integrations.hf import BalanceTrainer

    class Subclassed(BalanceTrainer):  # the usual way to override compute_loss or log
        pass

    class Again(Subclassed):
        pass

    for name in ("packing", "padding_free"):
        with pytest.raises(ValueError, match=rf"{name}=True is not supported: .*set {name}=False"):
            refuse_packing(SimpleNamespace(**{name: True}))
    refuse_packing(SimpleNamespace(packing=False))


def test_trainer_takes_the_domains_given_instead_of_reading_every_example(tmp_path):
    """`train_domains=`: a torch Dataset whose items are costly (they decode images) is not read at start."""
    rows = length_examples()

    class Costly(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            Costly.reads += 1
            return rows[i]

    ids = [r["domain"] for r in rows]
    trainer = tiny_trainer(tmp_path, Costly(), train_domains=ids)
    assert Costly.reads == 0 and trainer._train_domains[1].tolist() == ids
    trainer.train()
    assert Costly.reads <= 3 * 4 < len(rows), "only what two steps draw is read (and one batch fetched ahead)"
    with pytest.raises(ValueError, match="train_domains has 3 domain ids for the 24 train examples"):
        tiny_trainer(tmp_path, Costly(), train_domains=[0, 1, 2])
    with pytest.raises(ValueError, match="train example 0 has domain id 5 in 'train_domains', outside 0..2"):
        tiny_trainer(tmp_path, Costly(), train_domains=[5] * len(rows))


def test_a_collators_own_ids_out_of_range_stop_training_not_evaluation(tmp_path):
    """Its ids are the collator's own (the dataset's were checked when built): out of range, training names the
    collator; an eval set's batch may hold other domains."""
    rows = length_examples()

    def own_ids(features):
        return {**pad_collate(features), "domain_ids": torch.full((len(features),), 7)}

    trainer = tiny_trainer(tmp_path, rows, eval_dataset=rows[:4])
    trainer.data_collator.collator = own_ids
    assert trainer.evaluate()["eval_loss"] > 0
    with pytest.raises(ValueError, match=r"the collator's 'domain_ids' hold 7, outside 0..2 \(n_domains=3\)"):
        trainer.train()


def test_a_second_train_call_starts_balance_over(tmp_path):
    """train() again without resuming is a new run: p from the start, an empty window, as a fresh trainer's."""
    rows = length_examples()
    first = tiny_trainer(tmp_path, rows, balance={"update_every": 1})
    first.train()
    assert len(first.balancer.schedule.history()) == 3  # the initial p and one per step
    steps = [start for start, _ in first.balancer.schedule.history()]
    first.train()  # before: its updates were published after the first run's, for earlier steps
    history = first.balancer.schedule.history()
    assert [start for start, _ in history] == steps, "the initial p, then this run's own two, from the same steps"


def test_trainer_reads_ids_as_users_hold_them(tmp_path):
    """A datasets int column in any format (read from Arrow), digit strings (a CSV), a dataset set after __init__, the
    arguments given by position, an eval set whose ids are never used, a torch IterableDataset with a length."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from rbvl.integrations.hf import BalanceTrainer

    rows = length_examples()
    ids = [r["domain"] for r in rows]
    for fmt in (None, "numpy", "torch"):
        ds = Dataset.from_list(rows).with_format(fmt)
        assert tiny_trainer(tmp_path, ds)._train_domains[1].tolist() == ids, fmt
    assert tiny_trainer(tmp_path, relabel(rows, "1", every=1))._train_domains[1].tolist() == [1] * len(rows)

    trainer = tiny_trainer(tmp_path, rows, eval_dataset=relabel(rows[:4], -1, every=1))
    trainer.train_dataset = rows[::5]  # set after __init__ (5 rows, 3 domains): its own ids, not the cached ones
    assert max(trainer._get_train_sampler()) < 5
    assert trainer.evaluate()["eval_loss"] > 0, "an eval set's ids are never used: -1 is no error there"

    positional = tiny_trainer(tmp_path, rows)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    assert args.remove_unused_columns
    positional.tracker.remove()  # its model, tracked afresh by the next one
    again = BalanceTrainer(positional.model, args, pad_collate, rows, n_domains=3)
    assert not again.args.remove_unused_columns, "by position too: the domain column must reach the collator"

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

        def __len__(self):
            return len(rows)

    with pytest.raises(ValueError, match="an iterable train dataset cannot be drawn by domain proportions"):
        tiny_trainer(tmp_path, Stream())


def test_resume_with_other_domains_is_refused():
    saved = ProportionSchedule(3, lag=1)
    saved.publish([0.5, 0.3, 0.2], after_step=4)
    with pytest.raises(ValueError, match="saved for 3 domains; this run has 2"):
        ProportionSchedule(2, lag=1).load_state_dict(saved.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# g_i through the Trainer: the gradient of each domain's token-mean loss, whatever the normaliser
# ---------------------------------------------------------------------------------------------------------------------

ANSWERS = {0: 2, 1: 6, 2: 12}  # label tokens per example, by domain


def length_examples():
    """One example per domain repeated: every draw of a domain is the same example, so the token-mean gradient of
    the window is that example's own token-mean gradient, whatever the sampler drew."""
    rows = []
    for d, n in ANSWERS.items():
        ids = [(7 * d + 3 * t) % 120 + 4 for t in range(4 + n)]
        rows += [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 4 + ids[4:], "domain": d}] * 8
    return rows


def pad_collate(features):
    width = max(len(f["input_ids"]) for f in features)
    pad = lambda key, v: [f[key] + [v] * (width - len(f[key])) for f in features]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad("input_ids", 0)),
        "attention_mask": torch.tensor(pad("attention_mask", 0)),
        "labels": torch.tensor(pad("labels", -100)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_trainer_window_holds_token_mean_gradients(tmp_path, grad_accum):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from rbvl.integrations.hf import BalanceTrainer

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        learning_rate=0.0,  # the weights stay put, so each domain's reference gradient is one fixed vector
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=1,
    )
    trainer = BalanceTrainer(
        model=model,
        args=args,
        train_dataset=length_examples(),
        data_collator=pad_collate,
        n_domains=3,
        balance={"update_every": 100},  # no update: the window stays in the tracker
    )
    trainer.train()
    tracker = trainer.tracker
    tokens = tracker.tokens
    for d, n in ANSWERS.items():
        assert tokens[d] % n == 0, "each draw adds its example's label tokens"
    tracker.enabled = False
    weights = [mod.weight for _, mod in tracker.modules]
    seen = [d for d in range(3) if tokens[d] > 0]
    assert len(seen) >= 2
    got = tracker.domain_grads()
    for d in seen:
        example = pad_collate([length_examples()[8 * d]])
        logits = model(input_ids=example["input_ids"], attention_mask=example["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1], example["labels"][0, 1:], ignore_index=-100, reduction="mean"
        )  # this domain's token-mean loss
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)])
        torch.testing.assert_close(got[d], expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded models: accelerate's FSDP2 on 2 gloo ranks; DeepSpeed ZeRO-3 refused
# ---------------------------------------------------------------------------------------------------------------------


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_trainer_under_accelerate_fsdp2_matches_ddp_and_resumes_exactly(tmp_path):
    """recipes/hf_trainer_example.py on 2 gloo ranks, one example per micro-batch, under FSDP2 and under DDP: text-only
    and image micro-batches meet on the two ranks, and the text-only rank runs the vision tower on the dummy image
    (else the image rank waits in a vision layer's all-gather: the timeout bounds that). The ranks' adapters start
    different and two optimizer steps see no image on any rank (tests/dist_hf_fsdp_worker.py): FSDP2 trains DDP's run
    all the same (rank 0's adapters; the vision side's zero gradients dropped), so p and the losses agree to float
    rounding. Resumed from checkpoint-10 (Trainer's FSDP checkpoint + the Balance files), the run ends where the
    uninterrupted one did."""
    worker = str(Path(__file__).parent / "dist_hf_fsdp_worker.py")
    example_args = ["--max-steps", "20", "--save-steps", "10", "--batch-size", "1"]

    def run(name, mode, *extra):
        r = torchrun(worker, str(tmp_path / f"{name}.json"), mode, "--output-dir", str(tmp_path / name), *example_args, *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text())

    full = run("full", "fsdp")
    assert full["fsdp"] and [rank["param_type"] for rank in full["ranks"]] == ["DTensor", "DTensor"]
    assert all(rank["dummy_runs"] > 0 for rank in full["ranks"]), "each rank had text-only micro-batches"
    dropped = [rank["dropped"] for rank in full["ranks"]]
    assert dropped[0] == dropped[1] >= 2, "the text-only steps drop the vision side's zero gradients on every rank"
    p = full["ranks"][0]["proportions"]
    assert full["ranks"][1]["proportions"] == p, "the window is summed over ranks: one p"
    assert abs(sum(p) - 1) < 1e-9 and max(abs(x - 1 / 3) for x in p) > 0.05, p
    assert len(full["history"]) == 3, "updates at steps 10 and 20"

    ddp = run("ddp", "ddp")
    assert not ddp["fsdp"] and [rank["param_type"] for rank in ddp["ranks"]] == ["Parameter", "Parameter"]
    assert [step for step, _ in ddp["history"]] == [step for step, _ in full["history"]]
    for (_, q_ddp), (_, q_fsdp) in zip(ddp["history"], full["history"]):
        assert max(abs(a - b) for a, b in zip(q_ddp, q_fsdp)) < 1e-6, (q_ddp, q_fsdp)
    assert len(ddp["losses"]) == len(full["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(ddp["losses"], full["losses"])) < 1e-5, (ddp["losses"], full["losses"])
    assert max(abs(a - b) / a for a, b in zip(ddp["grad_norms"], full["grad_norms"])) < 1e-5

    ckpt = tmp_path / "full" / "checkpoint-10"
    assert {BALANCE_STATE, TRACKER_STATE.format(0), TRACKER_STATE.format(1)} <= {f.name for f in ckpt.iterdir()}
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-10")
    resumed = run("resumed", "fsdp", "--resume")
    assert resumed["steps"] == 20
    assert resumed["history"] == full["history"]
    assert resumed["ranks"][0]["proportions"] == p
    assert resumed["losses"] == full["losses"], "the steps after the checkpoint train the same batches the same way"


def test_zero3_is_refused_at_start(monkeypatch, tmp_path):
    """deepspeed is not installed here: the detection is patched. Stage 3 from TrainingArguments(deepspeed=...) is
    refused before the Trainer is built, stage 3 from an accelerate config once it is; stage 2 passes. So is one
    process that sees several GPUs (the Trainer's nn.DataParallel)."""
    import transformers.integrations
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from rbvl.integrations.hf import BalanceTrainer, refuse_zero3

    base = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    build = lambda: BalanceTrainer(  # noqa: E731
        model=model, args=args, train_dataset=length_examples(), data_collator=pad_collate, n_domains=3
    )
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"^BalanceTrainer does not run under DeepSpeed ZeRO-3; shard with FSDP2"):
        build()
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: False)
    assert build().tracker.modules, "ZeRO off: the tracker holds the adapters"
    with monkeypatch.context() as patched:  # one process that sees two GPUs: the Trainer would use nn.DataParallel
        patched.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
        with pytest.raises(ValueError, match=r"nn\.DataParallel.*torchrun --nproc_per_node=2"):
            build()
        with pytest.raises(ValueError, match=r"nn\.DataParallel"):  # the arguments given by position
            BalanceTrainer(model, args, train_dataset=length_examples(), data_collator=pad_collate, n_domains=3)

    def accelerator(stage):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    with pytest.raises(ValueError, match="ZeRO-3"):
        refuse_zero3(accelerator(3))
    refuse_zero3(accelerator(2))
    refuse_zero3(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))


def test_rbvl_train_refuses_an_accelerate_zero3_config(monkeypatch, tmp_path):
    """`accelerate launch` exports its DeepSpeed config to the processes: stage 3 (named, or in the config file) stops
    `rbvl train` before the run folder is touched; no DeepSpeed, or stage 2, passes the check."""
    from rbvl.config import ConfigError, load_config
    from rbvl.runtime.distributed import refuse_zero3
    from rbvl.train import train

    refuse_zero3()  # no accelerate launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    refuse_zero3()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^rbvl train does not run under DeepSpeed ZeRO-3 .*train.parallel=fsdp"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    config_file = tmp_path / "ds.json"
    config_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config_file))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        refuse_zero3()
