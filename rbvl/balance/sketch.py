"""The count sketch that keeps each domain's gradient in N numbers, whatever the model.

Entry (i, j) of a tracked layer's (out, in) weight gradient goes to bucket (a_i + b_j) mod N with sign s_i · t_j,
with seeded hashes a, b and signs s, t of its own per layer, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ and G stays unbiased. The
hashes depend only on the seed and the layer shapes, so every rank (and a resumed run) sketches alike.
"""

from __future__ import annotations

import torch

CHUNK = 2**22  # elements of a part sketched at once (bounds the temporaries)
FALLBACK_DIM = 2**16  # an exact tracker's store of last seen gradients: m × this many numbers


class _Plans(list):
    """Per layer: None (the exact layout: each layer in its own slice) or (a, s_a, b, s_b): its hashes and signs."""

    offsets: list[int]
    dim: int  # numbers used


def _plan_sketches(shapes, sketch_dim: int, seed: int, device) -> _Plans | None:
    """Hashes and signs of every layer into one sketch of sketch_dim buckets (the exact layout if that is no
    smaller than the layers together)."""
    if sketch_dim <= 0:
        return None
    sizes = [int(s[0]) * int(s[1]) for s in shapes]
    plans = _Plans()
    plans.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
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
    plans.dim = sketch_dim
    return plans


def _sketch_into(out: torch.Tensor, plans: _Plans, index: int, part: torch.Tensor) -> None:
    """Add the sketch of layer `index`'s (out, in) `part` into the (N,) vector `out`.

    One count sketch over every tracked weight: entry (i, j) of layer l goes to bucket (a_i + b_j) mod N with sign
    s_i · t_j, with seeded hashes a, b and signs s, t of its own per layer. Every layer spreads over all N buckets
    and collisions are pairwise independent, so E[⟨S(A), S(B)⟩] = ⟨A, B⟩ with the variance of one N-bucket count
    sketch, (‖A‖²‖B‖² + ⟨A, B⟩²) / N, however the gradient's energy is spread over the layers (per-layer slices of
    the N numbers err like the slice of the layer that holds the most energy). Rows are taken in chunks so the
    temporaries stay small; about five passes over the part.
    """
    plan = plans[index]
    if plan is None:  # the sketch is no smaller than the tracked weights: each layer exact in its own slice
        offset = plans.offsets[index]
        out[offset : offset + part.numel()] += part.flatten()
        return
    a, s_a, b, s_b = plan
    n = out.numel()
    step = max(1, CHUNK // part.shape[1])
    for r in range(0, part.shape[0], step):
        rows = slice(r, r + step)
        buckets = (a[rows, None] + b[None, :]).remainder_(n)  # (rows, in)
        values = part[rows] * s_a[rows, None] * s_b[None, :]
        out.index_add_(0, buckets.flatten(), values.flatten())


def _sketch_domains(means: list[torch.Tensor], plans: _Plans, out: torch.Tensor) -> torch.Tensor:
    """(m, N) `out` with each domain's gradient (per layer (m, out, in) in `means`) added in, sketched by `plans`."""
    for index, g in enumerate(means):
        for d in range(out.shape[0]):
            _sketch_into(out[d], plans, index, g[d])
    return out
