"""Grouped products: the k present domains' parts of a tracked layer's weight gradient in one call over the
micro-batch's tokens, where rows are sorted by domain in segments of any lengths (`F.grouped_mm` with the segments'
token offsets): the matmul FLOPs of the plain product, no row parts, no padding. Where the device and dtype have no
grouped product that runs without reading the device from the host, `domain_parts` (layers.py) takes the one-hot one.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from rbvl.balance.layers import _Groups

# (device type, dtype) → how a grouped product runs there: the out_dtype it takes ("fp32": accumulates into fp32 parts;
# "same": parts in the compute dtype, cast after), or None where it does not run, or runs only by reading the device
# from the host (found by one small trial product)
_GROUPED: dict[tuple[str, torch.dtype], str | None] = {}


def _grouped_parts(delta: torch.Tensor, a: torch.Tensor, groups: _Groups) -> torch.Tensor | None:
    """Sorted rows in segments of any lengths: the k parts as one grouped product over the tokens (`F.grouped_mm`
    with the segments' token offsets), the matmul FLOPs of the plain product, no row parts, no padding; fp32.
    None where this device and dtype have no grouped product (the caller takes the one-hot path)."""
    delta2 = delta.reshape(-1, delta.shape[-1])  # (tokens, out)
    a2 = a.reshape(-1, a.shape[-1])  # (tokens, in)
    mode = _grouped_mode(a2.device, a2.dtype)
    if mode is None or (delta2.shape[1] * a2.element_size()) % 16 or (a2.shape[1] * a2.element_size()) % 16:
        return None  # the grouped kernels take rows of whole 16-byte units only
    offs = groups.offsets(delta2.shape[0] // groups.n_rows, a2.device)
    try:
        parts = F.grouped_mm(delta2.t(), a2, offs=offs, out_dtype=torch.float32 if mode == "fp32" else None)
    except RuntimeError:  # an operand's start not aligned as the kernel needs (a view into a larger tensor)
        return None
    return parts if parts.dtype == torch.float32 else parts.float()


def _grouped_mode(device: torch.device, dtype: torch.dtype) -> str | None:
    """How a grouped product runs on `device` in `dtype` (see _GROUPED), tried once; GradientTracker asks for its
    device's dtypes when it is built, so the trial's host read never falls inside a training step.

    On CUDA only a product that never reads the device from the host counts: PyTorch's grouped kernel takes bf16 in
    and bf16 out on sm90 / sm100; any other case (fp32 out, fp32 or fp16 in, another GPU) falls back to a loop that
    copies the offsets to the host, a sync in every tracked layer's backward. The trial runs under CUDA's sync check,
    so such a mode is refused and those layers take the one-hot product, which never syncs."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    key = (device.type, dtype)
    if key in _GROUPED:  # every call but the first (each tracked layer's backward asks)
        return _GROUPED[key]
    if device.type == "meta":  # shapes only: nothing runs there
        return None
    _GROUPED[key] = None
    a = torch.ones(16, 8, device=device, dtype=dtype)
    offs = torch.tensor([8, 16], dtype=torch.int32, device=device)
    for mode, out_dtype in (("fp32", torch.float32), ("same", None)):
        try:
            with _refuse_host_sync(device):
                parts = F.grouped_mm(a.t(), a, offs=offs, out_dtype=out_dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if parts.shape == (2, 8, 8) and bool((parts == 8).all()):  # a host read, once per process and key
            _GROUPED[key] = mode
            break
    return _GROUPED[key]


@contextlib.contextmanager
def _refuse_host_sync(device: torch.device):
    """On CUDA: an operation inside that waits on the device raises (torch.cuda.set_sync_debug_mode("error"))."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def try_grouped_products(device) -> None:
    """Find out once which dtypes have grouped products on `device` (GradientTracker calls it when built)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _grouped_mode(device, dtype)
