"""Balance against slow, obvious references: per-domain backward passes, explicit dot products, the formula."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rbvl.balance import Balancer, GradientTracker, gram, update_proportions, update_proportions_with_info

DOMAINS = torch.tensor([0, 2, 0, 2, 2, 0])  # domain 1 absent


def tiny_lora(seed=0, modules_to_save=None):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=modules_to_save),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # zero at init; moved so lora_A gets gradients too
    return model


def batch(n=6, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # right padding of varying length
        mask[i, t - i :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def loss_fn(model, ids, mask, labels, keep=None, norm=50.0):
    """Sum of token CE / a fixed normaliser, optionally only over the samples in `keep`."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    ).sum(1)  # (B,)
    if keep is not None:
        ce = ce * keep
    return ce.sum() / norm


def reference(model, tracker, ids, mask, labels, m=3):
    """(m, P) gradient sums from one separate backward pass per domain."""
    rows = []
    tracker.enabled = False
    frozen = [mod.weight for _, mod in tracker.modules if not mod.weight.requires_grad]
    for w in frozen:  # a tracked layer may be frozen (a base model's head): its gradient is still defined
        w.requires_grad_(True)
    for d in range(m):
        model.zero_grad()
        loss_fn(model, ids, mask, labels, keep=(DOMAINS == d).float()).backward()
        rows.append(
            torch.cat(
                [
                    mod.weight.grad.flatten() if mod.weight.grad is not None else torch.zeros(mod.weight.numel())
                    for _, mod in tracker.modules
                ]
            )
        )
    for w in frozen:
        w.requires_grad_(False)
    tracker.enabled = True
    model.zero_grad()
    return torch.stack(rows)


def tracked_sums(tracker):
    return tracker.domain_grads() * tracker.counts.float().clamp(min=1)[:, None]


@pytest.mark.parametrize("params", ["lora", "head", [r"layers\.1\.mlp\.down_proj$", r"lora_A"]])
def test_domain_grads_equal_per_domain_backward(params):
    model = tiny_lora(modules_to_save=["lm_head"] if params == "head" else None)
    tracker = GradientTracker(model, 3, params=params)
    ids, mask, labels = batch()
    expected = reference(model, tracker, ids, mask, labels)
    tracker.set_domains(DOMAINS)
    loss_fn(model, ids, mask, labels).backward()
    torch.testing.assert_close(tracked_sums(tracker), expected, rtol=1e-4, atol=1e-6)
    assert tracker.counts.tolist() == [3, 0, 3]
    assert torch.all(tracker.domain_grads()[1] == 0)
    # and the domains add up to the ordinary gradient
    total = torch.cat(
        [
            mod.weight.grad.flatten() if mod.weight.grad is not None else torch.zeros(mod.weight.numel())
            for _, mod in tracker.modules
        ]
    )
    if params == "lora":
        torch.testing.assert_close(tracked_sums(tracker).sum(0), total, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_sums_micro_batches():
    model = tiny_lora()
    tracker = GradientTracker(model, 3)
    ids, mask, labels = batch()
    expected = reference(model, tracker, ids, mask, labels)
    for half in (slice(0, 3), slice(3, 6)):
        tracker.set_domains(DOMAINS[half])
        loss_fn(model, ids[half], mask[half], labels[half]).backward()
    torch.testing.assert_close(tracked_sums(tracker), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    model = tiny_lora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    tracker = GradientTracker(model, 3)
    ids, mask, labels = batch()
    expected = reference(model, tracker, ids, mask, labels)
    tracker.set_domains(DOMAINS)
    loss_fn(model, ids, mask, labels).backward()
    torch.testing.assert_close(tracked_sums(tracker), expected, rtol=1e-4, atol=1e-6)


def test_head_of_a_llava_includes_the_projector_per_image():
    from test_model import batch as llava_batch

    from rbvl.config import LoraConfig as RbvlLora
    from rbvl.config import ModelConfig
    from rbvl.model import apply_lora, load_model

    model, processor = load_model(ModelConfig())
    model = apply_lora(model, RbvlLora(lora_dropout=0.0, modules_to_save=["multi_modal_projector", "lm_head"]))
    tracker = GradientTracker(model, 2, params="head")
    assert any("multi_modal_projector" in n for n in tracker.tracked_names)
    inputs = llava_batch(processor)  # sample 0 has the image, sample 1 is text only
    domains = torch.tensor([1, 0])
    rows = []
    tracker.enabled = False
    for d in range(2):
        model.zero_grad()
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
        ce = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], reduction="none"
        ).sum(1)
        ((ce * (domains == d)).sum() / 10).backward()
        rows.append(torch.cat([mod.weight.grad.flatten() for _, mod in tracker.modules]))
    tracker.enabled = True
    model.zero_grad()
    tracker.set_domains(domains, image_domain_ids=domains[:1])
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], reduction="none"
    ).sum(1)
    (ce.sum() / 10).backward()
    torch.testing.assert_close(tracked_sums(tracker), torch.stack(rows), rtol=1e-4, atol=1e-6)


