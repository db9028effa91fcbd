"""Run by tests/test_hf_integration.py under `torchrun --nproc_per_node=2`: recipes/hf_trainer_example.py (BalanceTrainer
on the tiny LLaVA) under accelerate's FSDP2 plugin, or under DDP, on gloo.

    torchrun --nproc_per_node=2 tests/dist_hf_fsdp_worker.py OUT.json fsdp|ddp EXAMPLE-ARGS...

accelerate 1.15 builds FSDP only for accelerator devices: on the CPU `AcceleratorState` keeps MULTI_CPU, drops the
plugin and the Trainer wraps the model in DDP. Here the state is promoted to FSDP as it would be on GPUs (the same
two assignments accelerate makes there, on every `AcceleratorState()`), so the Trainer runs its FSDP2 path (`fully_shard` through accelerate) on gloo.
Two things a real script meets are made to happen here, in both modes, so the test sees DDP and FSDP agree on them:
- each rank's adapters start different (rank 1's get noise after `apply_lora`), as they do in a script that builds
  them from the unseeded global RNG: DDP broadcasts rank 0's as it wraps the model, and so must BalanceTrainer under
  FSDP2 (accelerate shards each rank's own);
- optimizer steps TEXT_ONLY draw text-only examples on every rank (p = [0, 0, 1] there): under FSDP the vision side
  then has zero gradients, which BalanceTrainer drops before the step, as DDP leaves them None.
Rank 0 writes what the test compares; every rank reports its dummy-image forwards, its dropped vision steps and its
parameters' type.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType

from rbvl.balance import Balancer

RECIPES = Path(__file__).parents[1] / "recipes"
TEXT_ONLY = {3, 14}  # one optimizer step before checkpoint-10, one after


def fsdp_on_cpu() -> None:
    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)  # re-reads MULTI_CPU from PartialState every time
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = patched


def own_adapters(apply_lora):
    """`apply_lora`, then noise on the trainable parameters of every rank but 0 (before the process group exists)."""

    def apply(*args, **kwargs):
        model = apply_lora(*args, **kwargs)
        rank = int(os.environ["RANK"])
        if rank:
            noise = torch.Generator().manual_seed(rank)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=noise) * 0.01)
        return model

    return apply


def main(out: str, mode: str, *example_args: str) -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", RECIPES / "hf_trainer_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.apply_lora = own_adapters(example.apply_lora)
    proportions_at = Balancer.proportions_at
    Balancer.proportions_at = lambda self, step: [0.0, 0.0, 1.0] if step in TEXT_ONLY else proportions_at(self, step)
    if mode == "fsdp":
        fsdp_on_cpu()
        example_args = (*example_args, "--fsdp")
    trainer = example.main(list(example_args))
    per_rank = {
        "dummy_runs": trainer.paths.dummy_runs if trainer.paths is not None else None,
        "dropped": trainer.paths.dropped if trainer.paths is not None else None,
        "param_type": type(next(trainer.model.parameters())).__name__,
        "proportions": trainer.proportions,
    }
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, per_rank)
    if torch.distributed.get_rank() == 0:
        result = {
            "fsdp": trainer.is_fsdp_enabled,
            "ranks": gathered,
            "history": trainer.balancer.schedule.history(),
            "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
            "grad_norms": [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row],
            "steps": trainer.state.global_step,
        }
        Path(out).write_text(json.dumps(result, default=str))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
