"""Checkpoints: written atomically (a temp folder, then one rename), resumed exactly.

RUN_DIR/checkpoint-N/
    adapter_config.json, adapter_model.safetensors   PEFT adapter (projector included via modules_to_save)
    processor / tokenizer files                      so the adapter loads and generates on its own
    config.yaml                                      the resolved run config
    trainer_state.pt                                 trainable weights, optimizer, scheduler, step (whole tensors:
                                                     under train.parallel=fsdp the ranks all-gather the trainable
                                                     shards and their optimizer state first, so the layout is DDP's)
    rbvl_state.json                                  the p schedule (under "balance"), step, world size, the run's
                                                     fingerprint (manifest hash, data / mixing / balance keys)
    rank-000.pt, rank-001.pt ...                     per rank: RNG, stream readers + cursors, the mixer's state (R&B:
                                                     its part of the Balance window), held-out draws, per-domain loss
                                                     stats since the last log line

A TrainState holds the live objects all of that comes from, so `save(run_dir, state)` / `load(path, state)` take one
object; `open_run` decides at the start whether a run resumes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rbvl.config import dump_config
from rbvl.config.engine import to_dict
from rbvl.runtime import fsfault, runlock
from rbvl.runtime.sharding import full_optimizer_state, gather_full, load_full, load_full_optimizer_state, reshard

log = logging.getLogger(__name__)

STATE = "trainer_state.pt"
RBVL_STATE = "rbvl_state.json"
RANK_STATE = "rank-{:03d}.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message says which and why."""


