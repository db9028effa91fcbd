"""The training loop: LoRA fine-tuning of an image-text-to-text model on a mixture of regrouped domains.

    rbvl train recipes/demo_tiny_rnb.yaml manifest=demo/shards/manifest.json
    torchrun --nproc_per_node=2 -m rbvl.cli train recipes/demo_tiny_rnb.yaml   # DDP (gloo on CPU, NCCL on GPUs)

Read it top to bottom: config → mixture stream → model + LoRA → steps. With `mixing.strategy: rnb` every optimizer
step also feeds the GradientTracker (it reads per-domain gradients off the same backward pass), and every
`balance.update_every` steps the Balancer turns them into a Gram matrix and new proportions p, which the stream
draws from a fixed, documented number of batches later (so a resumed run draws exactly what the first one did).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rbvl import checkpoint as ckpt
from rbvl import runlock
from rbvl.balance import Balancer, GradientTracker
from rbvl.config import RunConfig, dump_config
from rbvl.data import Collator, MixtureStream, ProportionSchedule, initial_proportions, load_domains
from rbvl.evaluate import evaluate_domains
from rbvl.metrics import MetricsLogger
from rbvl.model import TINY, apply_lora, load_model, save_base, trainable_summary
from rbvl.plots import plot_run

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict:
    """Run `cfg` to `cfg.max_steps`; returns the final eval (per-domain losses) and the proportions history."""
    # -------------------------------------------------------------------------------------------------------- setup
    dist = Distributed.from_env(cfg.train.device)
    run_dir = Path(cfg.output_dir)
    if dist.is_main:  # one run per output_dir: a second one is refused while this one lives (released at exit)
        runlock.acquire(run_dir, "rbvl train")
    resume_from = ckpt.latest(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("resume=true but %s holds no checkpoint: starting from scratch", run_dir)
    if not cfg.resume and ckpt.latest(run_dir) is not None:
        raise ckpt.CheckpointError(f"{run_dir} already holds a run; pass resume=true, or choose another output_dir")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    # --------------------------------------------------------------------------------------------------------- data
    domains = load_domains(cfg.manifest)
    names, m = domains.names, len(domains.names)
    p0 = initial_proportions(cfg.mixing.strategy, domains, cfg.mixing.weights)
    target = domains.eval_distribution  # q: the eval set's share of each domain (None → uniform)

    # -------------------------------------------------------------------------------------------------------- model
    model, processor = load_model(cfg.model, seed=cfg.seed)
    if cfg.model.name == TINY and dist.is_main:
        save_base(model, processor, run_dir / "base_model")  # so the adapter reloads without rbvl
    torch.manual_seed(cfg.seed)  # adapters start the same on every rank and for every world size
    model = apply_lora(model, cfg.lora)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between ranks, as their data does
    if cfg.model.name == TINY and hasattr(model, "peft_config"):
        model.peft_config["default"].base_model_name_or_path = str((run_dir / "base_model").resolve())
    model.to(dist.device)
    log.info(trainable_summary(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    rnb = cfg.mixing.strategy == "rnb"
    tracker = GradientTracker(model, m, params=cfg.balance.params) if rnb else None
    balancer = Balancer.from_config(m, cfg.balance, target=target)
    ddp_model = dist.wrap(model)

    collator = Collator(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong)
    schedule = ProportionSchedule(m, initial=p0)
    stream = MixtureStream(
        domains,
        schedule,
        batch_size=cfg.train.batch_size,
        collate=collator,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )

    step = 0
    if resume_from is not None:
        state = ckpt.load(resume_from, model, optimizer, scheduler, stream, tracker, balancer, dist)
        step = state["step"]
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = MetricsLogger(run_dir, names, tensorboard=cfg.logging.tensorboard, enabled=dist.is_main)
    metrics.truncate_after(step)

    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
        pin_memory=dist.device.type == "cuda",
    )
    batches = iter(loader)
    autocast = autocast_context(cfg.train.precision, dist.device)
    # fp16 needs loss scaling; the tracker then sees scaled gradients too, which leaves p unchanged (p depends on
    # the direction of G q) unless the scale changes inside a window. bf16 needs none and is the better choice.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.precision == "fp16")
    result = None
    progress = tqdm(
        total=cfg.max_steps, initial=step, desc="train", disable=not (dist.is_main and cfg.logging.progress)
    )
    window = WindowStats(m)
    t_last = time.perf_counter()

    # ------------------------------------------------------------------------------------------------ training loop
    while step < cfg.max_steps:
        model.train()
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            stream.consumed(batch)
            domain_ids = batch.pop("domain_ids")
            last_index = batch.pop("index")
            inputs = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            inputs.pop("has_image", None)
            if tracker is not None:
                tracker.set_domains(domain_ids, image_domain_ids=image_domains(domain_ids, batch))
            sync = micro == cfg.train.grad_accum - 1
            with dist.no_sync(ddp_model, sync), autocast:
                out = ddp_model(**inputs)
                loss = out.loss / cfg.train.grad_accum
            scaler.scale(loss).backward()
            window.add(out.logits.detach(), inputs["labels"], domain_ids)

        if cfg.optim.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)

        # ------------------------------------------------------------------------------------------------- balance
        if rnb:
            p_before = balancer.proportions
            info = balancer.step(step, tracker)  # every K steps: Gram of domain gradients → new p; resets tracker
            if info is not None:
                schedule.publish(balancer.proportions, after_batch=last_index)
                metrics.log(
                    "balance",
                    step,
                    p=balancer.proportions,
                    p_before=p_before,
                    gram=info["gram"],
                    gram_eigenvalues=info.get("eigenvalues"),
                    counts=info.get("counts"),
                    degenerate=info.get("degenerate"),
                    applies_from_batch=last_index + 1 + stream.lag,
                    p_rank_spread=dist.spread(balancer.proportions),  # 0 when every rank holds the same p
                )

        # ----------------------------------------------------------------------------------------------------- log
        if step % cfg.train.log_every == 0 or step == cfg.max_steps:
            row = window.pop(dist)
            now = time.perf_counter()
            row.update(
                lr=scheduler.get_last_lr()[0], p=schedule.current(), step_time=(now - t_last) / cfg.train.log_every
            )
            row.update(stream.pop_counts())
            t_last = now
            metrics.log("train", step, **row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", p=" ".join(f"{x:.2f}" for x in schedule.current()))

        # ---------------------------------------------------------------------------------------------------- eval
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.max_steps:
            result = evaluate_domains(model, domains, collator, cfg.eval, dist, target=target)
            metrics.log("eval", step, **result)
            if dist.is_main:
                progress.write(format_eval(step, names, result))

        # ---------------------------------------------------------------------------------------------- checkpoint
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.max_steps:
            ckpt.save(run_dir, step, cfg, model, processor, optimizer, scheduler, stream, tracker, balancer, dist)

    progress.close()
    metrics.close()
    if dist.is_main and cfg.logging.plots:
        plots = plot_run(run_dir, names)
        log.info("plots: %s", ", ".join(str(p) for p in plots))
    if result is None:  # resumed a run that had already reached max_steps
        result = evaluate_domains(model, domains, collator, cfg.eval, dist, target=target)
    summary = {"eval": result, "proportions": balancer.history, "run_dir": str(run_dir)}
    del ddp_model, model, optimizer
    dist.close()
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Pieces the loop uses
# ---------------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio · lr at max_steps."""
    warmup = cfg.optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def image_domains(domain_ids: torch.Tensor, batch: dict) -> torch.Tensor | None:
    """The domain of each image in the batch (the projector sees images, not samples)."""
    has_image = batch.get("has_image")
    return domain_ids[has_image] if has_image is not None else None