def test_tracker_bookkeeping():
    model = tiny_lora()
    tracker = GradientTracker(model, 3)
    ids, mask, labels = batch()
    assert tracker.flops_per_token() == sum(2 * mod.weight.numel() for _, mod in tracker.modules)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tracker.set_domains([0, 3])
    tracker.set_domains(DOMAINS)
    loss_fn(model, ids, mask, labels).backward()
    state = tracker.state_dict()
    other = GradientTracker(tiny_lora(), 3)
    other.load_state_dict(state)
    torch.testing.assert_close(other.domain_grads(), tracker.domain_grads())
    tracker.enabled = False
    before = tracker.domain_grads().clone()
    tracker.set_domains(DOMAINS)
    loss_fn(model, ids, mask, labels).backward()
    torch.testing.assert_close(tracker.domain_grads(), before)
    tracker.reset()
    assert tracker.counts.sum() == 0 and tracker.domain_grads().abs().sum() == 0
    tracker.remove()
    assert all(not mod._forward_hooks for _, mod in tracker.modules)
    fresh_model = tiny_lora()
    GradientTracker(fresh_model, 3)
    with pytest.raises(RuntimeError, match="set_domains"):
        loss_fn(fresh_model, ids, mask, labels)


def test_gram_is_the_dot_products():
    g = torch.randn(4, 50)
    G = gram(g)
    for i in range(4):
        for j in range(4):
            assert math.isclose(
                G[i, j].item(), sum(g[i, k].item() * g[j, k].item() for k in range(50)), rel_tol=1e-5, abs_tol=1e-5
            )


def test_update_follows_the_formula():
    G = torch.tensor([[2.0, 0.5, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 3.0]])
    q = torch.tensor([0.5, 0.3, 0.2])
    gq = [sum(G[i, j].item() * q[j].item() for j in range(3)) for i in range(3)]
    norm = math.sqrt(sum(x * x for x in gq))
    e = [math.exp(3.0 * x / norm) for x in gq]
    expected = [x / sum(e) for x in e]
    p = update_proportions(G, q, lam=3.0)
    assert p.tolist() == pytest.approx(expected, rel=1e-9)
    assert update_proportions(G, None, lam=0.0).tolist() == pytest.approx([1 / 3] * 3)


def test_update_stays_on_the_simplex():
    gen = torch.Generator().manual_seed(0)
    for i in range(200):
        m = 2 + i % 7
        a = torch.randn(m, 5, generator=gen)
        G = a @ a.T if i % 2 else (lambda s: s + s.T)(torch.randn(m, m, generator=gen))
        q = torch.rand(m, generator=gen)
        p = update_proportions(G, q, lam=float(1 + i % 5))
        assert torch.isfinite(p).all() and (p >= 0).all() and abs(p.sum().item() - 1) < 1e-9


def test_degenerate_cases():
    p, info = update_proportions_with_info(torch.zeros(3, 3), None, 3.0)
    assert p.tolist() == pytest.approx([1 / 3] * 3) and info["degenerate"]
    prev = [0.5, 0.3, 0.2]
    p, info = update_proportions_with_info(torch.zeros(3, 3), None, 3.0, prev=prev)
    assert p.tolist() == pytest.approx(prev)
    G = torch.tensor([[1.0, 0.0, 0.2], [0.0, 0.0, 0.0], [0.2, 0.0, 1.0]])  # domain 1 unseen
    p, info = update_proportions_with_info(G, None, 3.0)
    assert info["unseen"] == [1] and 0 < p[1] < 1 and abs(p.sum() - 1) < 1e-9
    p, info = update_proportions_with_info(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), None, 3.0)
    assert info["degenerate"] and torch.isfinite(p).all()
    # the target only on a domain whose gradient is orthogonal to everything seen: G q = 0
    G = torch.diag(torch.tensor([1.0, 0.0, 1.0]))
    p, info = update_proportions_with_info(G, [0.0, 1.0, 0.0], 3.0)
    assert info["degenerate"] and p.tolist() == pytest.approx([1 / 3] * 3)
    # floor and smoothing
    G = torch.diag(torch.tensor([10.0, 0.0, 0.0]))
    assert update_proportions(G, None, 50.0, floor=0.1).min() >= 0.1 - 1e-9
    new = update_proportions(G, None, 3.0)
    smooth = update_proportions(G, None, 3.0, prev=[1 / 3] * 3, smoothing=0.25)
    torch.testing.assert_close(smooth, 0.75 * new + 0.25 / 3)


class FakeTracker:
    def __init__(self, grads):
        self.grads, self.counts, self.resets, self.syncs = grads, torch.ones(len(grads)), 0, 0

    def domain_grads(self):
        return self.grads

    def reset(self):
        self.resets += 1

    def sync(self):
        self.syncs += 1


def test_balancer_schedule_and_state():
    tracker = FakeTracker(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))
    bal = Balancer(3, target=[1.0, 0.0, 0.0], update_every=5, lam=3.0, warmup_steps=3, lag=2)
    updates = [s for s in range(1, 21) if bal.step(s, tracker) is not None]
    assert updates == [8, 13, 18]
    assert tracker.resets == 4 and tracker.syncs == 3  # warmup boundary + each update
    p = bal.proportions
    assert p[0] > p[2] and p[1] > p[2], "domains aligned with the target gain"
    assert bal.proportions_at(10) == pytest.approx([1 / 3] * 3)  # update at 8 applies from step 11
    assert bal.proportions_at(11) == bal.history[0][1]
    other = Balancer(3, update_every=5)
    other.load_state_dict(bal.state_dict())
    assert other.history == bal.history and other.proportions == bal.proportions
