"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: DDP + GradientTracker on the tiny model.

Each rank takes its half of one fixed batch; after `tracker.sync()` rank 0 saves the domain gradients and the unbiased
G, which must equal those of one process that runs both halves as two micro-batches.
"""

import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rbvl.balance import GradientTracker, label_tokens
from rbvl.config import LoraConfig, ModelConfig
from rbvl.model import apply_lora, load_model


def fixed_batch(processor, n=8):
    texts, domains = [], []
    for i in range(n):
        conv = [
            {"role": "user", "content": f"What is {i} + {i % 3}?"},
            {"role": "assistant", "content": f"{i + i % 3}"},
        ]
        texts.append(processor.apply_chat_template(conv, tokenize=False))
        domains.append(i % 3)
    inputs = processor(text=texts, padding="max_length", max_length=40, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    return dict(inputs, labels=labels), torch.tensor(domains)


def domain_grads(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model, processor = load_model(ModelConfig(), seed=0)
    torch.manual_seed(0)  # the adapters' initialisation: the same in every process
    model = apply_lora(model, LoraConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; move it so lora_A has gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    inputs, domains = fixed_batch(processor)
    tracker = GradientTracker(model, 3, params="lora")
    wrapped = DistributedDataParallel(model) if world > 1 else model
    # One micro-batch per rank; one process runs both halves as two micro-batches, so the unbiased G (which needs
    # Σ_k ‖s_ik‖² and Σ_k T_ik² over every rank's micro-batches) must agree too.
    for part in [rank] if world > 1 else [0, 1]:
        share = slice(part * len(domains) // 2, (part + 1) * len(domains) // 2)
        labels = inputs["labels"][share]
        tracker.set_domains(domains[share], tokens=label_tokens(labels))
        # Each rank's loss is the mean over its own label tokens, as in `rbvl train` (DDP then averages the
        # gradients); the tracker's sums over ranks must still give each domain's token-mean gradient.
        n_tokens = label_tokens(labels).sum()
        logits = wrapped(input_ids=inputs["input_ids"][share], attention_mask=inputs["attention_mask"][share]).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
        )
        loss = tracker.watch_loss(ce / n_tokens, normalizer=n_tokens)
        loss.backward()
    tracker.sync()
    return tracker.domain_grads(), tracker.tokens.clone(), tracker.gram()


if __name__ == "__main__":
    out = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "single":
        grads, counts, G = domain_grads(0, 1)
        torch.save({"grads": grads, "counts": counts, "gram": G}, out)
        sys.exit(0)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    grads, counts, G = domain_grads(rank, world)
    gathered = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank == 0:
        torch.save({"grads": grads, "counts": counts, "all_ranks": gathered, "gram": G}, out)
    # A barrier, then freeing what holds the group, before destroying it: a bare destroy_process_group() aborted
    # at interpreter exit in about 1 run in 5 with gloo on this kind of machine.
    dist.barrier()
    del grads, counts, gathered
    gc.collect()
    dist.destroy_process_group()
