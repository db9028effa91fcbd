"""A PEFT LoRA layer whose A and B are both tracked runs as one autograd function (rbvl/balance/lora.py): its parts
and weight gradients against per-domain autograd and against the two tracked linears; every PEFT case it does not
cover (several adapters active, a bias on B, one side tracked, merged or disabled adapters, adapter_names) runs PEFT's
own forward through the tracked linears, and still gives each domain its part."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_balance_dispatch import (
    PROJECTIONS,
    batch,
    lora_llama,
    per_domain_reference,
    token_loss_sums,
    tracked_micro_batch,
)
from transformers import LlamaConfig, LlamaForCausalLM

import rbvl.balance.layers as layers
import rbvl.balance.lora as lora
from rbvl.balance import GradientTracker, label_tokens


@pytest.fixture
def calls(monkeypatch):
    """How many times each tracked function ran: {"lora": pairs, "linear": single tracked linears}."""
    counts = {"lora": 0, "linear": 0}
    for key, cls in (("lora", lora._TrackedLoRA), ("linear", layers._TrackedLinear)):
        apply = cls.apply

        def counted(*args, _apply=apply, _key=key):
            counts[_key] += 1
            return _apply(*args)

        monkeypatch.setattr(cls, "apply", counted)
    return counts


def llama_with(**lora_kwargs):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=PROJECTIONS, **lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("layout", ["sorted", "interleaved"])
@pytest.mark.parametrize("n_domains", [1, 3])
def test_each_adapter_runs_as_one_function(n_domains, layout, calls):
    model = lora_llama(r=4)
    tracker = GradientTracker(model, 4)
    assert len(tracker._lora) == len(PROJECTIONS) and len(tracker.modules) == 2 * len(PROJECTIONS)
    ids, labels, domains = batch(n_domains, layout)
    reference, plain = per_domain_reference(model, tracker, ids, labels, domains)
    model.zero_grad()
    calls.update(lora=0, linear=0)
    tracked_micro_batch(model, tracker, ids, labels, domains)
    assert calls == {"lora": len(PROJECTIONS), "linear": 0}
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-7)
    for (_, mod), g in zip(tracker.modules, plain, strict=True):
        torch.testing.assert_close(mod.weight.grad, g, rtol=1e-5, atol=1e-7)
    tracker.remove()  # the LoRA layers get PEFT's forward back
    assert not any("forward" in layer.__dict__ for _, layer, *_ in tracker._lora)


@pytest.mark.parametrize("sketch_dim", [0, 40])
def test_one_function_equals_the_two_tracked_linears_with_dropout(sketch_dim, monkeypatch):
    """With dropout (the same masks: one seed), the pair's function and the two tracked linears give the same window,
    squared norms and weight gradients."""
    model = llama_with(lora_dropout=0.3)
    ids, labels, domains = batch(3, "sorted")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(GradientTracker, "pair_lora", fused)
        tracker = GradientTracker(model, 4, sketch_dim=sketch_dim, seed=1)
        assert bool(tracker._lora) == fused
        model.zero_grad()
        torch.manual_seed(7)
        tracked_micro_batch(model, tracker, ids, labels, domains, loss_scale=0.5)
        grads = [mod.weight.grad.clone() for _, mod in tracker.modules]
        results.append(([s.clone() for s in tracker.sums], tracker.sq.clone(), grads))
        tracker.remove()
    (sums, sq, grads), (sums_ref, sq_ref, grads_ref) = results
    for a, b in zip([*sums, sq, *grads], [*sums_ref, sq_ref, *grads_ref], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert sq.abs().sum() > 0


def test_cpu_autocast_pair_rounds_as_the_tracked_linears(monkeypatch):
    """Under bf16 autocast the pair's function (its products rounded once each, the scaling on the rank-r side) is as
    close to the fp32 per-domain gradients as the two tracked linears are, and keeps the window in fp32."""
    model = lora_llama(r=4)
    ids, labels, domains = batch(3, "sorted")
    fp32 = GradientTracker(model, 4)
    reference, _ = per_domain_reference(model, fp32, ids, labels, domains)
    fp32.remove()
    errors = {}
    for fused in (True, False):
        monkeypatch.setattr(GradientTracker, "pair_lora", fused)
        tracker = GradientTracker(model, 4)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tracked_micro_batch(model, tracker, ids, labels, domains)
        assert all(s.dtype == torch.float32 for s in tracker.sums)
        errors[fused] = float((tracker.domain_grads().double() - reference).norm() / reference.norm())
        tracker.remove()
    assert errors[True] < 2e-2 and errors[False] < 2e-2, errors
    assert errors[True] <= 1.5 * errors[False] + 1e-3, errors


def two_adapters():
    model = lora_llama(r=4)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # PEFT: no base bias, so no merging; not used here
@pytest.mark.parametrize(
    "case",
    ["two adapters active", "a bias on B", "only B tracked", "adapter_names"],
)
def test_peft_cases_it_does_not_cover_run_the_tracked_linears(case, calls):
    params, forward_kwargs = "lora", {}
    if case == "two adapters active":
        model = two_adapters()
    elif case == "a bias on B":
        model = llama_with(lora_bias=True)
    else:
        model = lora_llama(r=4)
        if case == "only B tracked":
            params = [r"lora_B\."]
    tracker = GradientTracker(model, 4, params=params)
    ids, labels, domains = batch(3, "interleaved")
    if case == "adapter_names":  # PEFT's mixed-batch forward: each sample names its adapter
        forward_kwargs = {"adapter_names": ["default"] * ids.shape[0]}
        model.eval()  # PEFT takes adapter_names at inference only
        tracker.enabled = False
        with torch.no_grad():
            want = model(input_ids=ids, **forward_kwargs).logits
        tracker.enabled = True
        calls.update(lora=0, linear=0)
        tracker.set_domains(domains)
        with torch.no_grad():
            got = model(input_ids=ids, **forward_kwargs).logits
        torch.testing.assert_close(got, want)
        assert calls["lora"] == 0
        return
    if case == "two adapters active":
        assert len(tracker._lora) == len(PROJECTIONS) + 2  # paired, but more than one adapter runs: PEFT's forward
    else:
        assert tracker._lora == []
    reference, plain = per_domain_reference(model, tracker, ids, labels, domains)
    model.zero_grad()
    calls.update(lora=0, linear=0)
    tracked_micro_batch(model, tracker, ids, labels, domains)
    assert calls["lora"] == 0 and calls["linear"] == len(tracker.modules)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-7)
    for (_, mod), g in zip(tracker.modules, plain, strict=True):
        torch.testing.assert_close(mod.weight.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("state", ["merged", "disabled"])
def test_merged_or_disabled_adapters_run_peft_forward(state, calls):
    """Merged adapters (their weights in the base) and `disable_adapter()` take PEFT's forward: the base model's
    output, no tracked function, no parts."""
    model = lora_llama(r=4)
    tracker = GradientTracker(model, 4)
    ids, labels, domains = batch(3, "sorted")
    tracker.enabled = False
    with torch.no_grad():
        tracked = token_loss_sums(model, ids, labels)
    tracker.enabled = True
    tracker.set_domains(domains)
    calls.update(lora=0, linear=0)
    if state == "merged":
        model.base_model.merge_adapter()
        got = token_loss_sums(model, ids, labels)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(got, tracked, rtol=1e-5, atol=1e-5)  # merged: the adapted model's output
    else:
        with model.disable_adapter():
            got = token_loss_sums(model, ids, labels)
        assert not torch.allclose(got, tracked)  # the base model's output, not the adapted one
    assert calls == {"lora": 0, "linear": 0}
    assert tracker.sq.abs().sum() == 0


def test_bf16_base_with_fp32_adapters_adds_as_peft_does(monkeypatch):
    """A bf16 base with fp32 adapters, no autocast: PEFT casts x to the adapters' dtype and adds in fp32, then returns
    the base's dtype; the pair's function does the same (outputs, window and weight gradients as the tracked linears)."""
    model = lora_llama(r=4)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    ids, labels, domains = batch(3, "sorted")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(GradientTracker, "pair_lora", fused)
        tracker = GradientTracker(model, 4)
        model.zero_grad()
        tracker.set_domains(domains)
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        tracked_micro_batch(model, tracker, ids, labels, domains)
        results.append(
            (logits.detach(), tracker.domain_grads(), [mod.weight.grad.clone() for _, mod in tracker.modules])
        )
        assert all(mod.weight.grad.dtype == torch.float32 for _, mod in tracker.modules)
        tracker.remove()
    (logits, g, grads), (logits_ref, g_ref, grads_ref) = results
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-2
    for a, b in zip(grads, grads_ref, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-2


@pytest.mark.slow  # dynamo traces a 1-layer Llama twice: ~10 s
def test_under_torch_compile_peft_forward_runs_and_trains_as_eager():
    """Under torch.compile a LoRA layer takes PEFT's forward (dynamo cannot trace the tracker's staging): the model
    compiles around the tracked linears, fills the window, and gets eager's weight gradients."""
    from rbvl.bench.dispatch import compile_check

    result = compile_check()
    assert result["compiles_off"] is True and result["compiles_tracked"] is True, result
    assert result["tracked_linears"] == 2 * len(PROJECTIONS)
    # at most one graph break per tracked linear (tracing the pair's function instead made 23 graphs here)
    assert result["graphs_tracked"] <= result["tracked_linears"] + 1, result


