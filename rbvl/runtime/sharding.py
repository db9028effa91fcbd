"""FSDP2 for `rbvl train` (`train.parallel: fsdp`): shard a model past one GPU's memory, keep every rank on the same
forward path, and move the trainable tensors between their shards and whole tensors for checkpoints.

    model = shard_model(model, device, precision="auto", cpu_offload=False)  # each decoder layer, the vision tower, root
    paths = SameForwardPaths(model, dummy_images)   # a rank whose micro-batch has no image still runs the vision tower
    full = gather_full(model.named_parameters())    # every rank calls it (a collective); whole tensors on the CPU
    load_full(param, full[name])                    # every rank: its shard of a whole tensor

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) every parameter is a DTensor sharded over the ranks on dim 0; a
module's forward all-gathers its group's shards first and its backward reduce-scatters the gradients. Every rank must
therefore issue the same collectives in the same order: a rank that skipped the vision tower (its micro-batch had no
image) would leave the others waiting in the tower's all-gather forever. `SameForwardPaths` runs the tower (and the
projector) on a dummy image there, at the point of the forward where a batch with images runs it, and adds its output
times zero to the language model's input: the same collectives, zero gradients.

The GradientTracker needs nothing from here: its tracked linears read `mod.weight` inside their forward, which is the
all-gathered (whole) weight while the layer's group is unsharded, and hand the whole weight gradient back to FSDP,
which reduce-scatters it as it would any other. Its accumulators are per rank and summed at sync, as under DDP.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from rbvl.balance.layers import VISION_SIDE

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------------------


def mixed_precision(precision: str, device: torch.device):
    """`train.fsdp_precision` as FSDP2's MixedPrecisionPolicy, or None for fp32 throughout.

    `auto`: bf16 parameters (all-gathered and computed in bf16) with fp32 gradient reduction on a GPU that has bf16;
    fp32 on the CPU (gloo and the CPU's matmuls gain nothing from bf16 there)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    if precision == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(
    model: nn.Module, device: torch.device, precision: str = "auto", cpu_offload: bool = False
) -> nn.Module:
    """`fully_shard` each decoder layer, the vision tower, then the root (in place; returns `model`).

    The root group holds what is left: embeddings, LM head, projector (and its modules_to_save copy). Root last, as
    FSDP2 requires. LoRA adapters live inside the decoder layers and are sharded with them; frozen and trainable
    parameters share a group (FSDP2 reduce-scatters only the gradients that exist)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    kwargs = {}
    policy = mixed_precision(precision, device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train.parallel=fsdp: found no decoder layers in {type(model).__name__} to shard")
    for layer in layers:
        _fully_shard(layer, **kwargs)
    tower = _vision_tower(model)
    if tower is not None and any(True for _ in tower.parameters()):
        _fully_shard(tower, **kwargs)
    _fully_shard(model, **kwargs)
    if hasattr(model, "generate"):  # generate() calls the inner model: the root must unshard around it too
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    log.info(
        "FSDP2: %d decoder layers%s and the root sharded over %d ranks (params %s)",
        len(layers),
        " + the vision tower" if tower is not None else "",
        torch.distributed.get_world_size(),
        "bf16, fp32 reduce" if policy is not None else "fp32",
    )
    return model


def _fully_shard(module: nn.Module, **kwargs) -> None:
    """fully_shard, which gives `module` a new class (FSDP<Name>): transformers looks up which outputs a model can
    record (hidden states for LLaVA's vision features) by class name, so the new class gets the old one's entry."""
    from torch.distributed.fsdp import fully_shard

    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # an older transformers: no registry to keep
        _CAN_RECORD_REGISTRY = None
    entry = _CAN_RECORD_REGISTRY.get(module) if _CAN_RECORD_REGISTRY is not None else None
    fully_shard(module, **kwargs)
    if entry:
        _CAN_RECORD_REGISTRY[module] = entry


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers: the largest nn.ModuleList outside the vision side (`layers`, `h`, ...)."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) and not re.search(VISION_SIDE, name)
    ]
    if not found:
        return []
    _, layers = max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return list(layers)


def _vision_tower(model: nn.Module) -> nn.Module | None:
    from rbvl.model import vision_tower

    tower = vision_tower(model)
    return None if type(tower) is nn.Module else tower  # an empty nn.Module: a text-only LM


# ---------------------------------------------------------------------------------------------------------------------
# The same forward path on every rank
# ---------------------------------------------------------------------------------------------------------------------


class SameForwardPaths:
    """Hooks that run the vision tower and the projector on `dummy` image inputs when a forward has no image.

    `dummy`: the image inputs of one collated sample (`pixel_values`, and `image_sizes` / `image_grid_thw` ... when
    the family has them), on the training device. A pre-hook on the transformers model notes whether this forward got
    `pixel_values`; a pre-hook on its language model then, if not, computes the dummy's image features and adds
    0 × their sum to `inputs_embeds`: every rank has run the same modules in the same order, and the tower's and
    projector's gradients are zeros rather than missing (FSDP2 reduce-scatters the gradients that exist, so a
    projector gradient present on one rank and absent on another would not line up either).

    Tracked linears on the vision side (`balance.params: head`) run untracked during the dummy pass: it belongs to
    no domain. When no rank's micro-batches of an optimizer step held an image, `settle` drops the vision side's
    (zero) gradients before the step, as DDP leaves a parameter no rank used: AdamW then does not move the tower and
    projector on their momentum, and the run stays DDP's run.
    """

    def __init__(self, model: nn.Module, dummy: dict[str, torch.Tensor]):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.language_model = _language_model(base)
        signature = inspect.signature(base.get_image_features).parameters
        self.dummy = {k: v for k, v in dummy.items() if k in signature}
        if "pixel_values" not in self.dummy:
            raise ValueError(f"SameForwardPaths: the dummy image inputs hold no pixel_values ({sorted(dummy)})")
        self._has_images = True
        self.dummy_runs = 0  # forwards that ran the dummy image (tests read it)
        self.dropped = 0  # optimizer steps whose vision-side gradients `settle` dropped (tests read it)
        self._real = 0  # training forwards with images since the last optimizer step
        self.vision_params = [p for n, p in model.named_parameters() if p.requires_grad and re.search(VISION_SIDE, n)]
        inner = getattr(base, "model", base)  # PEFT calls the transformers model's .forward (no hooks); it calls this
        self._handles = [
            inner.register_forward_pre_hook(self._note, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._fill, with_kwargs=True),
        ]

    def _note(self, module, args, kwargs):
        self._has_images = kwargs.get("pixel_values") is not None
        self._real += int(self._has_images and module.training and torch.is_grad_enabled())

    def settle(self, dist) -> None:
        """Before the optimizer step (every rank): no image on any rank since the last one → no vision-side gradients."""
        seen = torch.tensor([float(self._real)], device=dist.device)
        dist.all_reduce(seen)
        self._real = 0
        if seen.item() == 0:
            self.dropped += 1
            for p in self.vision_params:
                p.grad = None

    def _fill(self, module, args, kwargs):
        if self._has_images:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # a forward with input_ids alone: the transformers model did not embed them (not LLaVA-like)
            return None
        trackers = _trackers(self.base)
        for t in trackers:
            t.remove()
        try:
            features = self.base.get_image_features(**self.dummy)
        finally:
            for t in trackers:
                t.attach()
        self.dummy_runs += 1
        zero = sum(t.float().sum() for t in _tensors(features)) * 0.0
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _language_model(base: nn.Module) -> nn.Module:
    inner = getattr(base, "model", None)
    lm = getattr(inner, "language_model", None) or getattr(base, "language_model", None)
    if lm is None:
        raise ValueError(f"SameForwardPaths: {type(base).__name__} has no language_model to hook")
    return lm


def _tensors(out) -> Iterable[torch.Tensor]:
    """Every floating tensor in a model output (a tensor, a tuple / list, a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)


