"""Balance inside transformers.Trainer and TRL's SFTTrainer: p moves, checkpoints hold it, resume is exact."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rbvl.balance import Balancer
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
    assert [s for s, _ in state["balancer"]["history"]] == [10]
    assert (ckpt / TRACKER_STATE).exists()

    (tmp_path / "resumed").mkdir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-15")
    resumed = main(["--output-dir", str(tmp_path / "resumed"), "--max-steps", "30", "--save-steps", "15", "--resume"])
    assert resumed.balancer.history == full.balancer.history
    assert resumed.proportions == full.proportions


def test_sampler_draws_by_p_and_replays():
    domains = np.array([0] * 50 + [1] * 30 + [2] * 20)
    bal = Balancer(3, update_every=1)
    bal.history = [(1, [0.7, 0.1, 0.2])]  # applies from step 3 (lag 1)
    bal.lag = 1
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


def test_collator_takes_the_domain_column_out():
    seen = []

    def user_collator(features):
        seen.extend(features)
        return {"input_ids": torch.tensor([f["x"] for f in features])}

    batch = DomainCollator(user_collator, "domain")([{"x": 1, "domain": 2}, {"x": 3, "domain": 0}])
    assert batch["domain_ids"].tolist() == [2, 0] and all("domain" not in f for f in seen)
    with pytest.raises(KeyError, match="no 'domain' column"):
        DomainCollator(user_collator, "domain")([{"x": 1}])