@pytest.mark.parametrize("fused", [True, False])
def test_a_deep_copy_of_a_tracked_model_is_its_own_untracked_model(fused, monkeypatch):
    """copy.deepcopy of a tracked model (an EMA copy, a reference model) computes with its own weights, as the same
    model never tracked does, and leaves the tracker's window alone; the original keeps tracking exactly, and another
    tracker can attach to the copy."""
    monkeypatch.setattr(GradientTracker, "pair_lora", fused)
    model = lora_llama(r=4)
    tracker = GradientTracker(model, 4)
    ids, labels, domains = batch(3, "sorted")
    reference, _ = per_domain_reference(model, tracker, ids, labels, domains)
    model.zero_grad()

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    plain_twin = copy.deepcopy(twin)  # the copy's copy: never tracked, its forwards its class's own
    assert not any("forward" in mod.__dict__ and hasattr(mod.forward, "tracker") for mod in twin.modules())
    tracker.set_domains(domains, tokens=label_tokens(labels))
    twin_loss = token_loss_sums(twin, ids, labels).sum()
    twin_loss.backward()
    assert tracker.sq.abs().sum() == 0 and all(s.abs().sum() == 0 for s in tracker.sums)  # nothing reached the window
    torch.testing.assert_close(twin_loss, token_loss_sums(plain_twin, ids, labels).sum())
    with torch.no_grad():
        assert not torch.allclose(twin_loss, token_loss_sums(model, ids, labels).sum())  # not the original's weights

    tracker.reset()  # the label tokens that set_domains counted above
    tracked_micro_batch(model, tracker, ids, labels, domains)
    torch.testing.assert_close(tracker.domain_grads().double(), reference, rtol=1e-4, atol=1e-7)
    tracker.remove()
    GradientTracker(twin, 4).remove()  # the copy is free to be tracked on its own


