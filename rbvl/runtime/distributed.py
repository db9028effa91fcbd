"""One process or many: torch.distributed as `rbvl train` and `rbvl-regroup` use it under torchrun.

    dist = Distributed.from_env()          # reads WORLD_SIZE / RANK / LOCAL_RANK; starts the process group
    model = dist.shard(model, cfg.train)   # train.parallel=fsdp: FSDP2 in place (before the optimizer); else as is
    ddp_model = dist.wrap(model)           # DDP when world_size > 1 (and not sharded), the model itself otherwise
    dist.all_reduce(t); dist.barrier()     # no-ops on one process
    dist.close()                           # barrier, free, destroy (a bare destroy aborted ~1 run in 5 with gloo)

NCCL on GPUs, gloo on the CPU. Everything here is a no-op on a single process, so callers never branch on it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os

import torch

log = logging.getLogger(__name__)


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.is_main = rank == 0
        self.sharded = False  # FSDP2 (`shard`): every rank must run the same forwards, collectives follow the model

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if world_size > 1 and not torch.distributed.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world_size, local_rank, dev)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, model, train_cfg):
        """`train.parallel=fsdp` under torchrun: FSDP2 on `model` in place (rbvl/runtime/sharding.py), before the
        optimizer is built (FSDP2 replaces the parameters with sharded DTensors). DDP, or one process: `model`."""
        if train_cfg.parallel != "fsdp":
            return model
        if not self.enabled:
            log.info("train.parallel=fsdp on one process: nothing to shard, the model trains as it is")
            return model
        from rbvl.runtime.sharding import shard_model

        self.sharded = True
        return shard_model(model, self.device, train_cfg.fsdp_precision, train_cfg.fsdp_cpu_offload)

    def wrap(self, model):
        if not self.enabled or self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A batch without images leaves the vision tower and projector out of the graph.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def no_sync(self, ddp_model, sync: bool):
        """DDP's no_sync() for the micro-batches of gradient accumulation before the last (FSDP2: no reduce-scatter
        until the last; the gradients stay whole until then)."""
        if self.sharded:
            return _gradient_sync(ddp_model, sync)
        if self.enabled and not sync:
            return ddp_model.no_sync()
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def spread(self, values) -> float:
        """Largest difference of `values` between any two ranks (0.0 on one process)."""
        if not self.enabled:
            return 0.0
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        hi, lo = t.clone(), t.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        return (hi - lo).abs().max().item()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        close()


def _gradient_sync(fsdp_model, sync: bool):
    """FSDP2 reads the flag in the backward pass, which runs after the forward's context has closed: it stays set
    until the next micro-batch sets it again."""
    fsdp_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def close() -> None:
    """Barrier, free what holds the group, then destroy it (a bare destroy_process_group() aborted at interpreter
    exit in about 1 run in 5 with gloo)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()


def refuse_zero3() -> None:
    """`accelerate launch` with a DeepSpeed ZeRO-3 config (it exports the stage or the config file to every process):
    one line that points to FSDP2. `rbvl train` never hands the model to DeepSpeed: other stages run as train.parallel
    says (DDP, whose memory ZeRO-1/2 would only trim by the optimizer state of the adapters)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        import json

        with open(path) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
    if str(stage) == "3":
        from rbvl.config import ConfigError

        raise ConfigError(
            "rbvl train does not run under DeepSpeed ZeRO-3 (from the accelerate launch config); "
            "shard with train.parallel=fsdp (FSDP2) under torchrun instead"
        )
    log.warning("rbvl train ignores accelerate launch's DeepSpeed config (ZeRO-%s): train.parallel decides", stage)
