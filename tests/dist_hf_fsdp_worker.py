"""Run by tests/test_hf_integration.py under `torchrun --nproc_per_node=2`: recipes/hf_trainer_example.py (BalanceTrainer
on the tiny LLaVA) under accelerate's FSDP2 plugin, or under DDP, on gloo.

    torchrun --nproc_per_node=2 tests/dist_hf_fsdp_worker.py OUT.json fsdp|ddp EXAMPLE-ARGS...

accelerate 1.15 builds FSDP only for accelerator devices: on the CPU `AcceleratorState` keeps MULTI_CPU, drops the
plugin and the Trainer wraps the model in DDP. Here the state is promoted to FSDP as it would be on GPUs (the same
two assignments accelerate makes there, on every `AcceleratorState()`), so the Trainer runs its FSDP2 path (`fully_shard` through accelerate) on gloo.
Rank 0 writes what the test compares; every rank reports its dummy-image forwards and its parameters' type.
"""

import importlib.util
import json
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType

RECIPES = Path(__file__).parents[1] / "recipes"


def fsdp_on_cpu() -> None:
    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)  # re-reads MULTI_CPU from PartialState every time
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = patched


def main(out: str, mode: str, *example_args: str) -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", RECIPES / "hf_trainer_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    if mode == "fsdp":
        fsdp_on_cpu()
        example_args = (*example_args, "--fsdp")
    trainer = example.main(list(example_args))
    per_rank = {
        "dummy_runs": trainer.paths.dummy_runs if trainer.paths is not None else None,
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
            "steps": trainer.state.global_step,
        }
        Path(out).write_text(json.dumps(result, default=str))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
