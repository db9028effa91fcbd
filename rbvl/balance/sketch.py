"""The count sketch that keeps each domain's gradient in N numbers, whatever the model.

Entry (i, j) of a tracked layer's (out, in) weight gradient goes to bucket (a_i + b_j) mod N with sign s_i · t_j,
with seeded hashes a, b and signs s, t of its own per layer, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ and G stays unbiased. The
hashes depend only on the seed and the layer shapes, so every rank (and a resumed run) sketches alike.
"""

from __future__ import annotations

import torch

CHUNK = 2**22  # elements of a part sketched at once (bounds the temporaries)
FALLBACK_DIM = 2**16  # an exact tracker's store of last seen gradients: m × this many numbers
# Each layer's bucket of every weight (int32) and its sign (int8), 5 bytes per tracked weight, are computed once and
# kept while they fit in this many bytes (on the tracker's device); a layer past it recomputes them at every call
# (four more operations). LoRA r = 128 on the seven projections of a 7B Llama: 319.8M weights, 1.6 GB, all cached.
INDEX_CACHE_BYTES = 2 * 2**30


class _Plans(list):
    """Per layer: None (the exact layout: each layer in its own slice) or (a, s_a, b, s_b): its hashes and signs."""

    offsets: list[int]
    dim: int  # numbers used
    cache: list  # per layer: (buckets, signs), each (out, in), or None (not cached)


def _plan_sketches(shapes, sketch_dim: int, seed: int, device, cache_bytes: int = 0) -> _Plans | None:
    """Hashes and signs of every layer into one sketch of sketch_dim buckets (the exact layout if that is no
    smaller than the layers together); each layer's per-weight buckets and signs are cached within `cache_bytes`."""
    if sketch_dim <= 0:
        return None
    sizes = [int(s[0]) * int(s[1]) for s in shapes]
    plans = _Plans()
    plans.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    plans.cache = [None] * len(shapes)
    if sketch_dim >= sum(sizes):
        plans.extend([None] * len(shapes))
        plans.dim = sum(sizes)
        return plans
    for i, (rows, cols) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        a = torch.randint(0, sketch_dim, (rows,), generator=g).to(device)
        s_a = (torch.randint(0, 2, (rows,), generator=g) * 2 - 1).float().to(device)
        b = torch.randint(0, sketch_dim, (cols,), generator=g).to(device)
        s_b = (torch.randint(0, 2, (cols,), generator=g) * 2 - 1).float().to(device)
        plans.append((a, s_a, b, s_b))
        if cache_bytes >= 5 * rows * cols:
            cache_bytes -= 5 * rows * cols
            buckets = (a[:, None] + b[None, :]).remainder_(sketch_dim).to(torch.int32)
            plans.cache[i] = (buckets, (s_a[:, None] * s_b[None, :]).to(torch.int8))
    plans.dim = sketch_dim
    return plans


def _sketch_into(out: torch.Tensor, plans: _Plans, index: int, part: torch.Tensor) -> None:
    """Add the sketch of layer `index`'s (out, in) `part` into the (N,) vector `out` (one domain's row)."""
    _sketch_parts(out, plans, index, torch.zeros(1, 1, 1, dtype=torch.long, device=out.device), part[None])


def _sketch_parts(flat: torch.Tensor, plans: _Plans, index: int, base: torch.Tensor, parts: torch.Tensor) -> None:
    """Add the sketches of layer `index`'s parts (k, out, in) into the flattened (m · N,) sketch `flat` in one scatter:
    `base` (k, 1, 1) holds each part's domain d times N, and bucket b of row d is element d · N + b.

    One count sketch over every tracked weight: entry (i, j) of layer l goes to bucket (a_i + b_j) mod N with sign
    s_i · t_j, with seeded hashes a, b and signs s, t of its own per layer. Every layer spreads over all N buckets
    and collisions are pairwise independent, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ with the variance of one N-bucket count
    sketch, (‖A‖²‖B‖² + ⟨A, B⟩²) / N, however the gradient's energy is spread over the layers (per-layer slices of
    the N numbers err like the slice of the layer that holds the most energy). A layer whose buckets and signs are
    not cached takes its rows in chunks, so the temporaries stay small.
    """
    plan = plans[index]
    if plan is None:  # exact layout: the layer's own slice of each row
        cols = torch.arange(parts[0].numel(), device=flat.device).view(parts.shape[1:]) + plans.offsets[index]
        flat.index_add_(0, (base + cols).view(-1), parts.reshape(-1))
        return
    if plans.cache[index] is not None:
        buckets, signs = plans.cache[index]  # (out, in) each
        flat.index_add_(0, (base + buckets).view(-1), (parts * signs).view(-1))
        return
    a, s_a, b, s_b = plan
    step = max(1, CHUNK // (parts.shape[0] * parts.shape[2]))
    for r in range(0, parts.shape[1], step):
        rows = slice(r, r + step)
        buckets = (a[rows, None] + b[None, :]).remainder_(plans.dim)  # (rows, in)
        values = parts[:, rows] * (s_a[rows, None] * s_b[None, :])  # (k, rows, in)
        flat.index_add_(0, (base + buckets).view(-1), values.reshape(-1))


def _sketch_domains(means: list[torch.Tensor], plans: _Plans, out: torch.Tensor) -> torch.Tensor:
    """(m, N) `out` with each domain's gradient (per layer (m, out, in) in `means`) added in, sketched by `plans`."""
    base = torch.arange(out.shape[0], device=out.device).view(-1, 1, 1) * out.shape[1]
    for index, g in enumerate(means):
        _sketch_parts(out.view(-1), plans, index, base, g)
    return out
