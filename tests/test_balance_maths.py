"""Balance against slow, obvious references: per-domain token-mean losses by plain autograd, explicit dot products,
the update formula by hand. Domains differ where users' data differ: answer lengths, batch mixes, images."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rbvl.balance import (
    Balancer,
    GradientTracker,
    ProportionSchedule,
    gram,
    label_tokens,
    update_proportions,
    update_proportions_with_info,
)
from rbvl.model.families import head_patterns

M = 3
VOCAB = 128


def tiny_lora(seed=0, modules_to_save=None, tie=False, dropout=0.0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout, modules_to_save=modules_to_save),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # zero at init; moved so lora_A gets gradients too
    return model


# Answer length by domain: domain 0 answers in 2 tokens, domain 1 in 5, domain 2 in 11 (prompt 4 tokens each).
ANSWER = {0: 2, 1: 5, 2: 11}


def micro_batch(domains, seed):
    """A right-padded batch whose samples of domain d have a 4-token prompt (unlabelled) and ANSWER[d] labels."""
    g = torch.Generator().manual_seed(seed)
    width = 4 + max(ANSWER[d] for d in domains)
    ids = torch.randint(0, VOCAB, (len(domains), width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, d in enumerate(domains):
        n = 4 + ANSWER[d]
        mask[i, :n] = 1
        labels[i, 4:n] = ids[i, 4:n]
    return ids, mask, labels, torch.tensor(domains)


WINDOW = [micro_batch([0, 2, 0, 1], 1), micro_batch([2, 2, 0], 2), micro_batch([0, 0, 0, 0, 2], 3)]


def token_losses(model, ids, mask, labels):
    """(B,) summed next-token cross-entropy of each sample's label tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )  # (B, T-1)
    return ce.sum(1)


def tracked_weights(tracker):
    return [mod.weight for _, mod in tracker.modules]


def reference(model, tracker, window, m=M):
    """(m, P): each domain's token-mean loss gradient over the window, by plain autograd, one domain at a time."""
    tracker.enabled = False
    weights = tracked_weights(tracker)
    frozen = [w for w in weights if not w.requires_grad]
    for w in frozen:  # a tracked layer may be frozen (a base model's head): its gradient is still defined
        w.requires_grad_(True)
    rows = []
    for d in range(m):
        tokens = sum(int(label_tokens(lab)[dom == d].sum()) for _, _, lab, dom in window)
        if tokens == 0:
            rows.append(torch.zeros(sum(w.numel() for w in weights)))
            continue
        loss = sum((token_losses(model, ids, mask, lab) * (dom == d)).sum() for ids, mask, lab, dom in window) / tokens
        model.zero_grad()
        for w in weights:
            w.grad = None
        loss.backward()  # not autograd.grad: reentrant checkpointing supports only backward()
        rows.append(torch.cat([torch.zeros(w.numel()) if w.grad is None else w.grad.flatten() for w in weights]))
    for w in frozen:
        w.requires_grad_(False)
    tracker.enabled = True
    model.zero_grad()
    return torch.stack(rows)


def train_window(model, tracker, window, scale=1.0):
    """What a training loop does: per micro-batch the mean over its label tokens, / grad_accum, × a loss scale."""
    for ids, mask, lab, dom in window:
        tracker.set_domains(dom, tokens=label_tokens(lab))
        n = label_tokens(lab).sum()
        loss = token_losses(model, ids, mask, lab).sum() / n
        tracker.watch_loss(loss, normalizer=n)
        (loss / len(window) * scale).backward()
    tracker.commit()


@pytest.mark.parametrize("params", ["lora", "head", [r"layers\.1\.mlp\.down_proj$", r"lora_A"]])
def test_domain_grads_are_the_token_mean_loss_gradients(params):
    model = tiny_lora(modules_to_save=["lm_head"] if params == "head" else None)
    tracker = GradientTracker(model, M, params=params, head_patterns=head_patterns(model))
    expected = reference(model, tracker, WINDOW)
    train_window(model, tracker, WINDOW, scale=1024.0)  # grad_accum over 3 mixed micro-batches and a loss scale
    torch.testing.assert_close(tracker.domain_grads(), expected, rtol=1e-4, atol=1e-7)
    assert tracker.tokens.tolist() == [2 * 7, 5 * 1, 11 * 4]
    G = tracker.gram("plugin")  # ĝ_i · ĝ_j; the unbiased diagonal: tests/test_balance_estimator.py
    torch.testing.assert_close(G, gram(expected), rtol=1e-4, atol=1e-10)


