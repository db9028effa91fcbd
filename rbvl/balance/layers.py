"""Which layers the tracker reads: `params` ("lora", "head", or regexes) → the nn.Linear modules, and which of them
see images (their rows take `image_domain_ids`) rather than samples; which rows of a micro-batch each domain holds; and
`_TrackedLinear`, the autograd function those layers run so that their backward hands each domain its part.

The family table (rbvl.model.families) is not imported here, so rbvl.balance needs torch alone: for `params="head"` the
caller passes the family's head patterns (`rbvl.model.families.head_patterns(model)`).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rbvl.balance.grouped import _grouped_parts

# Modules that see images (or tiles, or patch rows) rather than samples: their rows take `image_domain_ids`.
VISION_SIDE = r"(multi_modal_projector|vision_tower|vision_model|visual|mm_projector|connector|merger)"
# Cross-attention keys and values (Mllama): their rows are each sample's image tiles, (batch · images · tiles) of
# them, sample-major; each row takes its sample's domain.
CROSS_ATTENTION = r"\.cross_attn\.(k_proj|v_proj)(\.|$)"


class TrackingError(ValueError):
    """`params` names no layer of this model (a one-line error in `rbvl train`)."""


def select_modules(
    model: nn.Module, params: str | Sequence[str], head_patterns: Sequence[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers that `params` names (see GradientTracker; `head_patterns` serve `params="head"`)."""
    linears = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if params == "lora":
        found = [(n, mod) for n, mod in linears if re.search(r"\.lora_(A|B)\.[^.]+$", n)]
        if not found:
            raise TrackingError("params='lora' but the model has no LoRA adapters (wrap it with peft.get_peft_model)")
        return found
    if params == "head":
        if head_patterns is None:
            raise TrackingError(
                "params='head' needs head_patterns= (the regexes of the LM head and the projector's last linear for "
                "this model's family), e.g. GradientTracker(model, m, params='head', "
                "head_patterns=rbvl.model.families.head_patterns(model))"
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [
            (n, mod)
            for n, mod in linears
            if "original_module" not in n  # PEFT's frozen copy beside a modules_to_save module
            and (mod is head or any(re.search(p, n) for p in head_patterns))
        ]
        if not found:
            raise TrackingError(
                f"params='head' found no LM head or projector linear in this model (looked for {list(head_patterns)})"
            )
        return found
    if isinstance(params, str):
        params = [params]
    found = []
    for pattern in params:
        hits = [(n, mod) for n, mod in linears if re.search(pattern, n)]
        if not hits:
            raise TrackingError(
                f"balance.params: pattern {pattern!r} matches no nn.Linear module of this model (e.g. "
                f"{', '.join(n for n, _ in linears[:3])}); a regex over module names, or lora / head"
            )
        found += [h for h in hits if h not in found]
    return found


class _Groups:
    """One micro-batch's rows by domain, worked out on the CPU in plain Python from the batch's domain ids before the
    forward pass (a few hundred ids at most: no torch operations), so the backward pass never asks the device where a
    domain's rows are.

    `domains`: the k domains present (sorted; `index`, the same on the tracker's device). `equal`: the rows are sorted
    by domain in segments of equal length (one domain is the common case), so the k parts are one batched product over
    views. `sorted`: each domain's rows are contiguous (`offsets`: where the segments end, for one grouped product).
    `onehot`: (k, B) on the device, which sums the rows' parts into the k domains' parts in one product where neither
    applies; made on first use (sorted rows seldom need it).
    `rows_on(j, device)`: domain j's rows, for a layer too large to hold k parts at once.
    """

    def __init__(self, ids: torch.Tensor | None, device=None):
        ids = [] if ids is None else torch.as_tensor(ids).reshape(-1).tolist()  # ids: (B,) on the CPU
        self.n_rows = len(ids)
        self.domains = sorted(set(ids))
        self.k = len(self.domains)
        counts = {d: ids.count(d) for d in self.domains}
        self.sorted = all(a <= b for a, b in zip(ids, ids[1:]))  # each domain's rows contiguous
        self.equal = self.sorted and len(set(counts.values())) <= 1
        self.index = _to(torch.tensor(self.domains, dtype=torch.long), device)  # (k,)
        self._ends = [sum(counts[d] for d in self.domains[: j + 1]) for j in range(self.k)]  # sorted: segment ends
        self._offsets: dict = {}  # (tokens per row, device) → int32 token offsets of the segments' ends
        self._device, self._onehot = device, None
        self._ids = ids
        self._rows: dict = {}
        self._onehots: dict = {}  # dtype → onehot in it
        self.stage = None  # the tracker's staging buffers while a backward pass stages this micro-batch's parts

    def __len__(self) -> int:
        return self.k

    @property
    def onehot(self) -> torch.Tensor:
        """(k, B): row b's column is 1 at its domain's position, on the device; made once, on first use."""
        if self._onehot is None:
            onehot = torch.tensor([[float(d == domain) for d in self._ids] for domain in self.domains])
            self._onehot = _to(onehot, self._device)
        return self._onehot

    def onehot_as(self, dtype: torch.dtype) -> torch.Tensor:
        """`onehot` in `dtype` (the layers' compute dtype: bf16 under autocast), made once per dtype."""
        if self.onehot.dtype == dtype:
            return self.onehot
        cast = self._onehots.get(dtype)
        if cast is None:
            cast = self._onehots[dtype] = self.onehot.to(dtype)
        return cast

    def offsets(self, per_row: int, device) -> torch.Tensor:
        """Sorted rows: (k,) int32, where each domain's segment ends among the micro-batch's tokens (`per_row` tokens
        per row), the `offs` of a grouped product; made once per (per_row, device)."""
        key = (per_row, device)
        if key not in self._offsets:
            if len(self._offsets) >= 8:  # a cached grouping meets many sequence lengths: keep the latest few
                self._offsets.clear()
            ends = torch.tensor([e * per_row for e in self._ends], dtype=torch.int32)
            self._offsets[key] = _to(ends, device)
        return self._offsets[key]

    def rows_on(self, j: int, device) -> slice | torch.Tensor:
        """Domain j's rows (j: position among the present domains), as a slice or indices on `device`."""
        if (j, device) not in self._rows:
            where = [row for row, d in enumerate(self._ids) if d == self.domains[j]]
            lo, hi = where[0], where[-1] + 1
            rows = slice(lo, hi) if hi - lo == len(where) else _to(torch.tensor(where, dtype=torch.long), device)
            self._rows[(j, device)] = rows
        return self._rows[(j, device)]


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device`: as it is on the CPU; elsewhere through pinned memory, without blocking."""
    kind = None if device is None else torch.device(device).type
    if kind in (None, "cpu"):
        return t
    if kind == "meta":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


SERIAL_BELOW = 2**16  # elements: a smaller scatter on the CPU runs serially (see `add_rows`)


def add_rows(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> None:
    """target[index[j]] += source[j] along dim 0 (repeated indices add up), in one operation.

    index_add_ on a CUDA device, and for a large tensor on the CPU. A small one on the CPU goes through an accumulating
    index_put_, which runs serially: index_add_ and scatter_add_ of a small multi-dimensional tensor open a parallel
    region there, which costs milliseconds whenever the other cores are busy.
    """
    if source.device.type == "cpu" and source.numel() < SERIAL_BELOW:
        target.index_put_((index,), source, accumulate=True)
    else:
        target.index_add_(0, index, source)


def _cpu_ids(ids) -> torch.Tensor:
    """(B,) int64 domain ids on the CPU (no operation when they are that already)."""
    ids = torch.as_tensor(ids)
    if ids.dtype != torch.long:
        ids = ids.long()
    if ids.device.type != "cpu":
        ids = ids.cpu()
    return ids if ids.dim() == 1 else ids.reshape(-1)


def _row_groups(ids: torch.Tensor | None, device=None) -> _Groups:
    """The rows of each domain present in a micro-batch (`ids`: (B,) domain ids on the CPU)."""
    return _Groups(ids, device)


class _GroupCache(dict):
    """Row groupings by micro-batch composition (the ids in row order), each made once: rbvl's loader sorts every
    micro-batch by domain, so a composition is its domains' counts, and few of those recur over and over. A grouping
    holds no state of its own between backward passes (its `stage` is cleared when a pass ends). At most MAX kept."""

    MAX = 256

    def of(self, ids: list[int] | None, device) -> _Groups:
        key = None if ids is None else tuple(ids)
        groups = self.get(key)
        if groups is None:
            if len(self) >= self.MAX:
                self.clear()
            groups = self[key] = _row_groups(ids, device)
        return groups


def label_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B,) label tokens per sample that a causal LM loss averages over (labels shifted by one, as HF models do)."""
    return (labels[:, 1:] != ignore_index).sum(1)


class _TrackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward computes ∂L/∂W as Σ_d δ_dᵀ a_d and hands the domains' parts to the tracker.

    One domain present: the plain product, which is that domain's part. More: one batched product per layer whatever
    the number of domains present (`domain_parts`). So the operations a micro-batch launches grow with the tracked
    layers, not with layers × domains.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tracker, index, groups):
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # autocast's casts, done here once: the backward reuses the saved copies
            dt = torch.get_autocast_dtype(kind)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        out = F.linear(x, weight, bias)
        ctx.tracker, ctx.index, ctx.groups = tracker, index, groups
        ctx.save_for_backward(x, weight)  # in the compute dtype, as autocast's own linear saves them
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return outside_autocast(_TrackedLinear._backward, ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        a, weight = ctx.saved_tensors  # the compute dtype's copies (x and W cast in the forward)
        dt, w_dtype = a.dtype, ctx.w_dtype
        grad_out = grad_out if grad_out.dtype == dt else grad_out.to(dt)
        delta2 = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.mm(delta2, weight).view(a.shape)
            grad_x = grad_x if grad_x.dtype == ctx.x_dtype else grad_x.to(ctx.x_dtype)
        if need_b:
            grad_b = delta2.sum(0)
            grad_b = grad_b if grad_b.dtype == w_dtype else grad_b.to(w_dtype)
        grad_w = weight_grad(ctx.tracker, ctx.index, ctx.groups, grad_out, a, need_w, w_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def outside_autocast(backward, ctx, grad_out):
    """`backward(ctx, grad_out)` with autocast off when a loop runs the backward pass inside it (as some do): the
    tracked functions' products run in their saved compute dtype, and their parts and norms stay fp32."""
    kind = grad_out.device.type
    if torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return backward(ctx, grad_out)
    return backward(ctx, grad_out)


def weight_grad(tracker, index: int, groups: _Groups, delta, a, need_w: bool, w_dtype) -> torch.Tensor | None:
    """∂L/∂W = Σ_t δ_t a_tᵀ of tracked layer `index`, as the sum of the parts of the domains present, which go to the
    tracker (`delta`: the layer's output gradient, `a`: its input, (rows, …, features) in the compute dtype); in
    `w_dtype`, or None where W takes no gradient (a frozen tracked layer's parts serve the tracker only).

    One domain present: the plain product, which is that domain's part. More: one batched or grouped product per layer
    whatever the number of domains present (`domain_parts`). A layer too large for k parts at once: one domain at a time.
    """
    grad_w = None
    if not tracker.enabled:  # switched off after the forward pass: the plain weight gradient
        if need_w:
            grad_w = torch.mm(delta.reshape(-1, delta.shape[-1]).t(), a.reshape(-1, a.shape[-1]))
    elif groups.k == 1:
        grad_w = torch.mm(delta.reshape(-1, delta.shape[-1]).t(), a.reshape(-1, a.shape[-1]))
        part = grad_w if grad_w.dtype == torch.float32 else grad_w.float()
        grad_w = part if w_dtype == torch.float32 else grad_w  # one cast serves both
        tracker._add_parts(index, groups, part)
    elif groups.k * delta.shape[-1] * a.shape[-1] <= PART_BUDGET:
        parts = domain_parts(delta, a, groups)  # (k, out, in) fp32: Σ_d parts = the weight gradient
        grad_w = parts.sum(0) if need_w else None
        tracker._add_parts(index, groups, parts)
    else:
        for j in range(groups.k):
            rows = groups.rows_on(j, a.device)
            delta_j, a_j = delta[rows], a[rows]
            part = delta_j.reshape(-1, delta_j.shape[-1]).T @ a_j.reshape(-1, a_j.shape[-1])
            part = part if part.dtype == torch.float32 else part.float()
            if need_w:
                grad_w = part if grad_w is None else grad_w + part
            tracker._add_parts(index, groups, part, j)
    if grad_w is None or not need_w:
        return None
    return grad_w if grad_w.dtype == w_dtype else grad_w.to(w_dtype)


class Routed:
    """What a tracked module's `forward` is while a GradientTracker is attached: `call`, the tracked forward, with the
    `tracker` that set it (attach refuses a module another tracker holds; FSDP finds the trackers by it).

    A deep copy of the module (`copy.deepcopy` of the model: an EMA copy, a reference model, a snapshot) gets the
    module's own forward back, bound to the copy: `own` (what the module had before attach: a bound method binds to
    the copy; a plain function stays shared, as deepcopy shares functions) or, where the module had none, its class's
    (`ClassForward`). So the copy is not tracked, and computes with its own weights; a closure would be shared by the
    copy and run the original module. A shallow `copy.copy` of a module shares its `Routed`, as it shares its weights:
    that copy stays tracked, even after `remove()` (which restores the modules the tracker attached to).
    """

    def __init__(self, tracker, module: nn.Module, own, call):
        self.tracker, self.module, self.own, self.call = tracker, module, own, call

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.module))  # deepcopy registers the module's copy before it copies the module's fields
        if twin is None:  # this forward copied on its own, not as part of its module: it stays what it is
            return self
        if self.own is not None:
            return copy.deepcopy(self.own, memo)
        return ClassForward(twin)


class ClassForward:
    """A deep-copied tracked module's forward: its class's, looked up at every call, through a weak reference to the
    module (a bound method in the module's own __dict__ would make a reference cycle, and the copy would outlive `del`
    until the garbage collector's next full pass)."""

    def __init__(self, module: nn.Module):
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self.module()
        return type(module).forward(module, *args, **kwargs)

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.module()))
        return self if twin is None else ClassForward(twin)


def _tracked_linear(tracker, index: int, x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
    """A tracked linear's forward: the autograd Function whose backward hands the domains' parts to the tracker."""
    groups = tracker._domains_for(x.shape[0], index)
    return _TrackedLinear.apply(x, mod.weight, mod.bias, tracker, index, groups)


# Under torch.compile the tracked linear runs in eager mode (one graph break per tracked layer): its backward stages
# parts in the tracker's Python-side buffers and queues an autograd callback, which dynamo cannot trace, so tracing
# into it would only break the graph later (and recompile the forward once per layer). Outside compilation the
# forward calls `_tracked_linear` directly: the disable wrapper costs microseconds per call.
_tracked_linear_eager = torch._dynamo.disable(_tracked_linear)


PART_BUDGET = 2**25  # elements of a layer's k per-domain parts (or its rows' parts) held at once: 128 MiB in fp32


def domain_parts(delta: torch.Tensor, a: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """(k, out, in) fp32: each present domain's Σ_t δ_t a_tᵀ over its rows, in O(1) operations.

    Rows sorted by domain in equal segments: one `bmm` over the k segments, as views, the matmul FLOPs of the plain
    product. Sorted in segments of any lengths (rbvl's loader sorts each micro-batch): one grouped product over the
    segments' tokens, the same FLOPs (`_grouped_parts`, where the device and dtype have one). Otherwise one `bmm` over
    the rows (each row's δᵀa; the same FLOPs again, no padding), then one product with the (k, B) one-hot matrix of the rows' domains sums them into the k parts: 2 · k · B · out · in FLOPs, k / T
    of the weight-gradient product's 2 · B · T · out · in (T: tokens per row), in one deterministic operation (an
    index_add_ into k zeroed parts needs two, atomics on a GPU, and a parallel region on the CPU that stalls for
    milliseconds when other processes hold the cores). Rows are taken in chunks when B row parts would exceed
    PART_BUDGET.
    """
    k, n = groups.k, delta.shape[0]
    out_f, in_f = delta.shape[-1], a.shape[-1]
    if groups.equal:
        parts = torch.bmm(_split(delta, k).transpose(1, 2), _split(a, k))  # (k, out, in)
        return parts if parts.dtype == torch.float32 else parts.float()
    if groups.sorted:
        parts = _grouped_parts(delta, a, groups)
        if parts is not None:
            return parts
    if delta.dim() != 3:
        delta, a = _split(delta, n), _split(a, n)  # (B, tokens, ·)
    step = max(1, PART_BUDGET // (out_f * in_f))
    parts = None
    onehot_all = groups.onehot_as(delta.dtype)
    for lo in range(0, n, step):
        d, x = (delta, a) if n <= step else (delta[lo : lo + step], a[lo : lo + step])
        rows = torch.bmm(d.transpose(1, 2), x).view(d.shape[0], -1)  # (rows, out · in), in the compute dtype
        onehot = onehot_all if n <= step else onehot_all[:, lo : lo + step]
        # the rows' sum per domain in the compute dtype (fp32 accumulation; under autocast each part rounds to bf16
        # once, as autocast's own weight gradient does), so the B row parts are never converted: half the traffic
        if parts is not None and rows.dtype == torch.float32:
            parts.addmm_(onehot, rows)
            continue
        chunk = torch.mm(onehot, rows)
        chunk = chunk if chunk.dtype == torch.float32 else chunk.float()
        parts = chunk if parts is None else parts.add_(chunk)
    return parts.view(k, out_f, in_f)


def _split(t: torch.Tensor, k: int) -> torch.Tensor:
    """(k, rows / k, features): t's rows in k equal segments (a view when t is contiguous)."""
    return t.view(k, -1, t.shape[-1]) if t.is_contiguous() else t.reshape(k, -1, t.shape[-1])
