"""A PEFT LoRA layer whose A and B are both tracked runs as one autograd function (`_TrackedLoRA`): one forward and one
backward in Python per adapter instead of two, none of PEFT's per-call bookkeeping, and fewer passes over the output
(the scaling on the rank-r side, B's product accumulated into the base layer's output).

    y = base(x) + B (s · A dropout(x))

The backward computes what PEFT's path through the two tracked linears computes (with v = s · A x and δ = ∂L/∂y:
∂L/∂B = δᵀ v, δ_A = δ (s · B), ∂L/∂A = δ_Aᵀ x, ∂L/∂x = δ_A A) and hands both layers' per-domain parts to the tracker
(`weight_grad`). Whatever this function does not cover runs PEFT's own forward, which goes through the two tracked
linears: adapters disabled or merged, several adapters active, a LoRA variant (DoRA), a bias on B (lora_bias), extra
forward arguments (adapter_names), tracking off, no gradient, and tracing under torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rbvl.balance.layers import Routed, _Groups, outside_autocast, weight_grad


def lora_pairs(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, str, int, int]]:
    """(layer name, PEFT LoRA linear, adapter, index of its A, index of its B) for every adapter whose A and B are both
    among the tracked `names`, on a plain `peft.tuners.lora.layer.Linear` (quantized and other subclasses keep their
    own forward)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for name, mod in model.named_modules():
        if type(mod).__name__ != "Linear" or type(mod).__module__ != "peft.tuners.lora.layer":
            continue
        if not hasattr(mod, "_cast_input_dtype"):  # a PEFT version whose forward this module does not mirror
            continue
        prefix = f"{name}." if name else ""
        for adapter in mod.lora_A:
            ia, ib = index.get(f"{prefix}lora_A.{adapter}"), index.get(f"{prefix}lora_B.{adapter}")
            if ia is None or ib is None or adapter not in mod.lora_B:
                continue
            if mod.lora_A[adapter].bias is not None or mod.lora_B[adapter].bias is not None:
                continue
            pairs.append((name, mod, adapter, ia, ib))
    return pairs


def lora_forward(tracker, layer: nn.Module, adapter: str, ia: int, ib: int):
    """The forward GradientTracker gives `layer` (a PEFT LoRA linear): one `_TrackedLoRA` for `adapter`, or PEFT's own
    forward where that does not apply (the layer's own at attach time)."""
    peft_forward = layer.__dict__.get("forward") or type(layer).forward.__get__(layer)
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    dropout = layer.lora_dropout[adapter]

    def forward(x, *args, **kwargs):
        if (
            torch.compiler.is_compiling()  # first: dynamo traces PEFT's forward, and none of the checks below
            or args
            or kwargs
            or not (tracker.enabled and torch.is_grad_enabled())
            or layer.disable_adapters
            or layer.merged
            or layer.active_adapters != [adapter]
            or adapter in getattr(layer, "lora_variant", ())
        ):
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x)
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)
        groups = tracker._domains_for(x.shape[0], ia)
        weights = lora_a.weight, lora_b.weight
        return _TrackedLoRA.apply(result, dropout(x), *weights, layer.scaling[adapter], tracker, ia, ib, groups)

    return Routed(tracker, layer, layer.__dict__.get("forward"), forward)


class _TrackedLoRA(torch.autograd.Function):
    """base + s · B A x for one LoRA adapter (`base`: the base layer's output), whose backward hands A's and B's
    per-domain parts to the tracker.

    The scaling goes on the rank-r side, inside the products as their alpha (v = s · A x, and δ (s · B) in the
    backward: no pass to scale either) and B's product accumulates straight into `base` (one `addmm`), where PEFT
    multiplies and adds over the (tokens, out) output: two passes over it fewer in the forward, one in the backward.
    Same maths; under autocast each product rounds once, as autocast's own do.
    """

    @staticmethod
    def forward(ctx, base, x, weight_a, weight_b, scaling: float, tracker, ia: int, ib: int, groups: _Groups):
        ctx.dtypes = base.dtype, x.dtype, weight_a.dtype, weight_b.dtype
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # autocast's casts, once: the backward reuses the saved copies
            dt = torch.get_autocast_dtype(kind)
            x, weight_a, weight_b = x.to(dt), weight_a.to(dt), weight_b.to(dt)
        if scaling == 1:
            v = F.linear(x, weight_a)  # (…, r)
        else:  # s · A x in the product itself (its alpha): no pass over v to scale it
            x2 = x.reshape(-1, x.shape[-1])
            v = torch.addmm(_zero(x2), x2, weight_a.t(), beta=0, alpha=scaling).view(*x.shape[:-1], -1)
        acc = base if base.dtype == v.dtype else base.to(v.dtype)  # PEFT: base + lora in the wider dtype
        out = torch.addmm(acc.reshape(-1, acc.shape[-1]), v.reshape(-1, v.shape[-1]), weight_b.t())
        out = out.view(base.shape)
        ctx.scaling, ctx.tracker, ctx.ia, ctx.ib, ctx.groups = scaling, tracker, ia, ib, groups
        ctx.save_for_backward(x, weight_a, weight_b, v)  # in the compute dtype, as autocast's linears save them
        return out if out.dtype == base.dtype else out.to(base.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return outside_autocast(_TrackedLoRA._backward, ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight_a, weight_b, v = ctx.saved_tensors
        base_dtype, x_dtype, a_dtype, b_dtype = ctx.dtypes
        need_base, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_base = None
        if need_base:
            grad_base = grad_out if grad_out.dtype == base_dtype else grad_out.to(base_dtype)
        delta = grad_out if grad_out.dtype == v.dtype else grad_out.to(v.dtype)  # B's output gradient
        delta2 = delta.reshape(-1, delta.shape[-1])
        if ctx.scaling == 1:  # A's output gradient: δ (s · B), s in the product's alpha
            delta_a = torch.mm(delta2, weight_b).view(v.shape)
        else:
            delta_a = torch.addmm(_zero(delta2), delta2, weight_b, beta=0, alpha=ctx.scaling).view(v.shape)
        grad_b = weight_grad(ctx.tracker, ctx.ib, ctx.groups, delta, v, need_b, b_dtype)
        grad_a = weight_grad(ctx.tracker, ctx.ia, ctx.groups, delta_a, x, need_a, a_dtype)
        grad_x = None
        if need_x:
            grad_x = torch.mm(delta_a.reshape(-1, delta_a.shape[-1]), weight_a).view(x.shape)
            grad_x = grad_x if grad_x.dtype == x_dtype else grad_x.to(x_dtype)
        return grad_base, grad_x, grad_a, grad_b, None, None, None, None, None


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero in `like`'s dtype and device: the ignored input of an `addmm` with beta = 0 (a plain product with
    alpha), made once per dtype and device."""
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


_ZEROS: dict[tuple, torch.Tensor] = {}
