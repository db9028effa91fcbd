"""The tracker's batched backward against its definition: each domain's part is the gradient of that domain's
token-mean loss by plain autograd, whatever the number of domains present (1, 3, 16) and however the rows lie
(sorted in equal segments: views; sorted unequal or interleaved: per-row products summed by domain); the weight
gradient stays the plain one; no host sync in a micro-batch (CPU stand-ins here, `gpu`-marked tests on CUDA)."""

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rbvl.balance import GradientTracker, grouped, label_tokens, layers
from rbvl.balance.grouped import _grouped_mode
from rbvl.balance.sketch import _sketch_domains
from rbvl.train.metrics import WindowStats

VOCAB, SEQ = 64, 6
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(device="cpu", r=2):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # zero at init; moved so lora_A gets gradients too
    return model.to(device)


def batch(n_domains: int, layout: str, device="cpu"):
    """Samples of `n_domains` domains: 'equal' (sorted, equal segments), 'sorted' (sorted, unequal), 'interleaved'.
    Labels cover a domain-dependent share of each sample, so domains differ in tokens."""
    n = 2 * n_domains + (layout != "equal")
    domains = torch.arange(n) % n_domains
    if layout != "interleaved":
        domains = domains.sort().values
    g = torch.Generator().manual_seed(n_domains)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    for row, d in enumerate(domains.tolist()):
        labels[row, : 1 + d % 3] = -100  # domain d's answers are shorter the larger d % 3
    return ids.to(device), labels.to(device), domains


def token_loss_sums(model, ids, labels):
    logits = model(ids) if isinstance(model, nn.Sequential) else model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    return ce.sum(1)  # (B,)


def per_domain_reference(model, tracker, ids, labels, domains):
    """(m, P) each domain's token-mean loss gradient by plain autograd (the tracker switched off), and the plain
    weight gradient of the micro-batch's token-mean loss."""
    tracker.enabled = False
    weights = [mod.weight for _, mod in tracker.modules]
    tokens = label_tokens(labels).cpu()
    rows = torch.zeros(tracker.m, tracker.n_params, dtype=torch.float64)
    for d in domains.unique().tolist():
        mine = (domains == d).to(ids.device)
        loss = (token_loss_sums(model, ids, labels) * mine).sum() / tokens[domains == d].sum()
        rows[d] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]).double().cpu()
    loss = token_loss_sums(model, ids, labels).sum() / tokens.sum()
    plain = [g.detach().clone() for g in torch.autograd.grad(loss, weights)]
    tracker.enabled = True
    return rows, plain


def tracked_micro_batch(model, tracker, ids, labels, domains, loss_scale=1.0):
    tracker.set_domains(domains, tokens=label_tokens(labels).cpu())
    loss = token_loss_sums(model, ids, labels).sum() / label_tokens(labels).sum()
    tracker.watch_loss(loss, normalizer=label_tokens(labels).cpu().sum())
    (loss * loss_scale).backward()  # a 1/grad_accum or loss-scaler factor: the tracker reads it off the gradient


@pytest.mark.parametrize("layout", ["equal", "sorted", "interleaved"])
@pytest.mark.parametrize("n_domains", [1, 3, 16])
@pytest.mark.parametrize("r", [2, 4])  # LoRA rank 4: every tracked layer's rows are 16-byte units (grouped products)
def test_parts_match_per_domain_autograd(n_domains, layout, r, monkeypatch):
    model = lora_llama(r=r)
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(n_domains, layout)
    reference, plain = per_domain_reference(model, tracker, ids, labels, domains)
    model.zero_grad()
    grouped = []
    _grouped_mode(torch.device("cpu"), torch.float32)  # its one trial product is not counted below
    product = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: grouped.append(1) or product(*a, **kw))
    tracked_micro_batch(model, tracker, ids, labels, domains, loss_scale=0.25)
    # sorted in unequal segments: one grouped product per layer where the rows allow it; never otherwise
    assert len(grouped) == (len(tracker.modules) if (layout, r) == ("sorted", 4) and n_domains > 1 else 0)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-7)
    for (_, mod), g in zip(tracker.modules, plain, strict=True):  # the gradient training uses: the plain one
        torch.testing.assert_close(mod.weight.grad, 0.25 * g, rtol=1e-5, atol=1e-7)
    assert isinstance(tracker._scale, torch.Tensor), "the loss scale stays a tensor: no host read in the hook"


