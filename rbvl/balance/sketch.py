"""The count sketch that keeps each domain's gradient in N numbers, whatever the model.

Entry (i, j) of a tracked layer's (out, in) weight gradient goes to bucket (a_i + b_j) mod N with sign s_i · t_j,
with seeded hashes a, b and signs s, t of its own per layer, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ and G stays unbiased. The
hashes depend only on the seed and the layer shapes, so every rank (and a resumed run) sketches alike.

The sign goes into the index: a weight whose sign is − lands in bucket N + (a_i + b_j) mod N of a (2N,) staging row,
and the sketch is the row's first half minus its second (`fold`). So sketching a part is one scatter of the part as it
is (no multiply, no per-call index arithmetic), and the signed index of every weight is computed once.
"""

from __future__ import annotations

import torch

CHUNK = 2**22  # elements of a part sketched at once when its index is not cached (bounds the temporaries)
FALLBACK_DIM = 2**16  # an exact tracker's store of last seen gradients: m × this many numbers
# Each layer's signed bucket of every weight is computed once and kept while it fits in this many bytes (on the
# tracker's device): int32 on a GPU (4 bytes per tracked weight: LoRA r = 128 on the seven projections of a 7B Llama,
# 319.8M weights, takes 1.3 GB), int64 on the CPU, whose index_add_ along dim 1 takes a per-index slow path with
# int32 (10× slower, measured). A layer past the budget recomputes its index at every call (a few more operations).
INDEX_CACHE_BYTES = 2 * 2**30


class _Plans(list):
    """Per layer: None (the exact layout: each layer in its own slice) or (a, neg_a, b, neg_b): its hashes and signs
    (True where the sign is −)."""

    offsets: list[int]
    dim: int  # N: numbers used
    device: torch.device
    index: list  # per layer: its (out · in,) signed buckets in [0, 2N), or None (not cached)
    wide: dict  # (layer, k) → its index expanded to (k, out · in): a view, for the CPU's scatter of k parts


def index_dtype(device) -> torch.dtype:
    return torch.int64 if torch.device(device).type in ("cpu", "meta") else torch.int32


def _plan_sketches(shapes, sketch_dim: int, seed: int, device, cache_bytes: int = 0) -> _Plans | None:
    """Hashes and signs of every layer into one sketch of sketch_dim buckets (the exact layout if that is no smaller
    than the layers together); each layer's signed index is cached within `cache_bytes`."""
    if sketch_dim <= 0:
        return None
    sizes = [int(s[0]) * int(s[1]) for s in shapes]
    plans = _Plans()
    plans.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    plans.index = [None] * len(shapes)
    plans.wide = {}
    plans.device = torch.device(device)
    exact_layout = sketch_dim >= sum(sizes)
    plans.dim = sum(sizes) if exact_layout else sketch_dim
    dtype = index_dtype(device)
    for i, (rows, cols) in enumerate(shapes):
        if exact_layout:
            plans.append(None)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            a = torch.randint(0, sketch_dim, (rows,), generator=g).to(device)
            neg_a = (torch.randint(0, 2, (rows,), generator=g) == 0).to(device)  # the sign s_a = 2 · draw − 1
            b = torch.randint(0, sketch_dim, (cols,), generator=g).to(device)
            neg_b = (torch.randint(0, 2, (cols,), generator=g) == 0).to(device)
            plans.append((a, neg_a, b, neg_b))
        need = rows * cols * dtype.itemsize
        if cache_bytes >= need and torch.device(device).type != "meta":
            cache_bytes -= need
            plans.index[i] = _signed_index(plans, i, slice(None), (rows, cols)).flatten().to(dtype)
    return plans


def _signed_index(plans: _Plans, index: int, rows: slice, shape) -> torch.Tensor:
    """(rows, in) int64: the signed bucket of each weight of layer `index` in those rows."""
    plan = plans[index]
    if plan is None:  # exact layout: the layer's own slice, sign +
        cols = shape[1]
        first = rows.start or 0
        stop = shape[0] if rows.stop is None else min(rows.stop, shape[0])
        return torch.arange(first * cols, stop * cols, device=plans.device).view(-1, cols) + plans.offsets[index]
    a, neg_a, b, neg_b = plan
    buckets = (a[rows, None] + b[None, :]).remainder_(plans.dim)
    return buckets.add_((neg_a[rows, None] ^ neg_b[None, :]).long() * plans.dim)


def _sketch_parts(staging: torch.Tensor, plans: _Plans, index: int, parts: torch.Tensor) -> None:
    """Add layer `index`'s parts, signed, into `staging` in one scatter: parts (k, out, in) into staging (k, 2N), or
    one part (out, in) into a (2N,) row. `fold(staging)` is then the parts' sketches.

    One count sketch over every tracked weight: entry (i, j) of layer l goes to bucket (a_i + b_j) mod N with sign
    s_i · t_j, with seeded hashes a, b and signs s, t of its own per layer. Every layer spreads over all N buckets
    and collisions are pairwise independent, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ with the variance of one N-bucket count
    sketch, (‖A‖²‖B‖² + ⟨A, B⟩²) / N, however the gradient's energy is spread over the layers (per-layer slices of
    the N numbers err like the slice of the layer that holds the most energy). A layer whose index is not cached
    takes its rows in chunks, so the temporaries stay small.
    """
    dim = staging.dim() - 1  # 0: one part into a row; 1: k parts into k rows
    flat = parts.view(*parts.shape[:dim], -1)  # (k, out · in) or (out · in,)
    cached = plans.index[index]
    if cached is not None:
        if dim == 1 and staging.device.type == "cpu":
            # k parts on the CPU: index_add_ along dim 1 expands the index into a scatter on every call and costs
            # milliseconds when the cores are busy (2.0 ms against 31 µs for 16 parts of 4,096 measured); scatter
            # at an expanded view of the cached index (a view, made once per layer and k) instead
            wide = plans.wide.get((index, flat.shape[0]))
            if wide is None:
                wide = plans.wide[(index, flat.shape[0])] = cached.expand(flat.shape[0], -1)
            staging.scatter_add_(1, wide, flat)
        else:
            staging.index_add_(dim, cached, flat)
        return
    shape = parts.shape[-2:]
    step = max(1, CHUNK // shape[1])
    for r in range(0, shape[0], step):
        rows = slice(r, r + step)
        signed = _signed_index(plans, index, rows, shape).to(staging.device).flatten()
        staging.index_add_(dim, signed, parts[..., rows, :].reshape(*parts.shape[:dim], -1))


def fold(staging: torch.Tensor) -> torch.Tensor:
    """(…, 2N) staging → (…, N) sketch: the + half minus the − half."""
    n = staging.shape[-1] // 2
    return staging[..., :n] - staging[..., n:]


def _sketch_into(out: torch.Tensor, plans: _Plans, index: int, part: torch.Tensor) -> None:
    """Add the sketch of layer `index`'s (out, in) `part` into the (N,) vector `out` (one domain's row)."""
    staging = torch.zeros(2 * out.shape[-1], dtype=out.dtype, device=out.device)
    _sketch_parts(staging, plans, index, part)
    out += fold(staging)


def _sketch_domains(means: list[torch.Tensor], plans: _Plans, out: torch.Tensor) -> torch.Tensor:
    """(m, N) `out` with each domain's gradient (per layer (m, out, in) in `means`) added in, sketched by `plans`."""
    staging = torch.zeros(out.shape[0], 2 * out.shape[1], dtype=out.dtype, device=out.device)
    for index, g in enumerate(means):
        _sketch_parts(staging, plans, index, g)
    out += fold(staging)
    return out
