"""The update options and diagnostics by hand: small G, q and p_prev, each formula computed in the test; the Balancer's
state across windows (Ḡ, the instability count) resumes exactly and loads from the older format."""

import logging
import math

import pytest
import torch

from rbvl.balance import Balancer, ProportionSchedule, diagnostics, update_proportions
from rbvl.config import BalanceConfig

G = torch.tensor([[2.0, 0.5, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 3.0]], dtype=torch.float64)
Q = [0.5, 0.3, 0.2]
PREV = [0.6, 0.3, 0.1]


def unit_score(G, q):
    gq = [sum(float(G[i, j]) * q[j] for j in range(3)) for i in range(3)]
    norm = math.sqrt(sum(x * x for x in gq))
    return [x / norm for x in gq]


def softmax(logits):
    e = [math.exp(x) for x in logits]
    return [x / sum(e) for x in e]


def test_sqrt_m_temperature_by_hand():
    u = unit_score(G, Q)
    expected = softmax([1.5 * math.sqrt(3) * x for x in u])
    assert update_proportions(G, Q, lam=1.5, temperature="sqrt_m").tolist() == pytest.approx(expected, rel=1e-12)
    # the logits' root mean square is λ whatever m: at m = 48 as at m = 3
    g = torch.randn(48, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G48, q48 = g @ g.T, torch.rand(48, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    gq = [sum(float(G48[i, j]) * q48[j] for j in range(48)) / sum(q48) for i in range(48)]
    logits = [1.5 * math.sqrt(48) * x / math.sqrt(sum(y * y for y in gq)) for x in gq]
    assert math.sqrt(sum(x * x for x in logits) / 48) == pytest.approx(1.5)
    p = update_proportions(G48, q48, lam=1.5, temperature="sqrt_m")
    assert p.tolist() == pytest.approx(softmax(logits), rel=1e-9)


def test_mirror_step_by_hand():
    u = unit_score(G, Q)
    expected = softmax([math.log(PREV[i]) + 0.7 * u[i] for i in range(3)])  # p ∝ p_prev · exp(η u)
    p = update_proportions(G, Q, lam=3.0, prev=PREV, update="mirror", eta=0.7)
    assert p.tolist() == pytest.approx(expected, rel=1e-12)
    lam_step = softmax([math.log(PREV[i]) + 3.0 * u[i] for i in range(3)])  # eta = 0: the step is λ
    assert update_proportions(G, Q, lam=3.0, prev=PREV, update="mirror").tolist() == pytest.approx(lam_step, rel=1e-12)
    root_m = softmax([math.log(PREV[i]) + 0.7 * math.sqrt(3) * u[i] for i in range(3)])
    p = update_proportions(G, Q, lam=3.0, prev=PREV, update="mirror", eta=0.7, temperature="sqrt_m")
    assert p.tolist() == pytest.approx(root_m, rel=1e-12)
    uniform = softmax([0.7 * x for x in u])  # from uniform p_prev, mirror is replace with λ = η
    assert update_proportions(G, Q, update="mirror", eta=0.7).tolist() == pytest.approx(uniform, rel=1e-12)
    # smoothing and floor apply after the step, as with replace
    floored = update_proportions(G, Q, lam=3.0, prev=PREV, update="mirror", eta=0.7, floor=0.2)
    assert floored.tolist() == pytest.approx([0.2 + 0.4 * x for x in expected], rel=1e-12)
    smooth = update_proportions(G, Q, lam=3.0, prev=PREV, update="mirror", eta=0.7, smoothing=0.5)
    assert smooth.tolist() == pytest.approx([0.5 * x + 0.5 * y for x, y in zip(expected, PREV)], rel=1e-12)
    with pytest.raises(ValueError, match="update must be"):
        update_proportions(G, Q, update="momentum")


def test_mirror_pull_by_hand():
    """pull γ: the step starts from p_prev^(1−γ) · anchor^γ; γ = 0 is plain mirror, γ = 1 replace around the anchor."""
    u = unit_score(G, Q)
    anchor = [0.2, 0.3, 0.5]
    for pull in (0.0, 0.25, 1.0):
        logits = [(1 - pull) * math.log(PREV[i]) + pull * math.log(anchor[i]) + 0.7 * u[i] for i in range(3)]
        p = update_proportions(G, Q, prev=PREV, update="mirror", eta=0.7, pull=pull, anchor=anchor)
        assert p.tolist() == pytest.approx(softmax(logits), rel=1e-12)
    toward_uniform = softmax([0.75 * math.log(PREV[i]) + 0.25 * math.log(1 / 3) + 0.7 * u[i] for i in range(3)])
    p = update_proportions(G, Q, prev=PREV, update="mirror", eta=0.7, pull=0.25)  # no anchor: uniform
    assert p.tolist() == pytest.approx(toward_uniform, rel=1e-12)
    with pytest.raises(ValueError, match="pull must be in"):
        update_proportions(G, Q, prev=PREV, update="mirror", pull=1.5)


def test_pull_bounds_the_walk_of_noise_and_keeps_a_steady_signal():
    """Windows whose G is pure noise: without pull, log p walks away from the start (its spread grows like √t); with
    pull γ it stays within η·max|u|/γ. A score that keeps its sign settles at log p = log anchor + η u / γ."""
    gen = torch.Generator().manual_seed(0)
    m, eta = 8, 0.5
    spread = {}
    for pull in (0.0, 0.2):
        b = Balancer(m, update_every=1, update="mirror", eta=eta, gram_ema=0.0, gram="plugin", pull=pull)
        worst = 0.0
        for _ in range(400):
            g = torch.ones(m, 16, dtype=torch.float64) + 0.3 * torch.randn(m, 16, generator=gen, dtype=torch.float64)
            p, _ = b.update(g @ g.T)
            b.schedule.publish(p, 0)
            worst = max(worst, max(abs(math.log(x * m)) for x in p))
        spread[pull] = worst
    assert spread[0.2] <= eta / 0.2  # |u_i − mean u| ≤ 1 for a unit vector: log-ratios stay within η / γ
    assert spread[0.0] > 2 * spread[0.2]
    # a fixed G: the fixed point of the pulled step, reached geometrically
    b = Balancer(3, update_every=1, update="mirror", eta=0.7, gram_ema=0.0, gram="plugin", pull=0.25)
    for _ in range(200):
        p, _ = b.update(G)
        b.schedule.publish(p, 0)
    u = unit_score(G, [1 / 3] * 3)
    assert p == pytest.approx(softmax([0.7 * x / 0.25 for x in u]), rel=1e-9)


def test_diagnostics_by_hand():
    d = diagnostics(G, Q, plugin_diag=[2.5, 1.0, 4.0])
    assert d["grad_norm"] == pytest.approx([math.sqrt(2), 1.0, math.sqrt(3)])
    gq = [sum(float(G[i, j]) * Q[j] for j in range(3)) for i in range(3)]
    target = math.sqrt(sum(Q[i] * gq[i] for i in range(3)))  # ‖Σ_j q_j g_j‖ = √(qᵀ G q)
    cos = [gq[i] / (d["grad_norm"][i] * target) for i in range(3)]
    assert d["alignment"] == pytest.approx(cos) and d["gram_noise"] == pytest.approx([0.5, 0.0, 1.0])
    # an unbiased G_ii may come out ≤ 0 in a noisy window: its norm is 0 and its cosine undefined (None), never NaN
    noisy = G.clone()
    noisy[1, 1] = -0.2
    d = diagnostics(noisy, Q)
    assert d["grad_norm"][1] == 0 and d["alignment"][1] is None and "gram_noise" not in d


class ScriptedTracker:
    """Stands in for the GradientTracker: each window's gram() returns the next scripted (G, plug-in diagonal)."""

    def __init__(self, windows):
        self.windows, self.skipped_steps, self.tokens = list(windows), 0, torch.ones(3, dtype=torch.float64)

    def commit(self, skip=False):
        return True

    def sync(self):
        pass

    def stale(self):
        return []

    def reset(self):
        self.windows.pop(0)

    def gram(self, estimator="unbiased", with_info=False):
        G, plugin = self.windows[0]
        out = G.clone()
        if estimator == "plugin":
            out.diagonal().copy_(torch.tensor(plugin, dtype=torch.float64))
        info = {"plugin_diag": plugin, "unbiased_diag": G.diagonal().tolist(), "diag_fallback": {2: "previous"}}
        return (out, info) if with_info else out


G2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)


def test_gram_ema_and_estimator_in_the_balancer_by_hand():
    bal = Balancer(3, target=Q, update_every=1, lam=2.0, gram_ema=0.75, update="replace", gram="unbiased")
    tracker = ScriptedTracker([(G, [3.0, 2.0, 5.0]), (G2, [1.5, 4.5, 1.0])])
    first = bal.step(1, tracker)
    assert first["p"] == pytest.approx(softmax([2.0 * x for x in unit_score(G, Q)]), rel=1e-12)  # Ḡ starts at G
    second = bal.step(2, tracker)
    avg = 0.75 * G + 0.25 * G2
    assert second["p"] == pytest.approx(softmax([2.0 * x for x in unit_score(avg, Q)]), rel=1e-12)
    assert second["gram_ema"] == avg.tolist() and second["gram"] == G2.tolist()  # the window's G, and Ḡ
    assert second["gram_noise"] == pytest.approx([0.5, 0.5, 0.5]) and second["gram_fallback"] == {"2": "previous"}
    assert second["grad_norm"] == pytest.approx([1.0, 2.0, math.sqrt(0.5)])
    assert second["p_l1_change"] == pytest.approx(sum(abs(a - b) for a, b in zip(second["p"], first["p"])))
    plugin = Balancer(3, target=Q, update_every=1, lam=2.0, gram="plugin", update="replace", gram_ema=0.0)
    info = plugin.step(1, ScriptedTracker([(G, [3.0, 2.0, 5.0])]))
    by_plugin = G.clone()
    by_plugin.diagonal().copy_(torch.tensor([3.0, 2.0, 5.0]))
    assert info["p"] == pytest.approx(softmax([2.0 * x for x in unit_score(by_plugin, Q)]), rel=1e-12)
    assert info["grad_norm"] == pytest.approx([math.sqrt(2), 1.0, math.sqrt(3)]), "diagnostics read the unbiased G"


def test_balancer_state_resumes_exactly_and_loads_the_older_format():
    windows = [(G, [3.0, 2.0, 5.0]), (G2, [1.5, 4.5, 1.0]), (G, [2.0, 1.0, 3.0]), (G2, [1.0, 4.0, 0.5])]
    kw = dict(target=Q, update_every=1, lam=2.0, gram_ema=0.5, update="mirror", eta=0.5, temperature="sqrt_m")
    whole = Balancer(3, **kw)
    tracker = ScriptedTracker(windows)
    whole.step(1, tracker), whole.step(2, tracker)
    state = whole.state_dict()
    rest = [whole.step(3, tracker), whole.step(4, tracker)]
    resumed = Balancer(3, **kw)
    resumed.load_state_dict(state)
    tracker = ScriptedTracker(windows[2:])
    assert [resumed.step(3, tracker), resumed.step(4, tracker)] == rest
    older = Balancer(3, **kw)
    older.load_state_dict({"schedule": state["schedule"]})  # saved before the update carried state: Ḡ starts anew
    assert older.gram_avg is None and older.proportions == resumed.schedule.history()[2][1]


def test_unstable_p_warns_once_with_what_to_do(caplog):
    flip = torch.diag(torch.tensor([4.0, 0.1, 0.1], dtype=torch.float64))
    flop = torch.diag(torch.tensor([0.1, 0.1, 4.0], dtype=torch.float64))
    bal = Balancer(3, update_every=1, lam=6.0, update="replace", gram_ema=0.0, gram="unbiased")  # replace: jumps
    tracker = ScriptedTracker([(flip if k % 2 else flop, [1.0] * 3) for k in range(8)])
    with caplog.at_level(logging.WARNING, logger="rbvl.balance.schedule"):
        changes = [bal.step(k, tracker)["p_l1_change"] for k in range(1, 8)]
    assert min(changes[1:]) > 1.0  # p jumps between two vertices
    warnings = [r.getMessage() for r in caplog.records if "balance.lam" in r.getMessage()]
    assert len(warnings) == 1 and "balance.update=mirror" in warnings[0] and "balance.gram_ema" in warnings[0]
    assert bal.state_dict()["warned_unstable"] is True
    calm = Balancer(3, update_every=1, lam=6.0, update="mirror", eta=0.1, gram="unbiased", gram_ema=0.5)
    tracker = ScriptedTracker([(flip if k % 2 else flop, [1.0] * 3) for k in range(8)])
    assert max(calm.step(k, tracker)["p_l1_change"] for k in range(1, 8)) < 0.5 and not calm.warned_unstable


def test_config_keys_reach_the_balancer():
    cfg = BalanceConfig(gram="plugin", update="mirror", eta=0.3, gram_ema=0.8, temperature="sqrt_m")
    bal = Balancer.from_config(3, cfg, schedule=ProportionSchedule(3))
    assert (bal.gram, bal.rule, bal.eta, bal.gram_ema, bal.temperature) == ("plugin", "mirror", 0.3, 0.8, "sqrt_m")
    default = Balancer.from_config(3, BalanceConfig())
    assert (default.gram, default.rule, default.eta, default.gram_ema, default.temperature, default.pull) == (
        "plugin",
        "replace",
        0.5,
        0.0,
        "fixed",
        0.0,
    )  # the paper's rules: what the development settings chose (docs/balance.md)
    plain = Balancer(3)
    assert (plain.gram, plain.rule, plain.eta, plain.gram_ema, plain.pull) == ("plugin", "replace", 0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="balance.update"):
        BalanceConfig(update="jump")


def test_paper_is_one_key_whatever_the_others_say_and_the_resolved_config_shows_it(tmp_path):
    from rbvl.config import load_config, to_dict

    cfg = BalanceConfig(
        update_every=1, paper=True, gram="shrunk", update="mirror", eta=0.3, gram_ema=0.8, temperature="sqrt_m"
    )
    assert (cfg.gram, cfg.update, cfg.gram_ema, cfg.temperature) == ("plugin", "replace", 0.0, "fixed")
    bal = Balancer.from_config(3, cfg, target=Q)
    tracker = ScriptedTracker([(G, [3.0, 2.0, 5.0])])
    by_plugin = G.clone()
    by_plugin.diagonal().copy_(torch.tensor([3.0, 2.0, 5.0]))
    assert bal.step(1, tracker)["p"] == pytest.approx(softmax([3.0 * x for x in unit_score(by_plugin, Q)]))
    run = load_config(None, ["balance.paper=true", "balance.update=mirror"])
    assert to_dict(run)["balance"]["update"] == "replace" and to_dict(run)["balance"]["gram"] == "plugin"
    with pytest.raises(ValueError, match="balance.paper"):
        load_config(None, ["balance.paper=maybe"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Balancer(3, update_every=0).due(1), "Balancer: update_every: got 0, expected an int >= 1"),
        (lambda: Balancer(3, gram="foo"), "Balancer: gram: 'foo' is not one of unbiased, plugin, shrunk"),
        (lambda: Balancer(3, lam=-3), "Balancer: lam: got -3.0, expected a number >= 0"),
        (lambda: Balancer(0), "Balancer: n_domains must be an int >= 1, got 0"),
        (lambda: Balancer(3, schedule=ProportionSchedule(2)), "the schedule has 2 domains, n_domains is 3"),
        (lambda: Balancer(3, target=[0, 0, 0]), "target shares are all 0"),
        (lambda: ProportionSchedule(3, initial=[0.5, 0.5]), r"initial: 2 shares for 3 domains"),
        (lambda: ProportionSchedule(3, initial=[0.7, -0.2, 0.5]), r"finite, >= 0 and not all 0"),
        (lambda: ProportionSchedule(3).publish([0.5, 0.5], 1), r"publish after step 1: 2 shares for 3 domains"),
        (lambda: update_proportions(torch.eye(3), lam=-1), r"lam and eta must be >= 0, got lam=-1"),
        (lambda: update_proportions(torch.ones(3, 2)), r"G must be a square \(m, m\) matrix .*\(3, 2\)"),
    ],
)  # fmt: skip
def test_the_raw_api_says_what_is_wrong_at_once(make, message):
    """The plain-loop classes check what BalanceTrainer's balance= keys check: a typo fails where it is made, not at
    the first update or deep in torch, and a negative λ cannot silently turn the rule around."""
    with pytest.raises(ValueError, match=message):
        make()


def test_the_schedule_holds_p_on_the_simplex_in_step_order():
    schedule = ProportionSchedule(3, initial=[1, 1, 2])  # ratios: divided by their sum
    assert schedule.current() == [0.25, 0.25, 0.5] and schedule.at(1).tolist() == [0.25, 0.25, 0.5]
    schedule.publish([2.0, 1.0, 1.0], after_step=10)
    assert schedule.current() == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match=r"would apply from step 3, before the last one published \(from step 11\)"):
        schedule.publish([0.0, 1.0, 0.0], after_step=2)
    assert schedule.at(12).tolist() == [0.5, 0.25, 0.25]