@pytest.mark.parametrize("budget", ["one domain at a time", "row chunks", "a flush per layer", "no part held"])
def test_large_layer_paths_match(budget, monkeypatch):
    """A layer too large for k parts at once goes one domain at a time; B row parts too large go in row chunks; parts
    past the staging budget are flushed inside the backward pass, layer by layer; parts past HOLD_BELOW go at once."""
    model = lora_llama()
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(3, "interleaved")
    reference, plain = per_domain_reference(model, tracker, ids, labels, domains)
    largest = max(mod.weight.numel() for _, mod in tracker.modules)
    if budget == "a flush per layer":
        monkeypatch.setattr("rbvl.balance.staging.STAGE_BUDGET", 0)
    elif budget == "no part held":
        monkeypatch.setattr("rbvl.balance.staging.HOLD_BELOW", {"cpu": 0})
    else:
        monkeypatch.setattr("rbvl.balance.layers.PART_BUDGET", 1 if budget == "one domain at a time" else 3 * largest)
    model.zero_grad()
    tracked_micro_batch(model, tracker, ids, labels, domains)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-7)
    for (_, mod), g in zip(tracker.modules, plain, strict=True):
        torch.testing.assert_close(mod.weight.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cached", [True, False])
def test_sketched_window_is_the_sketch_of_the_exact_window(cached, monkeypatch):
    """The sketch is linear: what the sketched tracker accumulates with one multiply-add per run of a layer (signs
    cached, or applied per call past the cache's budget) is the sketch of the exact per-domain sums."""
    if not cached:
        monkeypatch.setattr("rbvl.balance.tracker.SIGN_CACHE_BYTES", 0)
    model = lora_llama()
    exact = GradientTracker(model, 16)
    exact.remove()
    sketched = GradientTracker(model, 16, sketch_dim=exact.n_params // 3, seed=5)
    assert all((c is not None) == cached for c in sketched.sketches.signs)
    sketched.remove()
    for layout in ("sorted", "interleaved"):
        for tracker in (exact, sketched):
            tracker.attach()
            tracked_micro_batch(model, tracker, *batch(3, layout))
            tracker.remove()
    want = _sketch_domains(exact.sums, sketched.sketches, torch.zeros_like(sketched.sums[0]))
    torch.testing.assert_close(sketched.sums[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sketched.sq, exact.sq, rtol=1e-5, atol=1e-12)  # ‖s_ik‖² of the unsketched parts


def test_old_checkpoint_keys_load():
    """The tracker's state keys are those of checkpoints written before the batched backward: they still load."""
    model = lora_llama()
    tracker = GradientTracker(model, 4, sketch_dim=64)
    keys = {"sums", "tokens", "tokens_sq", "sq", "last_diag", "has_diag", "last", "seen", "names", "sketch_dim",
            "seed", "skipped_steps", "extra_flops"}  # fmt: skip
    state = tracker.state_dict()
    assert set(state) == keys | {"sketch"}
    tracker.load_state_dict(state)


def test_a_window_saved_under_the_older_sketch_restarts(caplog):
    """A state without the sketch layout's name (saved by the hashed-scatter sketch) is not mixed into this window:
    the window and the last seen gradients restart, with a warning; an exact tracker's state loads as it is."""
    model = lora_llama()
    for sketch_dim, restarts in ((64, True), (0, False)):
        tracker = GradientTracker(model, 16, sketch_dim=sketch_dim)
        tracked_micro_batch(model, tracker, *batch(3, "interleaved"))
        assert tracker.commit()
        state = tracker.state_dict()
        del state["sketch"]
        tracker.remove()
        fresh = GradientTracker(model, 16, sketch_dim=sketch_dim)
        caplog.clear()
        fresh.load_state_dict(state)
        assert ("older sketch layout" in caplog.text) == restarts
        assert (fresh.tokens.sum() == 0) == restarts and (fresh.sums[0].abs().sum() == 0) == restarts
        fresh.remove()


def test_window_stats_stay_on_the_loss_device():
    stats = WindowStats(3)
    stats.add(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 2, 4]), torch.tensor([0, 2, 2]), input_tokens=7)
    assert stats.stats.device == torch.device("cpu")
    row = stats.pop(_OneProcess())
    assert row["loss_per_domain"] == [1.0, None, 1.0] and row["samples_per_domain"] == [1.0, 0.0, 2.0]


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def all_reduce(t):
        return t


# ---------------------------------------------------------------------------------------------------------------------
# On CUDA (scripts/gpu_check.sh runs these; skipped without a device)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["equal", "sorted", "interleaved"])
def test_cuda_parts_match_per_domain_autograd(layout):
    model = lora_llama("cuda", r=8)  # rows of 16-byte units even in bf16: sorted rows take grouped products
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(3, layout, "cuda")
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    tracked_micro_batch(model, tracker, ids, labels, domains)
    torch.testing.assert_close(tracker.domain_grads().double().cpu(), reference, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sorted", "interleaved"])
@pytest.mark.parametrize("sketch_dim", [0, 256])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_micro_batch_has_no_host_sync(bf16, sketch_dim, layout):
    """set_domains, forward, watch_loss, backward and the loss stats of a micro-batch never wait on the device, in
    fp32 and under bf16 autocast (sorted rows: grouped products where the GPU has a grouped kernel, else one-hot)."""
    torch.manual_seed(0)  # a plain stack (a transformers model's own mask code may sync): the tracker's path alone
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, VOCAB)).cuda()
    tracker = GradientTracker(model, 16, params=[r"^1$", r"^3$"], sketch_dim=sketch_dim)
    stats = WindowStats(16)
    ids, labels, domains = batch(3, layout)  # on the CPU, as the loader gives them
    tokens = label_tokens(labels)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        tracked_micro_batch(model, tracker, ids.cuda(), labels.cuda(), domains)  # warm-up: allocator, caches
    ids, labels = ids.pin_memory().to("cuda", non_blocking=True), labels.pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker.set_domains(domains, tokens=tokens)
        with autocast:
            per_sample = token_loss_sums(model, ids, labels)
            loss = per_sample.sum() / tokens.sum().to("cuda", non_blocking=True)
        tracker.watch_loss(loss, normalizer=tokens.sum())
        loss.backward()
        stats.add(per_sample.detach(), tokens, domains)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tracker.tokens.sum() > 0