def latest(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    found = [(s, p) for s, p in found if (p / STATE).exists()]
    return max(found)[1] if found else None


@dataclass
class TrainState:
    """What a checkpoint holds: the run's live objects, and the optimizer step they have reached."""

    cfg: Any
    model: Any
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: Any  # MixtureStream: per-domain readers and cursors
    schedule: Any  # ProportionSchedule: p over optimizer steps
    mixer: Any  # rbvl.mixing.Mixer
    held_out: Any  # HeldOut: the mixers' own draws
    window: Any  # WindowStats: per-domain loss since the last log line
    dist: Any
    guard: Any = None  # DivergenceGuard: non-finite steps in a row, so a resume keeps counting
    step: int = 0
    eval_loss: dict = field(default_factory=dict)  # step → the mixture eval loss there (train.save_total_limit)


def open_run(cfg, dist) -> Path | None:
    """Claim `cfg.output_dir` for this run (a lock, its config.yaml); the checkpoint to resume from, or None.

    A folder that already holds a checkpoint is refused unless `resume=true`."""
    run_dir = Path(cfg.output_dir)
    try:
        return _claim(cfg, dist, run_dir)
    except OSError as e:
        if not fsfault.is_fault(e):
            raise
        raise CheckpointError(f"output_dir={run_dir}: {fsfault.describe(e)}") from None


def _claim(cfg, dist, run_dir: Path) -> Path | None:
    refused = None
    if dist.is_main:  # one run per output_dir: a second one is refused while this one lives (released at exit)
        try:
            runlock.acquire(run_dir, "rbvl train")
        except Exception as e:  # noqa: BLE001 - the other ranks learn of any failure here, then it is raised
            refused = e
    if dist.enabled:  # every rank stops for rank 0's reason, not for one of its own (a locked folder holds a run)
        reason = dist.all_gather_object(None if refused is None else str(refused))[0]
        if reason is not None and refused is None:
            refused = runlock.LockError(reason)
    if refused is not None:
        raise refused
    found = latest(run_dir)
    if cfg.resume and found is None:
        log.warning("resume=true but %s holds no checkpoint: starting from scratch", run_dir)
    if not cfg.resume and found is not None:
        raise CheckpointError(f"{run_dir} already holds a run; pass resume=true, or choose another output_dir")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (cfg.resume and found is not None and (run_dir / "config.yaml").exists()):
            dump_config(cfg, run_dir / "config.yaml")  # a resume writes its own beside it, once `load` accepts it
    return found if cfg.resume else None


# what decides which samples a run draws and how p moves: a resume that changes them is not the same run
SAME_RUN_KEYS = ("seed", "train.batch_size", "train.grad_accum")
LAYOUT_KEYS = ("data.num_workers",)  # the stream's saved position is per loader worker: not even resume=force
SAME_RUN_SECTIONS = ("data.", "mixing.", "balance.")


def fingerprint(cfg) -> dict:
    """The manifest's content hash and the values of SAME_RUN_KEYS and SAME_RUN_SECTIONS' keys (rbvl_state.json)."""
    flat = _flatten(to_dict(cfg))
    keys = {k: v for k, v in flat.items() if k in SAME_RUN_KEYS or k.startswith(SAME_RUN_SECTIONS)}
    try:
        manifest = hashlib.sha256(Path(cfg.manifest).read_bytes()).hexdigest()
    except OSError:
        manifest = None
    return {"manifest": manifest, "keys": keys}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not (prefix + k).endswith("weights"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_run(path: Path, saved: dict, cfg, n_domains: int) -> None:
    """Refuse a resume onto other domains (always) or with another manifest or other SAME_RUN_KEYS (unless
    `resume=force`), in one line that lists what changed. Checkpoints older than the fingerprint skip the second."""
    table = saved.get("balance", {}).get("schedule", {}).get("p") or [[]]
    if len(table[0]) not in (0, n_domains):
        raise CheckpointError(
            f"{path} was trained on {len(table[0])} domains, manifest={cfg.manifest} has {n_domains}: resume with "
            "the manifest it was trained on, or start a new run in another output_dir"
        )
    before = saved.get("fingerprint")
    if before is None or cfg.resume == "force":
        return
    now, was = fingerprint(cfg), before["keys"]
    changed = [f"{k} {was[k]!r} → {v!r}" for k, v in now["keys"].items() if k in was and was[k] != v]
    # a key newer than the checkpoint: the run it resumes had the key's default, whatever its rbvl called it
    changed += [
        f"{k} (new since this checkpoint; default {d!r}) → {v!r}"
        for k, v in now["keys"].items()
        if k not in was and (d := _default_of(cfg, k)) != v
    ]
    if before["manifest"] != now["manifest"]:
        changed.insert(0, f"manifest={cfg.manifest} (other content)")
    if changed:
        layout = [k for k in LAYOUT_KEYS if any(c.startswith(f"{k} ") for c in changed)]
        way = "resume with the same settings"
        if layout:  # the stream resumes per loader worker: force cannot help here
            way += f" ({', '.join(layout)} cannot change on a resume: the data stream resumes loader by loader)"
        if len(layout) < len(changed):
            way += ", or pass resume=force to resume anyway" + (" with the others" if layout else "")
        raise CheckpointError(f"{path} was written by another run: {'; '.join(changed)}; {way}")


def _default_of(cfg, key: str):
    """The schema's default for a dotted config key ("balance.pull"), or a marker no value equals."""
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part, None)
    for f in dataclasses.fields(node) if dataclasses.is_dataclass(node) else ():
        if f.name == name:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return _NO_DEFAULT


_NO_DEFAULT = object()


def save(run_dir: str | Path, state: TrainState) -> Path:
    """Write `run_dir/checkpoint-{step}`: rank 0 the shared state, every rank its own; then one atomic rename.

    What differs between ranks (RNG, the stream's readers and cursors, the mixer's part of the window, the held-out
    draws, the per-domain loss stats since the last log line) goes into `rank-NNN.pt`, one per rank, so a resume under
    torchrun restores each rank exactly. The folder appears under its final name only once every file is in it.
    """
    dist, step = state.dist, state.step
    # whole tensors (under FSDP every rank all-gathers its shards here: LoRA and the projector are small)
    reshard(state.model)
    trainable = gather_full((n, p) for n, p in state.model.named_parameters() if p.requires_grad)
    bad = [n for n, p in trainable.items() if not bool(torch.isfinite(p.detach()).all())]  # every rank alike
    if bad:  # the optimizer skips non-finite steps, so this is a bug's mark: never let it reach a checkpoint
        raise CheckpointError(
            f"refusing to write checkpoint-{step}: {len(bad)} trainable tensors hold NaN or inf "
            f"(e.g. {bad[0]}); the previous checkpoint is untouched"
        )
    final = Path(run_dir) / f"checkpoint-{step}"
    tmp = Path(run_dir) / f".tmp-checkpoint-{step}"
    try:
        with fsfault.writing(tmp):
            _write(tmp, final, state, trainable)
    except (OSError, RuntimeError) as e:
        fault = _as_fault(e, tmp)
        if fault is None:
            raise
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; the previous checkpoint is untouched
        raise CheckpointError(
            f"cannot write checkpoint-{step}: {fsfault.describe(fault)}; the previous checkpoint is untouched "
            "(free some space, or set output_dir to a writable folder, and resume with resume=true)"
        ) from None
    return final


def _write(tmp: Path, final: Path, state: TrainState, trainable: dict) -> None:
    """The files of one checkpoint into `tmp`, each rank its own, then one rename to `final` (rank 0)."""
    dist, step = state.dist, state.step
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    optimizer_state = full_optimizer_state(state.optimizer)  # whole tensors whatever the sharding (collective)
    # PEFT saves the adapter from the trainable tensors; a model without LoRA saves all of its weights (under FSDP
    # gathered whole on every rank first: full fine-tuning of a model that large is not what fsdp is for here)
    peft = hasattr(state.model, "peft_config")
    weights = (
        trainable
        if peft
        else gather_full(state.model.state_dict().items())
        if getattr(dist, "sharded", False)
        else None
    )
    mixer_state = dict(state.mixer.state_dict())
    torch.save(
        {
            "rank": dist.rank,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None,
            "stream": state.stream.state_dict(),
            "window": state.window.state_dict(),
            "tracker": mixer_state.pop("tracker", {}),  # R&B's Balance window keeps its own key (the 0.3 layout)
            "mixer": mixer_state,
            "held_out": state.held_out.state_dict() if state.held_out is not None else {},
        },
        tmp / RANK_STATE.format(dist.rank),
    )
    dist.barrier()
    if dist.is_main:
        state.model.save_pretrained(tmp, state_dict=weights)  # PEFT keeps the adapter's and modules_to_save's keys
        state.processor.save_pretrained(tmp)
        dump_config(state.cfg, tmp / "config.yaml")
        torch.save(
            {
                "step": step,
                "trainable": trainable,
                "optimizer": optimizer_state,
                "scheduler": state.scheduler.state_dict(),
            },
            tmp / STATE,
        )
        shared = {
            "step": step,
            "world_size": dist.world_size,
            "balance": {"schedule": state.schedule.state_dict()},
            "fingerprint": fingerprint(state.cfg),
            "nonfinite_in_a_row": state.guard.in_a_row if state.guard is not None else 0,
            "eval_loss": state.eval_loss.get(step),  # the mixture eval loss at this step, when it was evaluated
        }
        (tmp / RBVL_STATE).write_text(json.dumps(shared, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if state.cfg.train.save_total_limit:
            prune(final.parent, state.cfg.train.save_total_limit)
    dist.barrier()


def prune(run_dir: Path, limit: int) -> list[Path]:
    """Delete checkpoints beyond the newest `limit`, keeping the one with the best eval loss too; returns those
    deleted. A checkpoint without an eval loss (saved between evals) cannot be the best."""
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    losses = {}
    for step, path in found:
        try:
            loss = json.loads((path / RBVL_STATE).read_text()).get("eval_loss")
        except (OSError, ValueError):
            loss = None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses[step] = loss
    keep = {step for step, _ in found[-limit:]}
    if losses:
        keep.add(min(losses, key=losses.get))
    gone = [path for step, path in found if step not in keep]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    if gone:
        log.info("train.save_total_limit=%d: removed %s", limit, ", ".join(p.name for p in gone))
    return gone


def _as_fault(e: BaseException, path: Path) -> OSError | None:
    """`e` as a file-system fault, or None. torch's zip writer reports a full disk as a RuntimeError ("unexpected
    pos ...", "failed writing file"): that one becomes ENOSPC when the disk is nearly full."""
    if fsfault.is_fault(e):
        return e
    if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "failed writing" in str(e)):
        try:
            free = shutil.disk_usage(path if path.exists() else path.parent).free
        except OSError:
            return None
        if free < 64 * 2**20:
            return OSError(errno.ENOSPC, "no space left on device", str(path))
    return None


def load(path: str | Path, state: TrainState) -> dict:
    """Restore everything `save` wrote into `state`'s live objects, each rank its own part; returns the saved
    rbvl_state.json (step, world size, schedule)."""
    path, dist = Path(path), state.dist
    try:
        saved = torch.load(path / STATE, map_location="cpu", weights_only=True)
        extra = json.loads((path / RBVL_STATE).read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if extra["world_size"] != dist.world_size:
        raise CheckpointError(
            f"{path} was written by {extra['world_size']} rank(s), this run has {dist.world_size}: "
            f"an exact resume needs the same world size (torchrun --nproc_per_node={extra['world_size']})"
        )
    check_same_run(path, extra, state.cfg, state.schedule.m)
    rank_file = path / RANK_STATE.format(dist.rank)
    try:
        mine = torch.load(rank_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read this rank's state {rank_file}: {e}") from None
    named = dict(state.model.named_parameters())
    missing = sorted(set(saved["trainable"]) ^ {n for n, p in named.items() if p.requires_grad})
    if missing:
        raise CheckpointError(f"{path} does not match this model's trainable parameters (e.g. {missing[0]})")
    for name, value in saved["trainable"].items():
        load_full(named[name], value)  # under FSDP each rank keeps its shard of the whole tensor
    load_full_optimizer_state(state.optimizer, saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"], dist.device)
    mixer_state = {**mine["mixer"], **({"tracker": mine["tracker"]} if mine.get("tracker") else {})}
    try:
        state.mixer.load_state_dict(mixer_state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state.stream.load_state_dict(mine["stream"])
    state.window.load_state_dict(mine["window"])
    if state.held_out is not None:
        state.held_out.load_state_dict(mine["held_out"])
    state.schedule.load_state_dict(extra["balance"]["schedule"])
    if state.guard is not None:
        state.guard.in_a_row = int(extra.get("nonfinite_in_a_row", 0))
    if dist.is_main:  # the first run's config.yaml stays; this run's settings go beside it
        dump_config(state.cfg, path.parent / f"config-resume-{int(saved['step'])}.yaml")
    state.step = int(saved["step"])
    return {"step": state.step, **extra}