def test_a_loss_watch_loss_never_saw_is_warned_about_once(caplog):
    """Without watch_loss the window silently held each micro-batch's gradient divided by its normaliser, its
    grad-accumulation factor and its loss scale: a user of the raw API would never know."""
    model = tiny_lora()
    tracker = GradientTracker(model, M)
    with caplog.at_level("WARNING", logger="rbvl.balance.staging"):
        train_window(model, tracker, WINDOW)
        assert "watch_loss" not in caplog.text
        for ids, mask, lab, dom in WINDOW:
            tracker.set_domains(dom, tokens=label_tokens(lab))
            (token_losses(model, ids, mask, lab).sum() / label_tokens(lab).sum()).backward()
        tracker.commit()
    assert caplog.text.count("from a loss watch_loss never saw") == 1, caplog.text


def test_answer_length_does_not_tilt_p():
    """Two domains, one with 5.5× longer answers: p from the tracker equals p from the token-mean reference."""
    model = tiny_lora(seed=3)
    tracker = GradientTracker(model, M)
    window = [micro_batch([0, 2, 0, 2], 7), micro_batch([2, 0, 0, 2], 8)]
    expected = update_proportions(gram(reference(model, tracker, window)), lam=3.0)
    train_window(model, tracker, window)
    p = update_proportions(tracker.gram("plugin"), lam=3.0)
    torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-6)


def test_the_weight_gradient_is_unchanged():
    """The tracked linears compute their weight gradient as a sum of per-domain parts: training is unaffected."""
    plain, tracked = tiny_lora(dropout=0.0), tiny_lora(dropout=0.0)
    tracker = GradientTracker(tracked, M)
    for model in (plain, tracked):
        for ids, mask, lab, dom in WINDOW:
            if model is tracked:
                tracker.set_domains(dom, tokens=label_tokens(lab))
            (token_losses(model, ids, mask, lab).sum() / 17).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    model = tiny_lora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    tracker = GradientTracker(model, M)
    expected = reference(model, tracker, WINDOW)
    train_window(model, tracker, WINDOW)
    torch.testing.assert_close(tracker.domain_grads(), expected, rtol=1e-4, atol=1e-7)


def test_tied_head_reads_only_its_own_use():
    """A trainable LM head tied to the input embeddings: the head's parts, not the embedding's gradient."""
    model = tiny_lora(tie=True)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    assert head.weight is model.get_input_embeddings().weight
    tracker = GradientTracker(model, M, params="head", head_patterns=head_patterns(model))
    untied = tiny_lora(tie=True)  # the same weights, the head given its own copy: its gradient is the head's use
    untied.get_output_embeddings().weight = torch.nn.Parameter(head.weight.detach().clone())
    expected = reference(untied, GradientTracker(untied, M, params="head", head_patterns=head_patterns(untied)), WINDOW)
    train_window(model, tracker, WINDOW)
    torch.testing.assert_close(tracker.domain_grads(), expected, rtol=1e-4, atol=1e-7)


def test_head_of_a_llava_includes_the_projector_per_image():
    from test_model import batch as llava_batch

    from rbvl.config import LoraConfig as RbvlLora
    from rbvl.config import ModelConfig
    from rbvl.model import apply_lora, load_model

    model, processor = load_model(ModelConfig())
    model = apply_lora(model, RbvlLora(lora_dropout=0.0, modules_to_save=["multi_modal_projector", "lm_head"]))
    tracker = GradientTracker(model, 2, params="head", head_patterns=head_patterns(model))
    assert any("multi_modal_projector" in n for n in tracker.tracked_names)
    inputs = llava_batch(processor)  # sample 0 has the image, sample 1 is text only
    labels = inputs.pop("labels")
    domains = torch.tensor([1, 0])
    tokens = label_tokens(labels)

    def per_sample_loss():
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        ).sum(1)

    tracker.enabled = False
    weights = tracked_weights(tracker)
    rows = []
    for d in range(2):
        loss = (per_sample_loss() * (domains == d)).sum() / tokens[domains == d].sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]))
    tracker.enabled = True
    tracker.set_domains(domains, tokens=tokens, image_domain_ids=domains[:1])
    loss = per_sample_loss().sum() / tokens.sum()
    tracker.watch_loss(loss, normalizer=tokens.sum())
    loss.backward()
    torch.testing.assert_close(tracker.domain_grads(), torch.stack(rows), rtol=1e-4, atol=1e-7)