@pytest.mark.parametrize("syncs", [{torch.float32}, {torch.float32, None}])
def test_grouped_product_that_reads_the_host_is_refused(syncs, monkeypatch):
    """On CUDA a grouped product runs without a host read only with bf16 in and out on sm90 / sm100; elsewhere PyTorch
    loops over the groups after copying the offsets to the host. The trial product runs under CUDA's sync check and a
    mode that syncs is refused: the other out dtype, or none (one-hot products). Simulated on the CPU: a guard that
    marks the check, and a product that raises as the check does when its out dtype is in `syncs`."""
    checking = []

    @contextlib.contextmanager
    def guard(device):
        checking.append(device)
        yield
        checking.pop()

    product = torch.nn.functional.grouped_mm

    def syncing_product(a, b, offs=None, out_dtype=None):
        if checking and out_dtype in syncs:
            raise RuntimeError("called a synchronizing CUDA operation")
        return product(a, b, offs=offs, out_dtype=out_dtype)

    monkeypatch.setattr(grouped, "_refuse_host_sync", guard)
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", syncing_product)
    monkeypatch.setattr(grouped, "_GROUPED", {})
    assert _grouped_mode(torch.device("cpu"), torch.float32) == (None if None in syncs else "same")
    model = lora_llama(r=4)  # rows of 16-byte units: sorted rows would take grouped products
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(3, "sorted")
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    tracked_micro_batch(model, tracker, ids, labels, domains)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["sorted", "interleaved"])
@pytest.mark.parametrize("n_domains", [1, 3])
def test_backward_inside_cpu_autocast_keeps_parts_fp32(n_domains, layout):
    """A backward pass run inside `torch.autocast` (as some loops do) must not turn the tracker's sums to bf16 (sorted
    rows: grouped products in bf16)."""
    model = lora_llama(r=8)
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(n_domains, layout)
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracked_micro_batch(model, tracker, ids, labels, domains)
    assert tracker.commit()
    assert all(s.dtype == torch.float32 for s in tracker.sums) and tracker.sq.dtype == torch.float64
    bf16 = 3e-3  # bf16 rounding of the activations (seen: 1.3e-3 to 2.3e-3 here; gradients up to 0.23)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=0.1, atol=bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sorted", "interleaved"])