def test_a_deep_copy_of_a_tracked_model_is_freed_by_del():
    """No reference cycle through the copy's forwards: the copy goes as soon as it is deleted, as an untracked
    model's copy does (an EMA or reference model on a GPU holds its memory until then)."""
    import gc
    import weakref

    model = lora_llama(r=4)
    tracker = GradientTracker(model, 4)
    gc.disable()
    try:
        twin = copy.deepcopy(model)
        routed = [n for n, m in model.named_modules() if "forward" in m.__dict__]  # the layers the tracker routes
        gone = [weakref.ref(m) for n, m in twin.named_modules() if n in routed]
        ids, labels, _ = batch(3, "sorted")
        token_loss_sums(twin, ids, labels).sum().backward()
        del twin
        assert len(gone) == len(tracker.modules) + len(tracker._lora) and all(ref() is None for ref in gone)
    finally:
        gc.enable()
    tracker.remove()


def test_an_own_forward_from_before_attach_comes_back_bound_to_the_copy():
    model = lora_llama(r=4)
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    layer.forward = type(layer).forward.__get__(layer)  # a bound method of its own, as some wrappers leave
    tracker = GradientTracker(model, 4)
    twin = copy.deepcopy(model)
    twin_layer = next(m for n, m in twin.named_modules() if n.endswith("q_proj"))
    assert twin_layer.forward.__self__ is twin_layer
    tracker.remove()
    assert layer.forward.__self__ is layer  # the original gets its own back too
