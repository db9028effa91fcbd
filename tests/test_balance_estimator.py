"""The Gram matrix's estimators against known answers: hand-computed U-statistics, synthetic gradient streams with known
means and noise (the mean over seeds must match the true G; the plug-in's diagonal must exceed it by tr Σ / n), and
per-micro-batch autograd on a tiny model. Micro-batches are fed to the tracker's accumulation directly where no
model is needed."""

import math

import pytest
import torch
from test_balance_maths import WINDOW, M, reference, tiny_lora, train_window
from torch import nn

from rbvl.balance import GradientTracker, label_tokens, unbiased_diagonal

OUT, IN = 4, 5
P = OUT * IN


def toy_tracker(m, **kw):
    model = nn.Sequential()
    model.lin = nn.Linear(IN, OUT, bias=False)
    return GradientTracker(model, m, params=[r"^lin$"], **kw)


def feed(tracker, micro_batches, skip=False):
    """One optimizer step of micro-batches, each {domain: (tokens, (OUT, IN) gradient sum)}: what the backward pass
    of the tracked linear hands the tracker."""
    for mb in micro_batches:
        domains = sorted(mb)
        tracker.set_domains(domains, tokens=[mb[d][0] for d in domains])
        parts = torch.stack([mb[d][1].float() for d in domains])  # (k, OUT, IN), as the backward hands them over
        tracker._add_parts(0, tracker._groups["sample"], parts[0] if len(domains) == 1 else parts)
        tracker._end_backward()  # what the end of the backward pass does
    return tracker.commit(skip=skip)


def by_hand(micro_batches, m):
    """(m, m) unbiased G and (m,) plug-in diagonal, from the formula with explicit loops."""
    sums = [
        sum((mb[d][1].double() for mb in micro_batches if d in mb), torch.zeros(OUT, IN).double()) for d in range(m)
    ]
    T = [sum(mb[d][0] for mb in micro_batches if d in mb) for d in range(m)]
    G = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            G[i, j] = (sums[i] * sums[j]).sum() / (T[i] * T[j])
    plugin = G.diagonal().clone()
    for i in range(m):
        parts = [(mb[i][0], mb[i][1].double()) for mb in micro_batches if i in mb]
        num = sum((a[1] * b[1]).sum() for x, a in enumerate(parts) for y, b in enumerate(parts) if x != y)
        den = sum(a[0] * b[0] for x, a in enumerate(parts) for y, b in enumerate(parts) if x != y)
        G[i, i] = num / den
    return G, plugin


def test_unbiased_diagonal_by_hand():
    # domain 0: s = (1, 2), (3, −1), (0, 2) with 2, 1, 3 tokens; domain 1: one micro-batch only; domain 2: none
    s = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.0, 2.0])]
    total = s[0] + s[1] + s[2]  # (4, 3): ‖·‖² = 25
    sq = sum(float(x @ x) for x in s)  # 5 + 10 + 4 = 19
    cross = 2 * (float(s[0] @ s[1]) + float(s[0] @ s[2]) + float(s[1] @ s[2]))  # 2 · (1 + 4 − 2) = 6
    assert float(total @ total) - sq == cross == 6
    value, ok = unbiased_diagonal([25.0, 9.0, 0.0], [19.0, 9.0, 0.0], [6.0, 3.0, 0.0], [4 + 1 + 9, 9.0, 0.0])
    assert value[0].item() == pytest.approx(6 / (36 - 14))  # Σ_{k≠l} s_k·s_l / Σ_{k≠l} T_k T_l
    assert ok.tolist() == [True, False, False] and value[1:].tolist() == [0.0, 0.0]


