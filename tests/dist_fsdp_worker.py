"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node=2`: the GradientTracker on a tiny LLaVA sharded by FSDP2
(or wrapped by DDP), rank 0's micro-batch with images and rank 1's text only.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_fsdp_worker.py OUT.pt fsdp|ddp

Both modes feed the same batches; after `tracker.sync()` rank 0 saves the domain gradients, the unbiased G, the
trainable parameters after one AdamW step (whole), and how often each rank ran the dummy image. Under FSDP rank 1
must run the vision tower on the dummy image, or rank 0 would wait in the tower's all-gather forever: the test bounds
the run with a timeout.
"""

import gc
import sys

import torch
import torch.distributed as dist
from PIL import Image

from rbvl.balance import GradientTracker
from rbvl.config import LoraConfig, ModelConfig
from rbvl.data.collate import Encoder
from rbvl.model import apply_lora, load_model
from rbvl.runtime.sharding import SameForwardPaths, dummy_image_inputs, gather_full, shard_model

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30)]


def samples(rank: int):
    """Rank 0: two image samples (domain 0) and a text one (domain 1); rank 1: text only (domains 1 and 2)."""
    if rank == 0:
        out = [
            (
                {
                    "id": f"img{i}",
                    "conversation": [
                        {"role": "user", "content": "<image>\nWhat colour is this?"},
                        {"role": "assistant", "content": ["red", "green"][i]},
                    ],
                    "image": Image.new("RGB", (32, 32), COLOURS[i]),
                },
                0,
            )
            for i in range(2)
        ]
        out.append(({"id": "t0", "conversation": _text(3)}, 1))
        return out
    return [({"id": f"t{i}", "conversation": _text(i)}, 1 + i % 2) for i in range(3)]


def _text(i: int):
    return [{"role": "user", "content": f"What is {i} + {i % 3}?"}, {"role": "assistant", "content": f"{i + i % 3}"}]


def run(mode: str, rank: int):
    model, processor = load_model(ModelConfig(freeze_vision=True), seed=0)
    torch.manual_seed(0)
    model = apply_lora(model, LoraConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; move it so lora_A has gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    collator = Encoder(processor, max_length=64)
    tracker = GradientTracker(model, 3, params="lora")
    if mode == "fsdp":
        model = shard_model(model, torch.device("cpu"))
        paths = SameForwardPaths(model, dummy_image_inputs(collator, torch.device("cpu")))
        wrapped = model
    else:
        paths = None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    mine = samples(rank)
    batch, info = collator([s for s, _ in mine], [d for _, d in mine])
    labels = batch.pop("labels")
    tracker.set_domains(info["domain_ids"], tokens=info["label_tokens"], image_domain_ids=info["image_domain_ids"])
    n_tokens = info["label_tokens"].sum()
    logits = wrapped(**batch).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
    )
    tracker.watch_loss(ce / n_tokens, normalizer=n_tokens).backward()
    tracker.sync()
    if paths is not None:
        paths.settle(_Dist())
    optimizer.step()
    after = gather_full((n, p) for n, p in model.named_parameters() if p.requires_grad)
    dummy = torch.tensor([paths.dummy_runs if paths is not None else 0])
    runs = [torch.zeros_like(dummy) for _ in range(2)]
    dist.all_gather(runs, dummy)
    return {
        "grads": tracker.domain_grads(),
        "tokens": tracker.tokens.clone(),
        "gram": tracker.gram(),
        "after": after,
        "dummy_runs": [int(r) for r in runs],
        "sharded": [type(p).__name__ for p in params][:1],
    }


class _Dist:
    device = torch.device("cpu")

    @staticmethod
    def all_reduce(t):
        dist.all_reduce(t)
        return t


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = run(mode, rank)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    del result
    gc.collect()
    dist.destroy_process_group()
