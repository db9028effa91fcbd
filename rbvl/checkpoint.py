"""Checkpoints: written atomically (a temp folder, then one rename), resumed exactly.

RUN_DIR/checkpoint-N/
    adapter_config.json, adapter_model.safetensors   PEFT adapter (projector included via modules_to_save)
    processor / tokenizer files                      so the adapter loads and generates on its own
    config.yaml                                      the resolved run config
    trainer_state.pt                                 trainable weights, optimizer, scheduler, step, RNG, tracker
    rbvl_state.json                                  stream state (cursors, schedule) and Balance state (p history)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from rbvl.config import dump_config

STATE = "trainer_state.pt"
RBVL_STATE = "rbvl_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message says which and why."""


def latest(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    found = [(s, p) for s, p in found if (p / STATE).exists()]
    return max(found)[1] if found else None


def save(run_dir, step, cfg, model, processor, optimizer, scheduler, stream, tracker, balancer, dist) -> Path | None:
    """Rank 0 writes `run_dir/checkpoint-{step}`; every rank waits until it is complete."""
    final = Path(run_dir) / f"checkpoint-{step}"
    if tracker is not None:
        # Fold every rank's part of the current window into rank 0, the one that writes it; the others restart at
        # zero, so the next all-reduce still sums each sample once.
        tracker.sync()
        if not dist.is_main:
            tracker.reset()
    if dist.is_main:
        tmp = Path(run_dir) / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        dump_config(cfg, tmp / "config.yaml")
        torch.save(
            {
                "step": step,
                "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "tracker": tracker.state_dict() if tracker is not None else {},
            },
            tmp / STATE,
        )
        state = {
            "step": step,
            "world_size": dist.world_size,
            "stream": stream.state_dict(),
            "balance": balancer.state_dict(),
        }
        (tmp / RBVL_STATE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load(path, model, optimizer, scheduler, stream, tracker, balancer, dist) -> dict:
    """Restore everything `save` wrote into live objects; returns the saved state (with its `step`)."""
    path = Path(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        extra = json.loads((path / RBVL_STATE).read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if extra["world_size"] != dist.world_size:
        raise CheckpointError(
            f"{path} was written by {extra['world_size']} rank(s), this run has {dist.world_size}: "
            "an exact resume needs the same world size"
        )
    named = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) ^ {n for n, p in named.items() if p.requires_grad})
    if missing:
        raise CheckpointError(f"{path} does not match this model's trainable parameters (e.g. {missing[0]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if tracker is not None and state["tracker"] and dist.is_main:
        tracker.load_state_dict(state["tracker"])  # rank 0 holds the whole window (see `save`)
    stream.load_state_dict(extra["stream"])
    balancer.load_state_dict(extra["balance"])
    return {"step": state["step"], **extra}
