"""The sketch that keeps each domain's gradient in N numbers, whatever the model.

Layer l's (out, in) weight gradient, flattened row-major, is laid on the N buckets as one run that starts at a seeded
offset r_l and wraps around (entry p goes to bucket (r_l + p) mod N), with sign s_i · t_j for entry (i, j) (seeded
±1 per row and per column of the layer). The signs make it unbiased: ⟨S(A), S(B)⟩ = ⟨A, B⟩ plus a sum over the
pairs of weights that share a bucket, each term carrying a product of independent signs, so E over seeds is ⟨A, B⟩.
A layer of at most N weights gets an offset at which its run does not wrap, so it never collides with itself; its
collisions are with other layers, at seeded shifts. The offsets and signs depend only on the seed and the layer
shapes, so every rank (and a resumed run) sketches alike.

Sketching k parts of a layer is one fused multiply-add per run (`addcmul_` of the parts and the layer's sign matrix
into a contiguous slice of the (k, N) sketch rows): one run when the layer fits in N, at most three when it wraps.
A layer of many times N weights adds its whole turns of the N buckets as one run: on a GPU in one signed sum over the
turns (a launch per turn would cost more than the temporary), on the CPU as a fused add per turn (a call is cheap
there and memory traffic is not). Coalesced, with no atomics and no index. The sketch before this one scattered each
weight to a hashed bucket; on an H200 that atomic scatter took 19 ms of a 7B model's 365 ms step (docs/balance.md).
A state saved with it is not mixed into this one's window (`SKETCH` marks the layout in the tracker's state).
"""

from __future__ import annotations

import torch

SKETCH = "runs-v2"  # the layout's name in the tracker's state; windows saved under another layout are not mixed in
FALLBACK_DIM = 2**16  # an exact tracker's store of last seen gradients: m × this many numbers
# Each layer's (out, in) sign matrix s ⊗ t is kept while the signs fit in this many bytes (fp32, on the tracker's
# device: LoRA r = 128 on the seven projections of a 7B Llama, 319.8M weights, takes 1.3 GB). A layer past the budget
# multiplies its parts by s and t at every call (two more operations and a temporary the size of its parts).
SIGN_CACHE_BYTES = 2 * 2**30
PER_TURN_DEVICES = {"cpu"}  # devices that add a layer's whole turns one by one (module doc)


class _Plans(list):
    """Per layer: None (the exact layout: each layer in its own slice, sign +) or (s, t): its ±1 row and column signs
    (fp32)."""

    offsets: list[int]  # per layer: r_l, the bucket of its first weight
    runs: list[list[tuple[int, int, int, int]]]  # per layer: (p0, p1, b0, b1): weights p0..p1 → buckets b0..b1
    dim: int  # N: numbers used
    device: torch.device
    signs: list  # per layer: its (out · in,) cached signs s_i · t_j, or None (not cached, or the exact layout)
    run_signs: list  # per layer: None, or per run the view of `signs` its part multiplies


def _plan_sketches(shapes, sketch_dim: int, seed: int, device, cache_bytes: int = 0) -> _Plans | None:
    """Offsets and signs of every layer into one sketch of sketch_dim buckets (the exact layout if that is no smaller
    than the layers together); each layer's sign matrix is cached within `cache_bytes`."""
    if sketch_dim <= 0:
        return None
    sizes = [int(s[0]) * int(s[1]) for s in shapes]
    plans = _Plans()
    plans.offsets, plans.runs, plans.signs, plans.run_signs = [], [], [], []
    plans.device = torch.device(device)
    exact_layout = sketch_dim >= sum(sizes)
    n_buckets = plans.dim = sum(sizes) if exact_layout else sketch_dim
    for i, ((rows, cols), n) in enumerate(zip(shapes, sizes, strict=True)):
        signs = None
        if exact_layout:
            offset, plan = sum(sizes[:i]), None
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            offset = int(torch.randint(0, n_buckets - n + 1 if n <= n_buckets else n_buckets, (1,), generator=g))
            s = (2 * torch.randint(0, 2, (int(rows),), generator=g) - 1).float().to(device)
            t = (2 * torch.randint(0, 2, (int(cols),), generator=g) - 1).float().to(device)
            plan = (s, t)
            if cache_bytes >= 4 * n and plans.device.type != "meta":
                cache_bytes -= 4 * n
                signs = torch.outer(s, t).flatten()
        plans.append(plan)
        plans.offsets.append(offset)
        runs = _runs(offset, n, n_buckets)
        plans.runs.append(runs)
        plans.signs.append(signs)
        # each run's signs, as its part sees them: (p1 − p0,), or (turns, N) for whole turns (views, made once)
        plans.run_signs.append(
            None
            if signs is None
            else [signs[p0:p1] if p1 - p0 == b1 - b0 else signs[p0:p1].view(-1, b1 - b0) for p0, p1, b0, b1 in runs]
        )
    return plans


