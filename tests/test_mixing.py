"""Peer mixers (rbvl/mixing/): each update rule against a hand computation from its definition, p on the simplex,
and exact resume (a state_dict round trip through JSON mid-run gives the same p afterwards)."""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rbvl.config import AioliConfig, DgaConfig, DoremiConfig, MixingConfig, OdmConfig
from rbvl.mixing import (
    AioliMixer,
    MixContext,
    Mixer,
    StaticMixer,
    build_mixer,
    token_losses,
)

M = 3
VOCAB = 11


class TinyLM(nn.Module):
    """Embedding → tanh → linear: enough to have gradients and per-token losses."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids))))


def batch(d: int, n: int, draw: int = 0, length: int = 6) -> tuple[dict, SimpleNamespace]:
    """n samples of 'domain' d: token ids from a domain-specific range; the first token is a prompt (masked)."""
    g = torch.Generator().manual_seed(1000 * d + draw)
    ids = torch.randint(3 * d, 3 * d + 4, (n, length), generator=g) % VOCAB
    labels = ids.clone()
    labels[:, :2] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return inputs, SimpleNamespace(domain_ids=torch.full((n,), d))


def mixed_batch(domains: list[int], draw: int = 0):
    parts = [batch(d, 1, draw=draw * 10 + i) for i, d in enumerate(domains)]
    inputs = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    return inputs, SimpleNamespace(domain_ids=torch.tensor(domains))


def per_sample_loss(model):
    def fn(inputs):
        loss, mask = token_losses(model, inputs)
        return (loss * mask).sum(1), mask.sum(1)

    return fn


def make_ctx(model, evaluate=None, lr=2e-4) -> MixContext:
    draws = {"n": 0}

    def domain_batch(d, n):
        return batch(d, n, draw=500 + draws["n"])

    def target_batch(n):
        draws["n"] += 1
        return mixed_batch([i % M for i in range(n)], draw=900 + draws["n"])

    return MixContext(
        model=model,
        domain_batch=domain_batch,
        target_batch=target_batch,
        per_sample_loss=per_sample_loss(model),
        evaluate=evaluate,
        flops_per_token=100.0,
        load_reference=lambda run_dir: TinyLM(seed=7),
        lr=lambda: lr,
    )


def feed(mixer, model, step: int):
    """One training step's worth of observe() calls with a domain mix that depends on the step."""
    domains = [(step + i) % M for i in range(4)] if step % 3 else [0, 0, 1, 0]
    inputs, meta = mixed_batch(domains, draw=step)
    with torch.no_grad():
        loss, mask = token_losses(model, inputs)
    mixer.observe(inputs, meta, (loss * mask).sum(1), mask.sum(1), token_loss=loss * mask)


def assert_simplex(p):
    p = np.asarray(p)
    assert (p >= 0).all() and math.isclose(p.sum(), 1.0, abs_tol=1e-9), p


# ---------------------------------------------------------------------------------------------------------------------
# ODM
# ---------------------------------------------------------------------------------------------------------------------


def test_odm_matches_exp3_by_hand():
    cfg = MixingConfig(strategy="odm", odm=OdmConfig(alpha=0.5))
    mixer = build_mixer("odm", M, None, cfg, MixContext())
    # step 1: domains 0 and 2 seen, with token-mean losses 2.0 and 4.0
    mixer.observe({}, {"domain_ids": [0, 2, 2]}, torch.tensor([6.0, 4.0, 12.0]), torch.tensor([3, 2, 2]))
    info = mixer.step(1, MixContext())
    pi = 1 / 3
    r = [0.5 * 0 + 0.5 * 2.0 / pi, 0.0, 0.5 * 0 + 0.5 * 4.0 / pi]
    eps_prev, eps = 1 / 3, min(1 / 3, math.sqrt(math.log(3) / (3 * 1)))
    z = [math.exp(eps_prev * x) for x in r]
    want = [(1 - 3 * eps) * x / sum(z) + eps for x in z]
    assert info["p"] == pytest.approx(want)
    assert info["rewards"] == pytest.approx(r)
    # step 2: only domain 1, loss 1.0; π is now the p above
    mixer.observe({}, {"domain_ids": [1]}, torch.tensor([5.0]), torch.tensor([5]))
    info = mixer.step(2, MixContext())
    r[1] = 0.5 * 0 + 0.5 * 1.0 / want[1]
    eps_prev, eps = eps, min(1 / 3, math.sqrt(math.log(3) / (3 * 2)))
    z = [math.exp(eps_prev * x) for x in r]
    want = [(1 - 3 * eps) * x / sum(z) + eps for x in z]
    assert info["p"] == pytest.approx(want)
    assert_simplex(info["p"])
    assert mixer.cost["forward_tokens"] == 0 and mixer.cost["backward_tokens"] == 0  # no extra passes


