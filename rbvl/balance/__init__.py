"""R&B Balance: per-domain gradients from the ordinary backward pass, their Gram matrix, and new proportions.

This package imports torch alone, so any training loop can use it:

    from rbvl.balance import GradientTracker, ProportionSchedule, label_tokens, update_proportions

    tracker = GradientTracker(model, n_domains=m, params="lora", sketch_dim=2**20)
    schedule = ProportionSchedule(m, lag=0)                 # p over optimizer steps; data loaders read it
    for step, (inputs, domain_ids) in enumerate(loader, 1):
        tracker.set_domains(domain_ids, tokens=label_tokens(inputs["labels"]))   # before the forward pass
        loss = model(**inputs).loss                          # = Σ_t ℓ_t / N, the mean over the N label tokens
        tracker.watch_loss(loss, normalizer=label_tokens(inputs["labels"]).sum())
        loss.backward()                                      # the tracked layers hand each domain its part
        optimizer.step(); optimizer.zero_grad()
        tracker.commit()                                     # the step joins the window (dropped if it overflowed)
        if step % K == 0:
            tracker.sync()                                   # sum every rank's window (DDP)
            G = tracker.gram("plugin")                       # (m, m): ĝ_i · ĝ_j, the paper's (as rbvl train)
            p = update_proportions(G, q, lam=3.0)            # softmax(λ · G q / ‖G q‖)
            tracker.reset()
            schedule.publish(p, after_step=step)             # applies from step + 1 + lag

`Balancer(m, target=q, update_every=K, lam=3.0, schedule=schedule).step(step, tracker, skip=overflowed)` does the
lines from `tracker.commit()` on in one call (with a warmup) and returns what to log at each update; `rbvl train`
and `rbvl.integrations.hf` use it. `params="head"` (the LM head and the projector's last linear, as the paper did)
needs the model family's patterns: `head_patterns=rbvl.model.families.head_patterns(model)`.

What g_i is. The gradient of domain i's token-mean loss over the window, g_i = (1 / T_i) Σ_{t ∈ i} ∇ℓ_t (T_i: the
window's label tokens of domain i): the per-domain loss that evaluation reports. The paper's update comes from a
first-order expansion of the target loss after a step on the mixture p', L(θ − η Σ_j p'_j g_j; D_q) ≈
L(θ; D_q) − η qᵀ G p' with G_ij = g_i · g_j and the target gradient Σ_i q_i g_i; so g_i must be the gradient of the
same per-domain loss that q weights. It does not depend on what shares a micro-batch, on gradient accumulation, on
the loss normaliser (`watch_loss` undoes it, and whatever scales the loss after it: 1/grad_accum, a GradScaler, a
Trainer's world-size factor), nor on answer length (a domain with 6× longer answers has 6× the tokens, not a 6×
larger gradient).

Why it is cheap. For a linear map y = x Wᵀ, ∂ℓ/∂W = Σ_t δ_t a_tᵀ (δ: output gradient, a: input). The tracked linears
run a small autograd function whose backward computes that weight gradient as the sum of per-domain parts
Σ_d δ_dᵀ a_d: the same matmul FLOPs, split by rows, so every domain's part comes with the gradient training needs
anyway. What is left is adding each part into its domain's accumulator, O(tracked params) per micro-batch and
domain present, not O(params × tokens). A frozen tracked layer (a frozen LM head under `params="head"`) has no
weight gradient to split, so it pays one weight-gradient product. No extra forward or backward pass.

Memory. Exact (`sketch_dim=0`): m × tracked params fp32 for the window, and each domain's last seen gradient in a
small sketch (FALLBACK_DIM numbers). Sketched: every layer's part goes into one sketch of `sketch_dim` buckets
(entry p = (i, j) of a layer, flattened, into bucket (r + p) mod N from a seeded offset r, with sign s_i · t_j seeded per
row and column; E[⟨S(A), S(B)⟩] = ⟨A, B⟩, so G stays unbiased), so memory is 2 × m × sketch_dim (window + last seen)
whatever the model. The offsets and signs depend only on the seed and the layer shapes, so every rank sketches alike.

Estimating G. The plug-in ĝ_i · ĝ_i is biased up by the window's sampling variance tr Σ_i / n_i, so `gram()` by
default replaces the diagonal by the U-statistic over micro-batches, (‖Σ_k s_ik‖² − Σ_k ‖s_ik‖²) / (T_i² − Σ_k T_ik²)
(s_ik, T_ik: domain i's gradient sum and tokens in micro-batch k), for two extra scalars per domain; `gram("plugin")`
is the paper's. The Balancer's update options (mirror, an EMA of G, an m-aware temperature) and its per-update
diagnostics are described in docs/balance.md.

A domain with no samples in a window keeps its last seen gradient in G (stale, but the best estimate there is): its
column still counts in G q, and its score stays defined. A domain no window has drawn yet keeps its share of p. `tracker.stale()` names
such domains, and `Balancer.step` returns them for the logs.

Files: tracker.py (GradientTracker), staging.py (what its backward pass stages and folds into the window), layers.py
(which layers: `params`; the tracked linear), lora.py (a PEFT LoRA adapter's A and B as one tracked function), sketch.py (the sketch), update.py (G → p), schedule.py (p over
steps; the Balancer).
"""

from rbvl.balance.layers import label_tokens, select_modules
from rbvl.balance.schedule import Balancer, ProportionSchedule
from rbvl.balance.sketch import _sketch_into as _sketch_into  # rbvl bench balance times the sketch alone
from rbvl.balance.tracker import GradientTracker
from rbvl.balance.update import diagnostics, gram, unbiased_diagonal, update_proportions, update_proportions_with_info

__all__ = [
    "Balancer",
    "GradientTracker",
    "ProportionSchedule",
    "diagnostics",
    "gram",
    "label_tokens",
    "select_modules",
    "unbiased_diagonal",
    "update_proportions",
    "update_proportions_with_info",
]
