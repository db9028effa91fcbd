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
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rbvl import checkpoint as ckpt
from rbvl import runlock
from rbvl.balance import Balancer, GradientTracker, ProportionSchedule
from rbvl.config import RunConfig, dump_config
from rbvl.data import Collator, MixtureStream, initial_proportions, load_domains, loader_lag
from rbvl.distributed import Distributed
from rbvl.evaluate import causal_lm_token_loss, evaluate_domains
from rbvl.families import head_patterns
from rbvl.metrics import MetricsLogger
from rbvl.mix_context import build_mix_context
from rbvl.mixing import PEERS, build_mixer, input_tokens
from rbvl.model import apply_lora, is_tiny, load_model, save_base, trainable_summary
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
    lag = loader_lag(cfg.data.num_workers, cfg.data.prefetch_factor, cfg.train.grad_accum)
    # p over optimizer steps, in shared memory (room for a peer mixer that updates every step)
    schedule = ProportionSchedule(m, initial=p0, lag=lag, capacity=max(4096, cfg.max_steps + 1))

    # -------------------------------------------------------------------------------------------------------- model
    model, processor = load_model(cfg.model, seed=cfg.seed)
    if is_tiny(cfg.model.name) and dist.is_main:
        save_base(model, processor, run_dir / "base_model")  # so the adapter reloads without rbvl
    torch.manual_seed(cfg.seed)  # adapters start the same on every rank and for every world size
    model = apply_lora(model, cfg.lora)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between ranks, as their data does
    if is_tiny(cfg.model.name) and hasattr(model, "peft_config"):
        model.peft_config["default"].base_model_name_or_path = str((run_dir / "base_model").resolve())
    model.to(dist.device)
    log.info(trainable_summary(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    rnb = cfg.mixing.strategy == "rnb"
    fp16 = cfg.train.precision == "fp16"
    tracker = None
    if rnb:
        # Reads each domain's gradient off the backward pass; sketched, its memory is m × sketch_dim.
        tracker = GradientTracker(
            model,
            m,
            params=cfg.balance.params,
            sketch_dim=cfg.balance.sketch_dim,
            seed=cfg.seed,
            guard_nonfinite=fp16,
            head_patterns=head_patterns(model) if cfg.balance.params == "head" else None,
        )
    balancer = Balancer.from_config(m, cfg.balance, target=target, schedule=schedule)
    collator = Collator(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong)
    mixer = held_out = None
    if cfg.mixing.strategy in PEERS:  # odm, dga, doremi, aioli: the methods R&B is compared with
        ctx, held_out = build_mix_context(cfg, model, domains, collator, dist, target, scheduler)
        mixer = build_mixer(cfg.mixing.strategy, m, target, cfg.mixing, ctx, initial=p0, seed=cfg.seed)
    ddp_model = dist.wrap(model)

    stream = MixtureStream(
        domains,
        schedule,
        batch_size=cfg.train.batch_size,
        collate=collator,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.data.num_workers,
        grad_accum=cfg.train.grad_accum,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    window = WindowStats(m)  # per-domain train loss between two log lines

    step = 0
    if resume_from is not None:
        state = ckpt.load(
            resume_from, model, optimizer, scheduler, stream, tracker, balancer, window, dist, mixer, held_out
        )
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
        generator=torch.Generator().manual_seed(cfg.seed + dist.rank),  # leaves the global RNG (dropout) alone
    )
    batches = iter(loader)
    autocast = autocast_context(cfg.train.precision, dist.device)
    # fp16 needs loss scaling; the tracker reads the scale off the loss's gradient (watch_loss) and drops a step
    # whose gradients overflowed, as the scaler does. bf16 needs none and is the better choice.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=fp16)
    result = None
    progress = tqdm(
        total=cfg.max_steps, initial=step, desc="train", disable=not (dist.is_main and cfg.logging.progress)
    )
    t_last = time.perf_counter()

    # ------------------------------------------------------------------------------------------------ training loop
    while step < cfg.max_steps:
        model.train()
        for micro in range(cfg.train.grad_accum):
            inputs, meta = next(batches)  # meta: BatchMeta, never passed to the model
            stream.consumed(meta)
            n_input = input_tokens(inputs)  # counted on the loader's CPU tensors: no device sync
            inputs = {k: v.to(dist.device, non_blocking=True) for k, v in inputs.items()}
            labels = inputs.pop("labels")
            n_tokens = meta.label_tokens.sum().clamp(min=1)
            if tracker is not None:
                tracker.set_domains(meta.domain_ids, tokens=meta.label_tokens, image_domain_ids=meta.image_domain_ids)
            with dist.no_sync(ddp_model, sync=micro == cfg.train.grad_accum - 1), autocast:
                logits = ddp_model(**inputs).logits
                token_loss = causal_lm_token_loss(logits, labels)  # (B, T): the one cross-entropy of the step
                loss = token_loss.sum() / n_tokens.to(token_loss.device)  # the mean over label tokens
            if tracker is not None:
                tracker.watch_loss(loss, normalizer=n_tokens)  # so it can undo 1/grad_accum and the fp16 scale
            scaler.scale(loss / cfg.train.grad_accum).backward()
            window.add(token_loss.detach().sum(1), meta.label_tokens, meta.domain_ids, n_input)
            if mixer is not None:  # ODM's reward, DoReMi's excess loss: from the loss this step computed
                token_loss = token_loss.detach()[:, :-1]  # (B, T-1)
                mixer.observe({**inputs, "labels": labels}, meta, token_loss.sum(1), meta.label_tokens, token_loss)

        if cfg.optim.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        scale = scaler.get_scale() if fp16 else 1.0
        scaler.step(optimizer)
        scaler.update()
        overflowed = fp16 and scaler.get_scale() < scale  # GradScaler skipped this step
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.steps += 1
        progress.update(1)

        # ------------------------------------------------------------------------------------------------- balance
        if rnb:
            tracker.commit(skip=overflowed)  # the step joins the window (or not, if it overflowed)
            if balancer.due(step, tracker):
                tracker.sync()  # sum every rank's window: all ranks now hold the same sums
                stale, tokens = tracker.stale(), tracker.tokens.tolist()
                G = tracker.gram()  # (m, m) G_ij = g_i · g_j, token-mean domain gradients of the window
                p_before = balancer.proportions
                p, info = balancer.update(G)  # p = softmax(λ · G q / ‖G q‖)
                tracker.reset()
                applies_from = schedule.publish(p, after_step=step)  # the stream draws it from this step on
                metrics.log(
                    "balance",
                    step,
                    p=p,
                    p_before=p_before,
                    gram=info["gram"],
                    gram_eigenvalues=info["eigenvalues"],
                    tokens=tokens,
                    stale=stale,
                    degenerate=info["degenerate"],
                    applies_from_step=applies_from,
                    skipped_steps=tracker.skipped_steps,
                    p_rank_spread=dist.spread(p),  # 0 when every rank holds the same p
                )

        if mixer is not None:
            info = mixer.step(step, ctx)  # may run its own extra passes (dga, aioli) or reference forwards (doremi)
            if info is not None and "p" in info:
                applies_from = schedule.publish(info["p"], after_step=step)
                metrics.log("mixing", step, applies_from_step=applies_from, cost=mixer.cost, **info)

        # ----------------------------------------------------------------------------------------------------- log
        if step % cfg.train.log_every == 0 or step == cfg.max_steps:
            row = window.pop(dist)
            now = time.perf_counter()
            row.update(
                lr=scheduler.get_last_lr()[0], p=schedule.current(), step_time=(now - t_last) / max(1, row.pop("steps"))
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
            ckpt.save(
                run_dir, step, cfg, model, processor, optimizer, scheduler, stream, tracker, balancer, window, dist,
                mixer, held_out,
            )  # fmt: skip

    progress.close()
    metrics.close()
    if dist.is_main and cfg.logging.plots:
        plots = plot_run(run_dir, names)
        log.info("plots: %s", ", ".join(str(p) for p in plots))
    if result is None:  # resumed a run that had already reached max_steps
        result = evaluate_domains(model, domains, collator, cfg.eval, dist, target=target)
    summary = {
        "eval": result,
        "proportions": schedule.history(),
        "run_dir": str(run_dir),
        "cost": mixing_cost(mixer, tracker),
        # this rank's training work in the mixers' terms (forward + 2 · backward, 2 · parameters FLOPs per token)
        "train_tokens": window.input_tokens,
        "train_flops": 3 * 2.0 * sum(p.numel() for p in model.parameters()) * window.input_tokens,
    }
    if tracker is not None:
        tracker.remove()
    del ddp_model, model, optimizer
    dist.close()
    if dist.is_main:
        runlock.release(run_dir)
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


def mixing_cost(mixer, tracker) -> dict | None:
    """The mixing strategy's extra work, in the peers' terms (R&B: no extra passes, only tracking FLOPs)."""
    if mixer is not None:
        return dict(mixer.cost)
    if tracker is not None:
        return {"forward_tokens": 0, "backward_tokens": 0, "flops": tracker.extra_flops}
    return None


def autocast_context(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class WindowStats:
    """Per-domain training loss between two log lines, from the per-token loss the step already computed."""

    def __init__(self, n_domains: int):
        self.m = n_domains
        self.input_tokens = 0  # tokens this rank's forward passes processed since step 0 (not reset: the run's FLOPs)
        self.reset()

    def reset(self):
        self.stats = torch.zeros(3, self.m, dtype=torch.float64)  # (loss sum, tokens, samples) per domain
        self.steps = 0

    @torch.no_grad()
    def add(
        self, loss_sum: torch.Tensor, tokens: torch.Tensor, domain_ids: torch.Tensor, input_tokens: int = 0
    ) -> None:
        """One micro-batch: loss_sum, tokens, domain_ids are (B,) per sample (the loop counts `steps` itself)."""
        self.input_tokens += int(input_tokens)
        d = domain_ids.to(torch.long).cpu()
        self.stats[0].index_add_(0, d, loss_sum.double().cpu())
        self.stats[1].index_add_(0, d, tokens.double().cpu())
        self.stats[2].index_add_(0, d, torch.ones_like(d, dtype=torch.float64))

    def pop(self, dist: Distributed) -> dict:
        stats = self.stats.to(dist.device)
        dist.all_reduce(stats)
        loss_sum, tokens, samples = stats.cpu()
        steps = self.steps
        self.reset()
        per_domain = torch.where(tokens > 0, loss_sum / tokens.clamp(min=1), torch.full_like(tokens, float("nan")))
        return {
            "loss": (loss_sum.sum() / tokens.sum().clamp(min=1)).item(),
            "loss_per_domain": [None if math.isnan(x) else x for x in per_domain.tolist()],
            "samples_per_domain": samples.tolist(),
            "steps": steps,
        }

    def state_dict(self) -> dict:
        return {"stats": self.stats.clone(), "steps": self.steps, "input_tokens": self.input_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.stats = state["stats"].clone().double()
        self.steps = int(state["steps"])
        self.input_tokens = int(state.get("input_tokens", 0))  # absent from checkpoints of rbvl 0.2


def format_eval(step: int, names: list[str], result: dict) -> str:
    parts = [f"{n}={v:.3f}" for n, v in zip(names, result["loss_per_domain"]) if v is not None]
    return f"eval @ {step}: mixture {result['loss']:.4f} | " + " ".join(parts)
