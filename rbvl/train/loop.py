"""The training loop: LoRA fine-tuning of an image-text-to-text model on a mixture of regrouped domains.

    rbvl train recipes/demo_tiny_rnb.yaml manifest=demo/shards/manifest.json
    torchrun --nproc_per_node=2 -m rbvl.cli train recipes/demo_tiny_rnb.yaml   # DDP (gloo on CPU, NCCL on GPUs)

Read it top to bottom: config → mixture stream → model + LoRA → steps. Every strategy is a Mixer (rbvl/mixing/) and
gets the same hooks: before the forward (the batch's domains), after the loss, after the optimizer step. With
`mixing.strategy: rnb` those hooks feed the GradientTracker, which reads per-domain gradients off the same backward
pass, and every `balance.update_every` steps turn them into a Gram matrix and new proportions p. The stream draws a
new p a fixed, documented number of batches later, so a resumed run draws exactly what the first one did.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rbvl.balance import ProportionSchedule
from rbvl.config import RunConfig, check_runnable
from rbvl.data import MixtureStream, load_domains, loader_lag
from rbvl.data.collate import Encoder
from rbvl.data.probe import probe_domains
from rbvl.evaluate import causal_lm_token_loss, evaluate_domains
from rbvl.mixing import build_mixer, initial_proportions, input_tokens
from rbvl.mixing.context import build_mix_context
from rbvl.model import prepare_model
from rbvl.model.families import lookup, model_type_of
from rbvl.runtime import runlock
from rbvl.runtime.distributed import Distributed, refuse_zero3
from rbvl.runtime.sharding import same_forward_paths
from rbvl.train import checkpoint as ckpt
from rbvl.train.guard import DivergenceGuard, Preempted, StopSignals, ignore_stop_signals
from rbvl.train.metrics import MetricsLogger, WindowStats, format_eval
from rbvl.train.optim import autocast_context, build_optimizer, optimizer_step
from rbvl.train.plots import plot_run
from rbvl.train.samples import generate_samples, write_samples

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict:
    """Run `cfg` to `cfg.max_steps`; returns the final eval (per-domain losses) and the proportions history.

    Raises `Preempted` after a SIGTERM, SIGUSR1 or SIGINT (the step finished, a checkpoint written) and `Diverged`
    after `train.max_nonfinite_steps` non-finite steps in a row; the signal handlers live as long as this call."""
    check_runnable(cfg)  # settings that would make the run a silent no-op (Balance that never updates)
    refuse_zero3()  # an `accelerate launch` DeepSpeed ZeRO-3 config: one line pointing to train.parallel=fsdp
    with StopSignals() as stop, contextlib.ExitStack() as owned:  # owned: what must stop before train() returns
        return _train(cfg, stop, owned)


def _train(cfg: RunConfig, stop: StopSignals, owned: contextlib.ExitStack) -> dict:
    # -------------------------------------------------------------------------------------------------------- setup
    dist = Distributed.from_env(cfg.train.device)
    resume_from = ckpt.open_run(cfg, dist)  # the run folder is ours (lock, config.yaml); resume or start afresh
    run_dir = Path(cfg.output_dir)

    # --------------------------------------------------------------------------------------------------------- data
    domains, p0, schedule = _mixture(cfg)  # the regrouped domains, p at step 0, and p over the steps to come
    names, m = domains.names, len(domains)
    target = domains.eval_distribution  # q: the eval set's share of each domain (None → uniform)

    # -------------------------------------------------------------------------------------------------------- model
    model, processor = prepare_model(cfg, run_dir, dist.rank, dist.device)
    family = lookup(model_type_of(model))  # the table's row (a text LM's too, so the stream can name it)
    model = dist.shard(model, cfg.train)  # train.parallel=fsdp: FSDP2 in place, before the optimizer sees the params
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg)
    collator = Encoder(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong, family=family)
    probe_domains(domains, collator, p0)  # a max_length that leaves a domain no label token: one line, now
    paths = same_forward_paths(model, collator, dist)  # FSDP: a rank without an image still runs the vision tower
    owned.callback(paths.remove)
    ctx, held_out = build_mix_context(cfg, model, domains, collator, dist, target, scheduler, schedule)
    mixer = build_mixer(
        cfg.mixing.strategy, m, target, cfg.mixing, ctx, initial=p0, seed=cfg.seed, balance=cfg.balance
    )  # rnb attaches its GradientTracker to the model here, before DDP wraps it
    ddp_model = dist.wrap(model)
    stream = _stream(domains, schedule, collator, cfg, dist)  # the samples' domains drawn by p, resumable exactly
    window, guard = WindowStats(m), DivergenceGuard(cfg)  # per-domain loss since the last log; non-finite steps
    state = ckpt.TrainState(
        cfg, model, processor, optimizer, scheduler, stream, schedule, mixer, held_out, window, dist, guard
    )
    if resume_from is not None:
        ckpt.load(resume_from, state)
        if dist.is_main:  # said, not logged: a resume that picked the wrong folder should be seen
            left = (
                f"training on to step {cfg.max_steps}"
                if state.step < cfg.max_steps
                else (f"already at max_steps={cfg.max_steps}: nothing to train (raise max_steps to go on); evaluating")
            )
            print(f"rbvl train: resumed from {resume_from} at step {state.step}, {left}", file=sys.stderr, flush=True)
    metrics = MetricsLogger.for_run(cfg, names, enabled=dist.is_main)  # metrics.jsonl + logging.report_to
    metrics.truncate_after(state.step)
    batches = iter(_loader(stream, cfg, dist))
    owned.callback(_stop_workers, batches)  # on return and on any error, not at interpreter exit
    autocast = autocast_context(cfg.train.precision, dist.device)
    # fp16 needs loss scaling; R&B reads the scale off the loss's gradient and drops a step whose gradients
    # overflowed, as the scaler does. bf16 needs none and is the better choice.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.precision == "fp16")
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not (dist.is_main and cfg.logging.progress))  # fmt: skip
    result, t_last, signum = None, time.perf_counter(), 0

    # ------------------------------------------------------------------------------------------------ training loop
    while state.step < cfg.max_steps:
        model.train()
        for micro in range(cfg.train.grad_accum):
            inputs, meta = next(batches)  # meta: BatchMeta, never passed to the model
            stream.consumed(meta)
            n_input = input_tokens(inputs)  # counted on the loader's CPU tensors: no device sync
            inputs = {k: v.to(dist.device, non_blocking=True) for k, v in inputs.items()}
            labels = inputs.pop("labels")
            n_tokens = meta.label_tokens.sum().clamp(min=1)
            mixer.before_forward(meta)
            with dist.no_sync(ddp_model, sync=micro == cfg.train.grad_accum - 1), autocast:
                logits = ddp_model(**inputs).logits
                token_loss = causal_lm_token_loss(logits, labels)  # (B, T): the one cross-entropy of the step
                loss = token_loss.sum() / n_tokens.to(token_loss.device, non_blocking=True)  # mean over label tokens
            mixer.watch_loss(loss, n_tokens)
            scaler.scale(loss / cfg.train.grad_accum).backward()
            token_loss = token_loss.detach()
            state.window.add(token_loss.sum(1), meta.label_tokens, meta.domain_ids, n_input)
            # ODM's reward, DoReMi's excess loss: from the loss this step computed
            mixer.observe({**inputs, "labels": labels}, meta, token_loss.sum(1), meta.label_tokens, token_loss[:, :-1])
        paths.settle(dist)  # FSDP: no image on any rank this step → no vision-side update (as under DDP)
        status = optimizer_step(optimizer, scheduler, scaler, params, cfg.optim.max_grad_norm)  # ok|overflow|nonfinite
        state.step += 1
        state.window.steps += 1
        progress.update(1)
        state.guard.after_step(state.step, status)  # a non-finite step was skipped; too many in a row stop the run

        # -------------------------------------------------------------------------------------------------------- mix
        info = mixer.step(state.step, ctx, skipped=status != "ok")  # R&B: at a window's end, G → p; peers: their rule
        if info is not None:
            metrics.log(mixer.log_kind, state.step, **info)

        # ----------------------------------------------------------------------------------------------------- log
        if state.step % cfg.train.log_every == 0 or state.step == cfg.max_steps:
            row, now = state.window.pop(dist), time.perf_counter()
            row.update(lr=scheduler.get_last_lr()[0], p=schedule.current(), step_time=(now - t_last) / max(1, row.pop("steps")))  # fmt: skip
            row.update(stream.pop_counts())
            t_last = now
            metrics.log("train", state.step, **row)
            progress.set_postfix(_postfix(row, schedule.current()))

        # ---------------------------------------------------------------------------------------------------- eval
        if (cfg.eval.every and state.step % cfg.eval.every == 0) or state.step == cfg.max_steps:
            result = evaluate_domains(model, domains, collator, cfg.eval, dist, target=target)
            state.eval_loss[state.step] = result["loss"]  # for train.save_total_limit's best checkpoint
            metrics.log("eval", state.step, **result)
            if dist.is_main:
                progress.write(format_eval(state.step, names, result))
            _generate(model, domains, collator, cfg.eval, dist, run_dir, state.step, metrics)  # eval.generate

        # ---------------------------------------------------------------------------------------------- checkpoint
        signum = stop.poll(dist) if state.step < cfg.max_steps else 0  # SIGTERM & co: every rank stops at this step
        if (cfg.train.save_every and state.step % cfg.train.save_every == 0) or state.step == cfg.max_steps or signum:
            ckpt.save(run_dir, state)
        if signum:
            break

    # ------------------------------------------------------------------------------------------------------------ end
    progress.close()
    metrics.close()
    if dist.is_main and cfg.logging.plots and not signum:  # a preempted run leaves its grace period to the save
        log.info("plots: %s", ", ".join(str(p) for p in plot_run(run_dir, names)))
    if result is None and not signum:  # resumed a run that had already reached max_steps
        result = evaluate_domains(model, domains, collator, cfg.eval, dist, target=target)
    summary = _summary(result, state, run_dir)
    mixer.close()
    del ddp_model, model, optimizer, state
    dist.close()
    if dist.is_main:
        runlock.release(run_dir)
    if signum:
        raise Preempted(signum, summary["step"], f"checkpoint-{summary['step']}")
    return summary


def _generate(model, domains, collator, eval_cfg, dist, run_dir: Path, step: int, metrics) -> None:
    """`eval.generate`: what the model answers, into samples.jsonl (a sharded model generates on every rank, since
    each of its forwards is collective; rank 0 writes)."""
    if dist.is_main or dist.sharded:
        generated = generate_samples(model, domains, collator, eval_cfg.generate, eval_cfg.max_new_tokens)
        if dist.is_main:
            write_samples(run_dir, step, generated, metrics)


def _mixture(cfg: RunConfig):
    """The manifest's domains, the initial proportions, and the ProportionSchedule that carries p over optimizer
    steps to the loader (in shared memory, with room for a peer mixer that updates every step)."""
    domains = load_domains(cfg.manifest)
    p0 = initial_proportions(cfg.mixing.strategy, domains, cfg.mixing.weights)
    lag = loader_lag(cfg.data.num_workers, cfg.data.prefetch_factor, cfg.train.grad_accum)
    schedule = ProportionSchedule(len(domains), initial=p0, lag=lag, capacity=max(4096, cfg.max_steps + 1))
    return domains, p0, schedule


def _stream(domains, schedule: ProportionSchedule, collator: Encoder, cfg: RunConfig, dist: Distributed):
    """This rank's MixtureStream over the manifest's domains, drawn by the schedule's p."""
    return MixtureStream(
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


def _loader(stream: MixtureStream, cfg: RunConfig, dist: Distributed) -> DataLoader:
    """The stream's DataLoader: the stream batches itself; workers leave SIGINT / SIGUSR1 to the training process."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
        pin_memory=dist.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed + dist.rank),  # leaves the global RNG (dropout) alone
        worker_init_fn=ignore_stop_signals,  # a signal is the training process's to handle (rbvl/train/guard.py)
    )


def _stop_workers(batches) -> None:
    """Shut the DataLoader's workers down now. At interpreter exit the loader skips its own shutdown and
    multiprocessing sends the workers a SIGTERM, which they ignore once (rbvl/train/guard.py): the exit would wait."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # only the multi-process iterator has workers
    if shutdown is not None:
        shutdown()


def _postfix(row: dict, p) -> dict:
    """The progress bar's loss and p, and the samples truncated or dropped since the last log line, when any."""
    shown = {"loss": f"{row['loss']:.3f}", "p": " ".join(f"{x:.2f}" for x in p)}
    shown.update({key: row[key] for key in ("truncated", "dropped") if row.get(key)})
    return shown


def _summary(result: dict | None, state: ckpt.TrainState, run_dir: Path) -> dict:
    """What `train` returns: the final eval, p over the run, and this rank's training work."""
    tokens = state.window.input_tokens
    return {
        "eval": result,
        "proportions": state.schedule.history(),
        "run_dir": str(run_dir),
        "step": state.step,
        "cost": state.mixer.cost,
        "samples": dict(state.stream.totals),  # this rank, this session: drawn, truncated, dropped
        # this rank's training work in the mixers' terms (forward + 2 · backward, 2 · parameters FLOPs per token)
        "train_tokens": tokens,
        "train_flops": 3 * 2.0 * sum(p.numel() for p in state.model.parameters()) * tokens,
    }