def _runs(offset: int, n: int, n_buckets: int) -> list[tuple[int, int, int, int]]:
    """The runs of weights 0..n-1 laid from bucket `offset` on, wrapping at n_buckets: (p0, p1, b0, b1) puts weights
    p0..p1 on buckets b0..b1. At most three: the head up to the last bucket, whole turns of all N buckets as one run
    (p1 − p0 a multiple of N = b1 − b0; summed over the turns), and the tail."""
    head = min(n, n_buckets - offset)
    runs = [(0, head, offset, offset + head)]
    turns = (n - head) // n_buckets
    if turns:
        runs.append((head, head + turns * n_buckets, 0, n_buckets))
    if n > head + turns * n_buckets:
        runs.append((head + turns * n_buckets, n, 0, n - head - turns * n_buckets))
    return runs


def _sketch_parts(rows: torch.Tensor, plans: _Plans, index: int, parts: torch.Tensor, targets=None) -> None:
    """Add the sketches of layer `index`'s parts into `rows`: parts (k, out, in) into rows (k, N), or one part
    (out, in) into a (N,) row; one fused multiply-add per run of the layer (an add in the exact layout). `targets`:
    the views of `rows` at the layer's runs (`run_targets`), when the caller keeps them."""
    dim = (rows if targets is None else targets[0]).dim() - 1  # 0: one part into a row; 1: k parts into k rows
    flat = parts.view(*parts.shape[:dim], -1) if parts.is_contiguous() else parts.reshape(*parts.shape[:dim], -1)
    plan, signs = plans[index], plans.run_signs[index]
    if plan is not None and signs is None:  # past the cache's budget: sign the parts, then add
        s, t = plan
        flat = (parts * s.view(-1, 1) * t).reshape(*parts.shape[:dim], -1)
    runs = plans.runs[index]
    targets = targets if targets is not None else run_targets(rows, plans, index)
    for r, (p0, p1, b0, b1) in enumerate(runs):
        part = flat if len(runs) == 1 else flat[..., p0:p1]
        if p1 - p0 > b1 - b0:  # whole turns of the N buckets
            turns = part.unflatten(-1, (-1, b1 - b0))  # (…, turns, N)
            if turns.device.type in PER_TURN_DEVICES:  # a fused add per turn, no temporary
                for j in range(turns.shape[-2]):
                    if signs is None:
                        targets[r].add_(turns[..., j, :])
                    else:
                        targets[r].addcmul_(turns[..., j, :], signs[r][j])
            else:  # sign, then sum over the turns
                targets[r].add_((turns if signs is None else turns * signs[r]).sum(-2))
        elif signs is None:
            targets[r].add_(part)
        else:
            targets[r].addcmul_(part, signs[r])


def run_targets(rows: torch.Tensor, plans: _Plans, index: int) -> list[torch.Tensor]:
    """The views of `rows` ((k, N) or (N,)) that layer `index`'s runs add into."""
    return [rows if (b0, b1) == (0, rows.shape[-1]) else rows[..., b0:b1] for _, _, b0, b1 in plans.runs[index]]


def _sketch_into(out: torch.Tensor, plans: _Plans, index: int, part: torch.Tensor) -> None:
    """Add the sketch of layer `index`'s (out, in) `part` into the (N,) vector `out` (one domain's row)."""
    _sketch_parts(out, plans, index, part)


def _sketch_domains(means: list[torch.Tensor], plans: _Plans, out: torch.Tensor) -> torch.Tensor:
    """(m, N) `out` with each domain's gradient (per layer (m, out, in) in `means`) added in, sketched by `plans`."""
    for index, g in enumerate(means):
        _sketch_parts(out, plans, index, g)
    return out