def test_sketch_is_unbiased_and_close():
    model = tiny_lora()
    exact = GradientTracker(model, M)
    train_window(model, exact, WINDOW)
    G = exact.gram()
    exact.remove()
    P = exact.n_params
    sketched = []
    for seed in range(60):
        model.zero_grad()
        tracker = GradientTracker(model, M, sketch_dim=P // 4, seed=seed)
        assert tracker.nbytes == 2 * M * (P // 4) * 4  # window + last seen, m × sketch_dim each
        train_window(model, tracker, WINDOW)
        sketched.append(tracker.gram())
        tracker.remove()
    stack = torch.stack(sketched)  # (seeds, m, m)
    mean, stderr = stack.mean(0), stack.std(0) / math.sqrt(len(sketched))
    assert ((mean - G).abs() <= 4 * stderr + 1e-9 * G.abs().max()).all(), (mean, G, stderr)
    assert (stack.std(0) > 0).any(), "the sketch compresses: it has variance"
    p_exact = update_proportions(G, lam=3.0)
    l1 = torch.stack([(update_proportions(g, lam=3.0) - p_exact).abs().sum() for g in sketched])
    assert l1.mean() < 0.12, l1.mean()  # measured 0.021 at a 4× compression of 2,688 parameters (hashed: 0.068)


@pytest.mark.parametrize("per_turn", [True, False], ids=["cpu-per-turn", "gpu-signed-sum"])
@pytest.mark.parametrize("cached", [True, False])
def test_sketch_lays_each_weight_at_its_bucket_with_its_sign(cached, per_turn, monkeypatch):
    """From the definition, weight by weight: entry p of layer l (row i, column j) adds s_i · t_j · w to bucket
    (r_l + p) mod N, for layers smaller than N, as large, and many times larger (head, whole turns and tail); whole
    turns both ways (the CPU's add per turn, the GPU's signed sum, run here on the CPU)."""
    from rbvl.balance import sketch
    from rbvl.balance.sketch import _plan_sketches, _sketch_parts

    monkeypatch.setattr(sketch, "PER_TURN_DEVICES", {"cpu"} if per_turn else set())

    shapes = [(8, 16), (16, 8), (3, 5), (40, 12)]
    for n_buckets in (7, 50, 128, 200):
        for seed in range(3):
            plans = _plan_sketches(shapes, n_buckets, seed, "cpu", cache_bytes=10**9 if cached else 0)
            assert all((signs is not None) == cached for signs in plans.signs)
            for layer, shape in enumerate(shapes):
                part = torch.randn(3, *shape, dtype=torch.float64)
                got = torch.zeros(3, n_buckets, dtype=torch.float64)
                _sketch_parts(got, plans, layer, part)
                want = torch.zeros(3, n_buckets, dtype=torch.float64)
                s, t = plans[layer]
                for i in range(shape[0]):
                    for j in range(shape[1]):
                        bucket = (plans.offsets[layer] + i * shape[1] + j) % n_buckets
                        want[:, bucket] += float(s[i] * t[j]) * part[:, i, j]
                torch.testing.assert_close(got, want)


def test_sketch_is_exact_when_it_is_large_enough():
    model = tiny_lora()
    exact = GradientTracker(model, M)
    train_window(model, exact, WINDOW)
    exact.remove()
    model.zero_grad()
    tracker = GradientTracker(model, M, sketch_dim=4 * exact.n_params)
    train_window(model, tracker, WINDOW)
    torch.testing.assert_close(tracker.gram(), exact.gram(), rtol=1e-5, atol=1e-12)


def test_overflowed_step_is_dropped():
    model = tiny_lora()
    clean = GradientTracker(model, M)
    train_window(model, clean, WINDOW[:1])
    clean.remove()
    tracker = GradientTracker(model, M, guard_nonfinite=True)
    train_window(model, tracker, WINDOW[:1])
    train_window(model, tracker, WINDOW[1:2], scale=float("inf"))  # an fp16 overflow: inf gradients
    assert tracker.skipped_steps == 1
    torch.testing.assert_close(tracker.domain_grads(), clean.domain_grads())
    assert tracker.tokens.tolist() == clean.tokens.tolist()
    assert torch.isfinite(tracker.gram()).all()


def test_a_domain_missing_from_a_window_keeps_its_last_gradient():
    model = tiny_lora()
    tracker = GradientTracker(model, M)
    train_window(model, tracker, WINDOW[:1])  # domains 0, 1, 2
    g1 = tracker.domain_grads()[1].clone()
    tracker.reset()
    train_window(model, tracker, WINDOW[1:])  # domains 0 and 2 only
    assert tracker.stale() == [1]
    assert tracker.domain_grads()[1].abs().sum() == 0, "the window has no gradient of domain 1"
    G = tracker.gram()  # ... but G holds its last seen one (exact here: the store's sketch is larger than P)
    assert G[1, 1] == pytest.approx(float(g1.double() @ g1.double()), rel=1e-6) and G[1, 0] != 0
    p, info = update_proportions_with_info(G, None, 3.0)
    assert info["unseen"] == [] and torch.isfinite(p).all()


def test_tracker_bookkeeping():
    model = tiny_lora()
    tracker = GradientTracker(model, M)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tracker.set_domains([0, 3])
    train_window(model, tracker, WINDOW[:2])
    state = tracker.state_dict()
    other = GradientTracker(tiny_lora(), M)
    other.load_state_dict(state)
    torch.testing.assert_close(other.domain_grads(), tracker.domain_grads())
    with pytest.raises(ValueError, match="sketch_dim"):
        GradientTracker(tiny_lora(), M, sketch_dim=512).load_state_dict(state)
    tracker.enabled = False
    before = tracker.domain_grads().clone()
    train_window(model, tracker, WINDOW[:1])
    torch.testing.assert_close(tracker.domain_grads(), before)
    tracker.enabled = True
    tracker.reset()
    assert tracker.tokens.sum() == 0 and tracker.seen.all()
    ids, mask, lab, _ = WINDOW[0]
    tracker.remove()
    assert all("forward" not in mod.__dict__ for _, mod in tracker.modules)
    token_losses(model, ids, mask, lab).sum().backward()  # an untracked model trains as before
    fresh_model = tiny_lora()
    GradientTracker(fresh_model, M)
    with pytest.raises(RuntimeError, match="set_domains"):
        token_losses(fresh_model, ids, mask, lab)
    flops = GradientTracker(tiny_lora(), M).flops([0, 2, 2], tokens_per_sample=10)
    assert flops == 2 * sum(4 * mod.weight.numel() for _, mod in tracker.modules)  # 2 domains present, O(params)


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
    assert info["unseen"] == [1] and 0 < p[1] < 1 / 3 and abs(p.sum() - 1) < 1e-9  # a zero row scores 0
    # a domain never drawn keeps its share (it has no score, not a score of 0); the others divide the rest by the rule
    G = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    prev = [0.1, 0.2, 0.3, 0.4]
    for update in ("replace", "mirror"):
        p, info = update_proportions_with_info(G, None, 3.0, prev=prev, update=update, never_seen=[3])
        seen_only, _ = update_proportions_with_info(
            G[:3, :3], [0.25] * 3, 3.0, prev=[1 / 6, 2 / 6, 3 / 6], update=update
        )
        assert info["unseen"] == [3] and p[3] == pytest.approx(0.4)
        assert (p[:3] / 0.6).tolist() == pytest.approx(seen_only.tolist())
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


def test_schedule_applies_after_the_lag():
    s = ProportionSchedule(3, initial=[0.2, 0.3, 0.5], lag=2)
    assert s.publish([1.0, 0.0, 0.0], after_step=5) == 8
    assert s.at(7).tolist() == pytest.approx([0.2, 0.3, 0.5]) and s.at(8).tolist() == pytest.approx([1, 0, 0])
    assert s.history() == [(0, pytest.approx([0.2, 0.3, 0.5])), (8, [1.0, 0.0, 0.0])]
    other = ProportionSchedule(3, lag=2)
    other.load_state_dict(s.state_dict())
    assert other.history() == s.history()
    with pytest.raises(ValueError, match="lag"):
        ProportionSchedule(3, lag=1).load_state_dict(s.state_dict())


def test_balancer_windows_and_state():
    model = tiny_lora()
    tracker = GradientTracker(model, M)
    bal = Balancer(
        3, target=[1.0, 0.0, 0.0], update_every=2, lam=3.0, warmup_steps=1, schedule=ProportionSchedule(3, lag=1)
    )
    updates = []
    for step in range(1, 8):
        ids, mask, lab, dom = WINDOW[step % 3]
        tracker.set_domains(dom, tokens=label_tokens(lab))
        n = label_tokens(lab).sum()
        loss = token_losses(model, ids, mask, lab).sum() / n
        tracker.watch_loss(loss, normalizer=n)
        loss.backward()
        info = bal.step(step, tracker)
        if info is not None:
            updates.append(step)
            assert info["applies_from_step"] == step + 2 and abs(sum(info["p"]) - 1) < 1e-9
    assert updates == [3, 5, 7]
    assert bal.proportions_at(4) == pytest.approx([1 / 3] * 3) and bal.proportions_at(5) != bal.proportions_at(4)
    other = Balancer(3, update_every=2, schedule=ProportionSchedule(3, lag=1))
    other.load_state_dict(bal.state_dict())
    assert other.schedule.history() == bal.schedule.history() and other.proportions == bal.proportions


def test_one_tracker_at_a_time():
    model = tiny_lora()
    first = GradientTracker(model, M)
    with pytest.raises(RuntimeError, match="already tracked"):
        GradientTracker(model, M)
    first.remove()
    second = GradientTracker(model, M, sketch_dim=256)
    second.remove()
    first.attach()
    train_window(model, first, WINDOW[:1])
    assert first.tokens.sum() > 0 and second.tokens.sum() == 0


def test_balancer_step_is_commit_gram_update_reset_publish():
    """Balancer.step's dict, by hand: p is update_proportions of the G the tracker holds at the window's end."""
    model = tiny_lora(seed=4)
    tracker = GradientTracker(model, 2, guard_nonfinite=True)
    schedule = ProportionSchedule(2, lag=1)
    bal = Balancer(
        2,
        target=[0.25, 0.75],
        update_every=3,
        lam=3.0,
        schedule=schedule,
        update="replace",
        gram_ema=0.0,
        gram="unbiased",
    )
    for step, batch in enumerate([micro_batch([0, 1, 1], 11), micro_batch([1, 1, 0, 0], 12)], 1):
        train_window(model, tracker, [batch])
        assert bal.step(step, tracker) is None
    G = tracker.gram()  # (2, 2): the window's G; the step that ends it overflows and must not join it
    assert tracker.tokens.tolist() == [2 + 2 * 2, 2 * 5 + 2 * 5]
    p_before = bal.proportions
    ids, mask, lab, dom = micro_batch([0, 1], 13)
    tracker.set_domains(dom, tokens=label_tokens(lab))
    token_losses(model, ids, mask, lab).sum().backward()

    info = bal.step(3, tracker, skip=True)
    assert info is not None
    assert info["p"] == pytest.approx(update_proportions(G, [0.25, 0.75], lam=3.0).tolist(), rel=1e-12)
    assert info["p_before"] == p_before == [0.5, 0.5]
    assert info["gram"] == G.tolist()
    assert info["gram_eigenvalues"] == pytest.approx(torch.linalg.eigvalsh(G).tolist())
    assert info["tokens"] == [6.0, 20.0] and info["stale"] == []
    assert info["degenerate"] is None and info["skipped_steps"] == 1
    assert info["applies_from_step"] == 3 + 1 + schedule.lag
    assert bal.proportions_at(4) == pytest.approx(p_before) and bal.proportions_at(5) == pytest.approx(info["p"])
    assert tracker.tokens.sum() == 0 and tracker.domain_grads().abs().sum() == 0, "the window is emptied"


def test_head_needs_the_familys_patterns():
    model = tiny_lora(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="head_patterns="):
        GradientTracker(model, M, params="head")


def test_balance_imports_torch_alone():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = "import json, sys, rbvl.balance; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    modules = json.loads(out)
    rbvl = [n for n in modules if n.startswith("rbvl.") and not n.startswith("rbvl.balance")]
    assert rbvl == [], rbvl
    assert not [n for n in modules if n == "transformers" or n.startswith("transformers.")]


def test_tracker_refuses_what_it_cannot_count():
    """n_domains that is no count, and token counts that do not match the ids, fail where they are given, not as a
    torch.bincount error."""
    model = tiny_lora()
    with pytest.raises(ValueError, match=r"n_domains must be an int >= 1 .*got 0"):
        GradientTracker(model, 0)
    tracker = GradientTracker(model, M)
    with pytest.raises(ValueError, match=r"set_domains: 3 token counts for 4 domain ids"):
        tracker.set_domains(torch.tensor([0, 1, 2, 0]), tokens=torch.tensor([3, 4, 5]))
