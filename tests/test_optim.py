"""The optimizer rbvl builds: AdamW fused into one kernel where torch has it (`optim.fused`), stepping as torch's
default AdamW does, with and without a GradScaler."""

import pytest
import torch

from rbvl.config import load_config
from rbvl.train.optim import build_optimizer, optimizer_step


def params(device="cpu", seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, device=device)) for shape in ((16, 8), (8,), (3, 16))]


def test_fused_where_the_device_has_it_unless_turned_off():
    fused, _ = build_optimizer(params(), load_config(None, []))
    assert fused.param_groups[0]["fused"] is True
    plain, _ = build_optimizer(params(), load_config(None, ["optim.fused=false"]))
    assert not plain.param_groups[0]["fused"]
    meta, _ = build_optimizer(params("meta"), load_config(None, []))  # a device without a fused kernel here
    assert not meta.param_groups[0]["fused"]


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_a_fused_step_is_the_default_adamw_step(scaled):
    """Five clipped steps with weight decay and warmup: the fused and the default AdamW end at the same weights
    (fp32 rounding apart), through optimizer_step as rbvl train calls it, with a GradScaler too."""
    overrides = ["optim.weight_decay=0.1", "optim.lr=0.01", "optim.max_grad_norm=0.5", "max_steps=5"]
    ends = {}
    for fused in (True, False):
        weights = params()
        cfg = load_config(None, [*overrides, f"optim.fused={str(fused).lower()}"])
        optimizer, scheduler = build_optimizer(weights, cfg)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
        for step in range(5):
            torch.manual_seed(100 + step)
            loss = sum((w * torch.randn_like(w)).sum() ** 2 for w in weights)
            scaler.scale(loss).backward()
            assert optimizer_step(optimizer, scheduler, scaler, weights, cfg.optim.max_grad_norm) == "ok"
        ends[fused] = [w.detach().clone() for w in weights]
    start = params()
    for a, b, w0 in zip(ends[True], ends[False], start, strict=True):
        assert not torch.equal(a, w0)  # the steps moved the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
