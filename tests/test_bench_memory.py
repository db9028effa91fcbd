"""Per-rank memory under DDP and FSDP (rbvl/bench/memory.py), counted on the meta device, against hand counts."""

import torch

from rbvl.bench.memory import GIB, per_rank_memory, print_memory
from rbvl.config import LoraConfig, ModelConfig
from rbvl.model import apply_lora, load_model


def test_per_rank_memory_of_the_tiny_llava_matches_a_hand_count(capsys):
    model, _ = load_model(ModelConfig(freeze_vision=True), seed=0)
    model = apply_lora(model, LoraConfig(r=4))
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in params)
    mem = per_rank_memory(model, tracker_bytes=3 * 2**20, worlds=(8, 64))
    ddp, f8, f64 = mem["ddp"], mem["fsdp"][8], mem["fsdp"][64]
    assert ddp["weights"] * GIB == 4 * n_all and ddp["grads"] * GIB == 4 * n_train
    assert ddp["optimizer"] * GIB == 2 * 4 * n_train  # AdamW's two moments
    assert f8["weights"] == ddp["weights"] / 8 and f64["optimizer"] == ddp["optimizer"] / 64
    assert ddp["tracker"] == f8["tracker"] == f64["tracker"] == 3 / 1024  # per rank under both: not sharded
    layer = sum(p.numel() for p in model.get_base_model().model.language_model.layers[0].parameters())
    root = n_all - 2 * layer - sum(p.numel() for p in model.get_base_model().model.vision_tower.parameters())
    assert mem["largest_group_params"] == max(layer, root)
    assert f8["gathered"] * GIB == 2 * 2 * mem["largest_group_params"]  # two groups in flight, bf16
    assert ddp["total"] > f8["total"] > f64["total"]
    print_memory(mem, "exact")
    out = capsys.readouterr().out
    assert "ddp, any world" in out and "fsdp, world 8" in out and "fsdp, world 64" in out