def test_odm_warmup_keeps_initial_p():
    cfg = MixingConfig(strategy="odm", odm=OdmConfig(warmup_steps=2))
    mixer = build_mixer("odm", M, None, cfg, MixContext(), initial=[0.5, 0.25, 0.25])
    for step in (1, 2):
        mixer.observe({}, {"domain_ids": [0]}, torch.tensor([1.0]), torch.tensor([1]))
        assert mixer.step(step, MixContext()) is None
    assert mixer.proportions == pytest.approx([0.5, 0.25, 0.25])
    mixer.observe({}, {"domain_ids": [0]}, torch.tensor([1.0]), torch.tensor([1]))
    assert "p" in mixer.step(3, MixContext())


# ---------------------------------------------------------------------------------------------------------------------
# DoReMi
# ---------------------------------------------------------------------------------------------------------------------


def test_doremi_excess_loss_and_update_by_hand():
    model = TinyLM(seed=1)
    ctx = make_ctx(model)
    cfg = MixingConfig(strategy="doremi", reference="ref", doremi=DoremiConfig(eta=1.0, smoothing=1e-3))
    mixer = build_mixer("doremi", M, None, cfg, ctx)
    reference = mixer.reference
    inputs, meta = mixed_batch([0, 2, 2, 0])
    with torch.no_grad():
        loss, mask = token_losses(model, inputs)
        ref, _ = token_losses(reference, inputs)
    mixer.observe(inputs, meta, (loss * mask).sum(1), mask.sum(1), token_loss=loss * mask)
    info = mixer.step(1, ctx)
    # λ_d: mean over domain d's label tokens of max(ℓ − ℓ_ref, 0); domain 1 unseen keeps 0
    lam = []
    for d in range(M):
        vals = [
            max(loss[b, t].item() - ref[b, t].item(), 0.0)
            for b in range(4)
            if meta.domain_ids[b] == d
            for t in range(loss.shape[1])
            if mask[b, t]
        ]
        lam.append(sum(vals) / len(vals) if vals else 0.0)
    w = [1 / 3 * math.exp(x) for x in lam]
    want = [(1 - 1e-3) * x / sum(w) + 1e-3 / 3 for x in w]
    assert info["excess_loss"] == pytest.approx(lam, rel=1e-5)
    assert info["p"] == pytest.approx(want, rel=1e-6)
    assert_simplex(info["p"])
    # the reference forward pass is the cost: every input token, FLOPs = fpt · tokens
    assert mixer.cost["forward_tokens"] == int(inputs["attention_mask"].sum())
    assert mixer.cost["flops"] == pytest.approx(100.0 * mixer.cost["forward_tokens"])
    assert all(not p.requires_grad for p in reference.parameters())


def test_doremi_needs_reference():
    from rbvl.config import ConfigError

    with pytest.raises(ConfigError, match="mixing.reference"):
        MixingConfig(strategy="doremi")


# ---------------------------------------------------------------------------------------------------------------------
# DGA / DoGE
# ---------------------------------------------------------------------------------------------------------------------