def test_tracker_gram_follows_the_formula():
    g = torch.Generator().manual_seed(1)
    window = [
        {0: (2, torch.randn(OUT, IN, generator=g)), 1: (5, torch.randn(OUT, IN, generator=g))},
        {0: (3, torch.randn(OUT, IN, generator=g)), 2: (1, torch.randn(OUT, IN, generator=g))},
        {1: (4, torch.randn(OUT, IN, generator=g)), 2: (6, torch.randn(OUT, IN, generator=g))},
    ]
    for sketch_dim in (0, 4 * P):  # exact, and a sketch large enough to be exact
        tracker = toy_tracker(3, sketch_dim=sketch_dim)
        feed(tracker, window[:2])
        feed(tracker, window[2:])  # the window spans two optimizer steps
        expected, plugin = by_hand(window, 3)
        G, info = tracker.gram(with_info=True)
        torch.testing.assert_close(G, expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(torch.tensor(info["plugin_diag"], dtype=torch.float64), plugin, rtol=1e-5, atol=1e-8)
        assert info["diag_fallback"] == {}
        torch.testing.assert_close(tracker.gram("plugin").diagonal(), plugin, rtol=1e-5, atol=1e-8)
        off = ~torch.eye(3, dtype=torch.bool)
        assert torch.equal(tracker.gram("plugin")[off], G[off]), "off the diagonal the estimators agree"
        with pytest.raises(ValueError, match="estimator"):
            tracker.gram("cross")
        tracker.remove()


def synthetic_window(gen, g, sigma, tokens):
    """Micro-batches whose domain-i sum is T_ik g_i + σ_i √T_ik ε (T_ik tokens of mean g_i, per-token noise σ_i² I)."""
    window = []
    for k in range(tokens.shape[1]):
        mb = {}
        for i in range(tokens.shape[0]):
            t = int(tokens[i, k])
            if t:
                mb[i] = (
                    t,
                    t * g[i] + sigma[i] * math.sqrt(t) * torch.randn(OUT, IN, generator=gen, dtype=torch.float64),
                )
        window.append(mb)
    return window


G_TRUE_SEED = 3
TOKENS = torch.tensor([[5, 0, 12, 3, 7, 0], [1, 1, 0, 0, 30, 2], [0, 9, 0, 0, 0, 4]])  # (m, micro-batches)
SIGMA = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("sketch_dim", [0, 8])
def test_unbiased_on_average_and_the_plugin_bias_is_trace_sigma_over_n(sketch_dim):
    gen = torch.Generator().manual_seed(G_TRUE_SEED)
    g = 0.15 * torch.randn(3, OUT, IN, generator=gen, dtype=torch.float64)  # the true domain gradients
    true_G = g.flatten(1) @ g.flatten(1).T
    bias = SIGMA**2 * P / TOKENS.sum(1)  # tr Σ_i / n_i: per-token covariance σ_i² I over n_i = T_i tokens
    trials = 1500 if sketch_dim == 0 else 600
    unbiased, plugin = [], []
    tracker = toy_tracker(3) if sketch_dim == 0 else None
    for trial in range(trials):
        if sketch_dim:  # a fresh hash per trial: the mean is over both the data and the sketch
            tracker = toy_tracker(3, sketch_dim=sketch_dim, seed=trial)
        feed(tracker, synthetic_window(gen, g, SIGMA, TOKENS))
        G, info = tracker.gram(with_info=True)
        unbiased.append(G)
        plugin.append(torch.tensor(info["plugin_diag"], dtype=torch.float64))
        tracker.reset()
        if sketch_dim:
            tracker.remove()
    U, D = torch.stack(unbiased), torch.stack(plugin)
    stderr = U.std(0) / math.sqrt(trials)
    assert ((U.mean(0) - true_G).abs() <= 4 * stderr).all(), (U.mean(0), true_G, stderr)
    excess, excess_err = D.mean(0) - true_G.diagonal(), D.std(0) / math.sqrt(trials)
    assert ((excess - bias).abs() <= 4 * excess_err).all(), (excess, bias, excess_err)
    assert (bias > 3 * true_G.diagonal()).any(), "the setting is one where the plug-in's bias dominates"


def test_shrunk_gram_by_hand_and_a_noise_domain_scores_near_zero():
    from rbvl.balance.update import shrink_gram, update_proportions

    plugin_gram = torch.tensor([[4.0, 1.0, 2.0], [1.0, 2.0, 0.0], [2.0, 0.0, 9.0]], dtype=torch.float64)
    unbiased = torch.tensor([3.0, -1.0, 12.0], dtype=torch.float64)  # c = 0.75, 0 (clipped up), 1 (clipped down)
    c = [0.75, 0.0, 1.0]
    expected = torch.tensor([[c[i] * c[j] * plugin_gram[i, j] for j in range(3)] for i in range(3)])
    torch.testing.assert_close(shrink_gram(plugin_gram, unbiased), expected.double())
    torch.testing.assert_close(shrink_gram(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2)), torch.zeros(2, 2,
                               dtype=torch.float64))  # fmt: skip

    # the tracker's `shrunk` from its own two diagonals; then a stream where domain 2's gradient is pure noise
    gen = torch.Generator().manual_seed(3)
    g = torch.zeros(3, OUT, IN, dtype=torch.float64)
    g[0], g[1] = 0.3 * torch.randn(OUT, IN, generator=gen), 0.3 * torch.randn(OUT, IN, generator=gen)
    g[1] = 0.5 * g[0] + 0.5 * g[1]  # 0 and 1 share a direction; 2 has no signal, only noise (an unlearnable domain)
    sigma = torch.tensor([0.3, 0.3, 3.0], dtype=torch.float64)
    p_noise = {"unbiased": [], "plugin": [], "shrunk": []}
    tracker = toy_tracker(3)
    for _ in range(200):
        feed(tracker, synthetic_window(gen, g, sigma, TOKENS))
        G, info = tracker.gram(with_info=True)
        shrunk = tracker.gram("shrunk")
        torch.testing.assert_close(shrunk, shrink_gram(tracker.gram("plugin"), torch.tensor(info["unbiased_diag"])))
        for name, gram in (("unbiased", G), ("plugin", tracker.gram("plugin")), ("shrunk", shrunk)):
            p_noise[name].append(update_proportions(gram, lam=3.0)[2].item())
        tracker.reset()
    mean = {k: sum(v) / len(v) for k, v in p_noise.items()}
    # measured: plug-in 0.87 (its diagonal is the noise), unbiased 0.27, shrunk 0.19 (uniform is 1/3)
    assert mean["shrunk"] < 0.8 * mean["unbiased"] < 0.4 * mean["plugin"], mean
    assert mean["shrunk"] < 0.25, mean