def _trackers(model: nn.Module) -> list:
    """The GradientTrackers attached to `model`'s linears (their forwards carry `.tracker`)."""
    found = []
    for mod in model.modules():
        t = getattr(mod.__dict__.get("forward"), "tracker", None)
        if t is not None and all(t is not f for f in found):
            found.append(t)
    return found


def dummy_image_inputs(collator, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The image inputs of one collated sample with a grey image (None for a text-only LM): what `SameForwardPaths`
    runs on a rank whose micro-batch has no image."""
    from PIL import Image

    from rbvl.data.collate import MARKER, PER_TOKEN

    if collator.family.kind == "text":
        return None
    side = 32
    size = getattr(getattr(collator.processor, "image_processor", None), "size", None) or {}
    side = int(size.get("shortest_edge") or size.get("height") or side) if isinstance(size, dict) else side
    sample = {
        "id": "fsdp-dummy",
        "conversation": [{"role": "user", "content": f"{MARKER}\n."}, {"role": "assistant", "content": "."}],
        "image": Image.new("RGB", (side, side), (128, 128, 128)),
    }
    batch, _ = collator([sample], [0])
    if batch is None or "pixel_values" not in batch:
        raise ValueError("train.parallel=fsdp: could not collate a dummy image for this model's processor")
    return {k: v.to(device) for k, v in batch.items() if k not in PER_TOKEN}


# ---------------------------------------------------------------------------------------------------------------------
# Whole tensors for checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """`t` whole on the CPU (a DTensor is all-gathered: every rank must call this in the same order)."""
    t = t.detach()
    if is_sharded(t):
        t = t.full_tensor()
    return t.cpu()


def reshard(model: nn.Module) -> None:
    """Put every FSDP group of `model` back into its shards. The root group stays gathered after a forward that had no
    backward (an eval): its parameters are then plain tensors on storage FSDP frees at the next reshard, which must
    never reach a checkpoint."""
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def gather_full(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU}; a collective under FSDP (every rank, same order)."""
    return {name: full(t) for name, t in named}


def load_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy whole tensor `value` into `target`: a DTensor takes its own shard of it (every rank holds `value`)."""
    with torch.no_grad():
        if is_sharded(target):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(value)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor whole (a collective under FSDP): the layout a DDP
    run saves, so a checkpoint does not depend on how the model was sharded."""
    sd = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never write into them
    sd["state"] = {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()} for i, st in sd["state"].items()}  # fmt: skip
    return sd


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load what `full_optimizer_state` saved: each state tensor shaped like its parameter becomes that parameter's
    shard again."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in sd["state"].items():
        param = params[int(index)]
        if not is_sharded(param):
            continue
        from torch.distributed.tensor import distribute_tensor

        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    optimizer.load_state_dict(sd)


class _NoPaths:
    """Nothing to keep in line: an unsharded model (DDP lets a rank skip the tower), or a text-only LM."""

    def settle(self, dist) -> None:
        pass

    def remove(self) -> None:
        pass


def same_forward_paths(model: nn.Module, collator, dist) -> SameForwardPaths | _NoPaths:
    """`SameForwardPaths` on a sharded `model` with a dummy image from `collator`; else nothing to do."""
    dummy = dummy_image_inputs(collator, dist.device) if dist.sharded else None
    return _NoPaths() if dummy is None else SameForwardPaths(model, dummy)