def test_cuda_bf16_autocast_and_fp16_scaler(layout):
    model = lora_llama("cuda", r=8)
    tracker = GradientTracker(model, 16, guard_nonfinite=True)
    ids, labels, domains = batch(3, layout, "cuda")
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tracked_micro_batch(model, tracker, ids, labels, domains)
    assert tracker.commit()
    bf16 = 3e-3  # bf16 rounding of the activations (seen: 1.2e-3 on an H200, 2.3e-3 on a CPU; gradients up to 0.23)
    torch.testing.assert_close(tracker.domain_grads().double().cpu(), reference, rtol=0.1, atol=bf16)
    tracker.reset()
    scaler = torch.amp.GradScaler("cuda")
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        tracked_micro_batch(model, tracker, ids, labels, domains, loss_scale=scaler.get_scale())
    assert tracker.commit()
    torch.testing.assert_close(tracker.domain_grads().double().cpu(), reference, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("held", [True, False])
def test_window_is_current_when_backward_returns_and_reused_layers_add_up(held, monkeypatch):
    """The staged norms and sketches reach the window in the autograd callback at the end of the backward pass (no
    later call needed); a layer run twice in one pass adds both parts, and both squared norms (as before staging),
    whether its parts are held to the end of the pass or go at once."""
    if not held:
        monkeypatch.setattr("rbvl.balance.staging.HOLD_BELOW", {"cpu": 0})
    torch.manual_seed(0)
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential()
    model.lin = lin
    for sketch_dim in (0, 8):
        tracker = GradientTracker(model, 2, params=[r"^lin$"], sketch_dim=sketch_dim)
        x = torch.randn(3, 4)
        tracker.set_domains([1, 1, 1])
        h = lin(x)
        h.retain_grad()
        loss = lin(h).square().sum()
        tracker.watch_loss(loss, normalizer=1.0)
        (0.5 * loss).backward()
        y_grad = 2 * lin(h).detach()  # ∂loss/∂y
        parts = [y_grad.T @ h.detach(), (2 * h.grad).T @ x]  # the outer call's part, the inner call's (unscaled)
        assert not tracker._pending and not tracker._queued
        torch.testing.assert_close(tracker.sq[1], sum(p.double().square().sum() for p in parts), rtol=1e-5, atol=0)
        if sketch_dim == 0:
            torch.testing.assert_close(tracker.sums[0][1], parts[0] + parts[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lin.weight.grad, 0.5 * (parts[0] + parts[1]), rtol=1e-5, atol=1e-6)
        else:
            assert tracker.sums[0][1].abs().sum() > 0 and tracker.sums[0][0].abs().sum() == 0
        tracker.remove()
        lin.weight.grad = None


def _backward_records(model, tracker, n_domains):
    ids, labels, domains = batch(n_domains, "interleaved")
    tracked_micro_batch(model, tracker, ids, labels, domains)  # warm-up: staging buffers for this k
    tracker.set_domains(domains, tokens=label_tokens(labels))
    loss = token_loss_sums(model, ids, labels).sum() / label_tokens(labels).sum()
    tracker.watch_loss(loss, normalizer=label_tokens(labels).sum())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return len(prof.events())


@pytest.mark.parametrize("sketch_dim", [0, 64])
def test_backward_operations_do_not_grow_with_the_domains_present(sketch_dim):
    """O(1) operations per tracked layer: the backward pass of a micro-batch with 3 domains present launches as many
    operations as one with 16 (rows interleaved, the general path)."""
    model = lora_llama()
    tracker = GradientTracker(model, 16, sketch_dim=sketch_dim)
    assert _backward_records(model, tracker, 3) == _backward_records(model, tracker, 16)


def test_a_recurring_composition_reuses_its_grouping_and_stays_exact(monkeypatch):
    """Micro-batches of one composition share a row grouping (made once); the window still adds every one of them:
    twice the same micro-batch gives twice its tokens and squared norms, and the same token-mean gradients."""
    model = lora_llama(r=4)
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(3, "sorted")
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    tracked_micro_batch(model, tracker, ids, labels, domains)
    once_tokens, once_sq, grouping = tracker.tokens.clone(), tracker.sq.clone(), tracker._groups["sample"]
    tracked_micro_batch(model, tracker, ids, labels, domains)
    assert tracker._groups["sample"] is grouping and grouping.stage is None
    torch.testing.assert_close(tracker.tokens, 2 * once_tokens)
    torch.testing.assert_close(tracker.sq, 2 * once_sq)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(layers._GroupCache, "MAX", 2)
    for n in range(1, 6):  # other compositions: the cache stays within its bound
        tracker.set_domains(torch.arange(n) % 3)
        assert len(tracker._grouping) <= 2


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("sketch_dim", [0, 256])
def test_the_window_follows_the_layers_to_their_device(sketch_dim, explicit):
    """A tracker built while the layers lie on one device, which then move (here: built on the meta device and
    materialised on the CPU, as a deferred init does; on a GPU, a Trainer that places or shards the model after the
    tracker is built), moves its window there at the next micro-batch, or at `to(device)` between set_domains and the
    forward pass (the micro-batch's row groupings move too), and tracks there as a tracker built there does (the
    sketch's hashing is seeded: the same)."""
    direct_model = lora_llama(r=4)
    direct = GradientTracker(direct_model, 16, sketch_dim=sketch_dim)
    model = lora_llama(r=4).to("meta")
    tracker = GradientTracker(model, 16, sketch_dim=sketch_dim)
    assert tracker.sq.device.type == "meta"
    ids, labels, domains = batch(3, "sorted")
    tokens = label_tokens(labels)
    if explicit:
        tracker.set_domains(domains, tokens=tokens)  # still on the meta device
    model.to_empty(device="cpu")
    model.load_state_dict(direct_model.state_dict())
    for name, buffer in direct_model.named_buffers():  # the rotary tables too (not in the state dict)
        model.get_buffer(name).copy_(buffer)
    tracked_micro_batch(direct_model, direct, ids, labels, domains)
    if explicit:
        tracker.to("cpu")
        loss = token_loss_sums(model, ids, labels).sum() / tokens.sum()
        tracker.watch_loss(loss, normalizer=tokens.sum())
        loss.backward()
    else:
        tracked_micro_batch(model, tracker, ids, labels, domains)
    assert all(s.device.type == "cpu" for s in [*tracker.sums, tracker.sq, tracker.last])
    for mine, theirs in zip([*tracker.sums, tracker.sq], [*direct.sums, direct.sq], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tracker.gram(), direct.gram())


def test_the_window_moves_only_when_the_layers_move():
    """Only a move of the layers moves the window: the meta device (shapes only: offload hooks, a dry run) never takes
    it, and a window placed by `to` (where an FSDP2 step with CPU offload computes) stays while the layers' weights
    rest where they were. Nothing loads into a window on the meta device."""
    model = lora_llama(r=4)
    tracker = GradientTracker(model, 16)
    ids, labels, domains = batch(3, "sorted")
    tracked_micro_batch(model, tracker, ids, labels, domains)
    sums = [s.clone() for s in tracker.sums]
    state = tracker.state_dict()
    model.to("meta")
    tracker.set_domains(domains)
    assert tracker.sq.device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(tracker.sums, sums, strict=True))
    model.to_empty(device="cpu")  # back where the window is: nothing to move
    tracker.set_domains(domains)
    tracker.to("meta")  # placed by hand
    tracker.set_domains(domains)  # the layers have not moved since: it stays
    assert tracker.sq.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta device, where nothing can be loaded"):
        tracker.load_state_dict(state)


def test_a_failed_end_of_pass_leaves_no_grouping_staged(monkeypatch):
    """Row groupings are cached across micro-batches: if adding one pass's parts fails, no grouping may keep its
    stage (the next micro-batch of that composition would stage into it and never reach the window)."""
    tracker = GradientTracker(lora_llama(r=4), 16)
    groups = [tracker._grouping.of([0, 1], None), tracker._grouping.of([2, 2], None)]
    for g in groups:  # two groupings staged in one pass
        g.stage = object()
    tracker._pending = list(groups)
    monkeypatch.setattr(type(tracker), "_flush", lambda self, stage, g: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        tracker._end_backward()
    assert all(g.stage is None for g in groups) and not tracker._pending