def test_matches_per_micro_batch_autograd_on_a_model():
    """Σ_k ‖s_ik‖² comes from the parts of every tracked layer; check it against autograd, one micro-batch at a time."""
    model = tiny_lora()
    tracker = GradientTracker(model, M)
    parts = []  # per micro-batch: {domain: (tokens, (P,) gradient sum)} by plain autograd
    for mb in WINDOW:
        tokens = label_tokens(mb[2])
        ref = reference(model, tracker, [mb])  # (m, P) token means over this micro-batch alone
        parts.append(
            {d: (int(tokens[mb[3] == d].sum()), ref[d] * tokens[mb[3] == d].sum()) for d in mb[3].unique().tolist()}
        )
    train_window(model, tracker, WINDOW, scale=3.0)  # gradient accumulation and a loss scale
    G, info = tracker.gram(with_info=True)
    for d in range(M):
        rows = [p[d] for p in parts if d in p]
        if len(rows) < 2:
            assert info["diag_fallback"][d] == "plugin" and G[d, d] == info["plugin_diag"][d]
            continue
        num = sum(
            float(a[1].double() @ b[1].double()) for x, a in enumerate(rows) for y, b in enumerate(rows) if x != y
        )
        den = sum(a[0] * b[0] for x, a in enumerate(rows) for y, b in enumerate(rows) if x != y)
        assert G[d, d].item() == pytest.approx(num / den, rel=1e-4, abs=1e-12)
    assert info["diag_fallback"] == {1: "plugin"}  # domain 1 is in one micro-batch of WINDOW


def test_fallback_is_the_last_debiased_value_never_nan():
    gen = torch.Generator().manual_seed(5)

    def mb(*domains):
        return {d: (3, torch.randn(OUT, IN, generator=gen)) for d in domains}

    tracker = toy_tracker(3)
    feed(tracker, [mb(0, 1), mb(0)])  # domain 1 once: the plug-in, flagged; domain 2 never: 0
    G, info = tracker.gram(with_info=True)
    assert info["diag_fallback"] == {1: "plugin", 2: "plugin"} and G[1, 1] == info["plugin_diag"][1] and G[2, 2] == 0
    tracker.reset()
    feed(tracker, [mb(0, 1), mb(1)])  # domain 1 twice: de-biased
    debiased = tracker.gram()[1, 1].item()
    tracker.reset()
    feed(tracker, [mb(0, 1), mb(0)])  # once again: its last de-biased value
    G, info = tracker.gram(with_info=True)
    assert info["diag_fallback"] == {1: "previous", 2: "plugin"} and G[1, 1].item() == debiased
    tracker.reset()
    feed(tracker, [mb(0), mb(0)])  # missed (stale): still its last de-biased value
    G, info = tracker.gram(with_info=True)
    assert info["diag_fallback"][1] == "previous" and G[1, 1].item() == debiased
    assert torch.isfinite(G).all()