def autocast_context(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class WindowStats:
    """Per-domain training loss between two log lines, from the logits the step already computed."""

    def __init__(self, n_domains: int):
        self.m = n_domains
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros(self.m, dtype=torch.float64)
        self.tokens = torch.zeros(self.m, dtype=torch.float64)
        self.samples = torch.zeros(self.m, dtype=torch.float64)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor) -> None:
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        )  # (B, T-1)
        n_tokens = (labels[:, 1:] != -100).sum(1)  # (B,)
        d = domain_ids.to(torch.long).cpu()
        self.loss_sum.index_add_(0, d, token_loss.sum(1).double().cpu())
        self.tokens.index_add_(0, d, n_tokens.double().cpu())
        self.samples.index_add_(0, d, torch.ones_like(d, dtype=torch.float64))

    def pop(self, dist: Distributed) -> dict:
        stats = torch.stack([self.loss_sum, self.tokens, self.samples]).to(dist.device)
        dist.all_reduce(stats)
        loss_sum, tokens, samples = stats.cpu()
        self.reset()
        per_domain = torch.where(tokens > 0, loss_sum / tokens.clamp(min=1), torch.full_like(tokens, float("nan")))
        return {
            "loss": (loss_sum.sum() / tokens.sum().clamp(min=1)).item(),
            "loss_per_domain": [None if math.isnan(x) else x for x in per_domain.tolist()],
            "samples_per_domain": samples.tolist(),
        }


def format_eval(step: int, names: list[str], result: dict) -> str:
    parts = [f"{n}={v:.3f}" for n, v in zip(names, result["loss_per_domain"]) if v is not None]
    return f"eval @ {step}: mixture {result['loss']:.4f} | " + " ".join(parts)


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.is_main = rank == 0

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

    def wrap(self, model):
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A batch without images leaves the vision tower and projector out of the graph.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def no_sync(self, ddp_model, sync: bool):
        if self.enabled and not sync:
            return ddp_model.no_sync()
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

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
        # A barrier, then freeing what holds the group, before destroying it: a bare destroy_process_group()
        # aborted at interpreter exit in about 1 run in 5 with gloo.
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()