def test_dga_alignment_update_by_hand():
    model = TinyLM(seed=2)
    cfg = MixingConfig(strategy="dga", dga=DgaConfig(batch_size=2, mu=0.01, dw_max=5.0, max_grad_norm=0.0))
    mixer = build_mixer("dga", M, None, cfg, make_ctx(model, lr=1e-3))
    info = mixer.step(1, make_ctx(model, lr=1e-3))  # a fresh ctx draws the same batches (draw counter from 0)
    # slow reference: one ordinary backward per batch, flatten .grad
    ref_ctx = make_ctx(model, lr=1e-3)

    def grad_of(inputs):
        model.zero_grad()
        ls, tok = per_sample_loss(model)(inputs)
        (ls.sum() / tok.sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    g = [grad_of(ref_ctx.domain_batch(d, 2)[0]) for d in range(M)]
    g_t = grad_of(ref_ctx.target_batch(2)[0])
    align = np.array([(gi @ g_t).item() for gi in g])
    avg = np.mean([gi.norm().item() for gi in g])
    scores = np.clip(1e-3 * align / (avg + 1e-6), 0.0, 1e-3 * 5.0)
    w = np.exp(np.log(np.full(M, 1 / 3)) + scores / 0.01)
    assert info["alignment"] == pytest.approx(align.tolist(), rel=1e-4)
    assert info["p"] == pytest.approx((w / w.sum()).tolist(), rel=1e-5)
    assert_simplex(info["p"])
    # m + 1 extra forward and backward passes, and the training gradients were not touched by the mixer
    n_tokens = 2 * 6 * (M + 1)
    assert mixer.cost["forward_tokens"] == n_tokens and mixer.cost["backward_tokens"] == n_tokens
    assert mixer.cost["flops"] == pytest.approx(100.0 * 3 * n_tokens)


def test_dga_leaves_training_grads_alone():
    model = TinyLM(seed=3)
    ctx = make_ctx(model)
    mixer = build_mixer("dga", M, None, MixingConfig(strategy="dga"), ctx)
    model.zero_grad(set_to_none=True)
    mixer.step(1, ctx)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Aioli
# ---------------------------------------------------------------------------------------------------------------------


class ScriptedEval:
    """evaluate() returning the next per-domain losses of a script (what the mixer measures), counting calls."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def __call__(self):
        loss = self.script[self.calls]
        self.calls += 1
        return {"loss": float(np.mean(loss)), "loss_per_domain": list(loss), "tokens_per_domain": [10] * len(loss)}


def test_aioli_round_by_hand():
    m = 2
    cfg = AioliConfig(eta=0.5, update_steps=4, lp_rounds=1, lp_steps=1, one_hot_factor=0.75, ema=0.0, normalize_a=False)
    l0, l1, l2, l3 = [3.0, 3.0], [2.5, 2.9], [2.4, 2.6], [2.0, 2.0]
    ev = ScriptedEval([l0, l1, l2, l3])
    ctx = MixContext(evaluate=ev, flops_per_token=10.0)
    mixer = AioliMixer(m, cfg, [0.5, 0.5], ctx, seed=0)
    order = list(mixer.order)
    f = 0.75
    assert mixer.proportions == pytest.approx([f if i == order[0] else 1 - f for i in range(m)])
    mixer.observe({}, {"domain_ids": [order[0]]}, torch.zeros(1), torch.ones(1))  # measures L_0 first
    info = mixer.step(1, ctx)  # segment 0 ends: next mixture perturbs order[1]
    assert info["p"] == pytest.approx([f if i == order[1] else 1 - f for i in range(m)])
    mixer.observe({}, {"domain_ids": [order[1]]}, torch.zeros(1), torch.ones(1))
    info = mixer.step(2, ctx)  # LearnParams done: solve, update
    graph = np.zeros((m, m))
    graph[:, order[0]] = np.subtract(l0, l1)
    graph[:, order[1]] = np.subtract(l1, l2)
    w_mix = np.array([[0.75, 0.25], [0.25, 0.75]])  # rows: the mixtures that perturb domain 0 and domain 1
    a = np.stack([np.linalg.solve(w_mix, row) for row in graph])
    w = np.exp(0.5 * a.sum(axis=0))  # uniform q: the authors' column sum
    assert np.asarray(info["interaction"]) == pytest.approx(a)
    assert info["p"] == pytest.approx((w / w.sum()).tolist())
    assert mixer.step(3, ctx) is None  # trains on the new p
    info = mixer.step(4, ctx)  # round ends: measures the next L_0 and starts the next LearnParams
    assert info["eval_loss"] == l3 and ev.calls == 4
    assert_simplex(info["p"])
    assert mixer.cost["forward_tokens"] == 4 * 20 and mixer.cost["flops"] == pytest.approx(10.0 * 80)


def test_aioli_normalize_and_ema():
    from rbvl.mixing import aioli_weights

    a = np.array([[0.2, -0.1], [0.1, 0.3]])
    q = np.array([0.5, 0.5])
    w, smoothed = aioli_weights(a, q, eta=1.0, normalize=True, ema=0.1, prev_ema=np.eye(2), prev_weights=None)
    shifted = (a + 0.1) / (a + 0.1).sum()
    want_smoothed = 0.9 * shifted + 0.1 * np.eye(2)
    assert smoothed == pytest.approx(want_smoothed)
    assert w == pytest.approx(np.exp(want_smoothed.sum(axis=0)))


def test_aioli_rejects_round_shorter_than_learnparams():
    from rbvl.mixing import MixingError

    with pytest.raises(MixingError, match="update_steps"):
        AioliMixer(3, AioliConfig(update_steps=12, lp_rounds=1, lp_steps=4), [1 / 3] * 3, MixContext())


# ---------------------------------------------------------------------------------------------------------------------
# Every strategy: interface, simplex, exact resume
# ---------------------------------------------------------------------------------------------------------------------


def _aioli_cfg():
    return MixingConfig(
        strategy="aioli", aioli=AioliConfig(update_steps=8, lp_rounds=1, lp_steps=1, one_hot_factor=0.6, eta=1.0)
    )


CONFIGS = {
    "stratified": lambda: MixingConfig(strategy="stratified"),
    "odm": lambda: MixingConfig(strategy="odm", odm=OdmConfig(alpha=0.5)),
    "dga": lambda: MixingConfig(strategy="dga", dga=DgaConfig(update_every=2, batch_size=2)),
    "doremi": lambda: MixingConfig(strategy="doremi", reference="ref"),
    "aioli": _aioli_cfg,
}


def _model_eval(model):
    def evaluate():
        per = []
        with torch.no_grad():
            for d in range(M):
                ls, tok = per_sample_loss(model)(batch(d, 2, draw=77)[0])
                per.append((ls.sum() / tok.sum()).item())
        return {"loss": float(np.mean(per)), "loss_per_domain": per, "tokens_per_domain": [8] * M}

    return evaluate


def _run(strategy, steps, split=None):
    """Train a TinyLM with SGD for `steps` steps under the mixer; with `split`, rebuild everything from a JSON round
    trip of the state after step `split` (model, optimizer, mixer and the held-out reader position)."""
    model = TinyLM(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = make_ctx(model, evaluate=_model_eval(model))
    mixer = build_mixer(strategy, M, None, CONFIGS[strategy](), ctx, seed=3)
    assert isinstance(mixer, Mixer)
    ps = []
    for step in range(1, steps + 1):
        inputs, meta = mixed_batch([(step + i) % M for i in range(3)], draw=step)
        loss, mask = token_losses(model, inputs)
        mixer.observe(inputs, meta, (loss * mask).sum(1).detach(), mask.sum(1), token_loss=(loss * mask).detach())
        ((loss * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad()
        mixer.step(step, ctx)
        assert_simplex(mixer.proportions)
        ps.append(mixer.proportions)
        if step == split:
            saved = json.loads(json.dumps(mixer.state_dict()))
            weights = copy.deepcopy(model.state_dict())
            model = TinyLM(seed=99)
            model.load_state_dict(weights)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            draws = ctx.domain_batch.__closure__  # keep the held-out reader's position (the loop checkpoints it)
            ctx = make_ctx(model, evaluate=_model_eval(model))
            _copy_draws(draws, ctx)
            mixer = build_mixer(strategy, M, None, CONFIGS[strategy](), ctx, seed=12345)  # seed restored by state
            mixer.load_state_dict(saved)
    return ps, mixer


def _copy_draws(closure, ctx):
    old = next(c.cell_contents for c in closure if isinstance(c.cell_contents, dict))
    new = next(c.cell_contents for c in ctx.domain_batch.__closure__ if isinstance(c.cell_contents, dict))
    new.update(old)


@pytest.mark.parametrize("strategy", list(CONFIGS))
def test_exact_resume(strategy):
    full, mixer = _run(strategy, 12)
    resumed, mixer2 = _run(strategy, 12, split=5)
    assert resumed == full
    cost, cost2 = mixer.cost, mixer2.cost
    for key in ("forward_tokens", "backward_tokens", "flops", "updates"):
        assert cost[key] == cost2[key], key
    if strategy != "stratified":
        assert len({tuple(np.round(p, 12)) for p in full}) > 1  # p actually moved


def test_static_mixer():
    mixer = StaticMixer("natural", [2, 1, 1])
    assert mixer.proportions == pytest.approx([0.5, 0.25, 0.25])
    assert mixer.step(1, MixContext()) is None and mixer.cost["flops"] == 0


def test_build_mixer_rejects_rnb():
    from rbvl.mixing import MixingError

    with pytest.raises(MixingError, match="Balancer"):
        build_mixer("rnb", M, None, MixingConfig(), MixContext())