def test_resume_mid_window_and_old_checkpoints():
    gen = torch.Generator().manual_seed(7)
    window = synthetic_window(gen, torch.zeros(3, OUT, IN, dtype=torch.float64), SIGMA, TOKENS)
    whole = toy_tracker(3)
    feed(whole, window[:1])
    feed(whole, window[1:3])  # the previous window: domains get de-biased values to fall back on
    whole.reset()
    feed(whole, window[:3])
    state = whole.state_dict()
    feed(whole, window[3:])
    whole.remove()
    resumed = toy_tracker(3)
    resumed.load_state_dict(state)
    feed(resumed, window[3:])
    assert torch.equal(resumed.gram(), whole.gram())
    resumed.remove()
    old = {k: v for k, v in state.items() if k not in ("tokens_sq", "sq", "last_diag", "has_diag")}  # before this
    legacy = toy_tracker(3)
    legacy.load_state_dict(old)
    feed(legacy, window[3:])
    merged = {d: merged_part(window[:3], d) for d in range(3) if any(d in mb for mb in window[:3])}
    expected, _ = by_hand([merged, *window[3:]], 3)  # what it held so far counts as one micro-batch
    torch.testing.assert_close(legacy.gram(), expected, rtol=1e-5, atol=1e-8)
    legacy.reset()
    feed(legacy, window[:1])  # and the next window from scratch, domains 0 and 1 once: their last de-biased values
    G, info = legacy.gram(with_info=True)
    assert info["diag_fallback"] == {0: "previous", 1: "previous", 2: "previous"}
    torch.testing.assert_close(G.diagonal(), expected.diagonal(), rtol=1e-6, atol=0)


def merged_part(micro_batches, d):
    return sum(mb[d][0] for mb in micro_batches if d in mb), sum(mb[d][1] for mb in micro_batches if d in mb)


def test_a_dropped_step_does_not_reach_the_diagonal():
    gen = torch.Generator().manual_seed(9)
    window = synthetic_window(gen, torch.ones(3, OUT, IN, dtype=torch.float64), SIGMA, TOKENS)
    clean, guarded = toy_tracker(3), None
    feed(clean, window[:3])
    feed(clean, window[3:])
    clean.remove()
    guarded = toy_tracker(3, guard_nonfinite=True)
    feed(guarded, window[:3])
    bad = [{d: (t, s * float("inf")) for d, (t, s) in mb.items()} for mb in window[:2]]
    assert feed(guarded, bad) is False
    assert feed(guarded, window[:2], skip=True) is False  # the optimizer skipped it
    feed(guarded, window[3:])
    torch.testing.assert_close(guarded.gram(), clean.gram())


def test_the_balancer_keeps_the_share_of_a_domain_no_window_has_drawn():
    """Domain 2 is not drawn in the first window: it keeps its share (1/3) while 0 and 1 divide the rest; once drawn,
    it is scored like the others, and a later window that misses it uses its last seen gradient (stale, not unseen)."""
    from rbvl.balance import Balancer

    gen = torch.Generator().manual_seed(0)
    g = 0.3 * torch.randn(3, OUT, IN, generator=gen, dtype=torch.float64)
    tracker, balancer = toy_tracker(3), Balancer(3, update_every=1, lam=3.0)
    feed(tracker, [{0: (10, 10 * g[0]), 1: (10, 10 * g[1])}])
    first = balancer.step(1, tracker)
    assert first["stale"] == [2] and first["p"][2] == pytest.approx(1 / 3)
    assert first["p"][0] != pytest.approx(first["p"][1])  # the rule moved the others
    feed(tracker, [{0: (10, 10 * g[0]), 2: (10, 10 * g[2])}])
    second = balancer.step(2, tracker)
    assert second["stale"] == [1] and second["p"][2] != pytest.approx(first["p"][2])
