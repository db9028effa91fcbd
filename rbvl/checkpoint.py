"""Checkpoints: written atomically (a temp folder, then one rename), resumed exactly.

RUN_DIR/checkpoint-N/
    adapter_config.json, adapter_model.safetensors   PEFT adapter (projector included via modules_to_save)
    processor / tokenizer files                      so the adapter loads and generates on its own
    config.yaml                                      the resolved run config
    trainer_state.pt                                 trainable weights, optimizer, scheduler, step
    rbvl_state.json                                  Balance state (the p schedule), step, world size
    rank-000.pt, rank-001.pt ...                     per rank: RNG, stream readers + cursors, Balance window part,
                                                     per-domain loss stats since the last log line
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


def save(
    run_dir, step, cfg, model, processor, optimizer, scheduler, stream, tracker, balancer, window, dist,
    mixer=None, held_out=None,
) -> Path:  # fmt: skip
    """Write `run_dir/checkpoint-{step}`: rank 0 the shared state, every rank its own; then one atomic rename.

    What differs between ranks (RNG, the stream's readers and cursors, the tracker's part of the Balance window,
    the per-domain loss stats since the last log line) goes into `rank-NNN.pt`, one per rank, so a resume under
    torchrun restores each rank exactly. The folder appears under its final name only once every file is in it.
    """
    final = Path(run_dir) / f"checkpoint-{step}"
    tmp = Path(run_dir) / f".tmp-checkpoint-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(
        {
            "rank": dist.rank,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None,
            "stream": stream.state_dict(),
            "tracker": tracker.state_dict() if tracker is not None else {},
            "window": window.state_dict(),
            "mixer": mixer.state_dict() if mixer is not None else {},
            "held_out": held_out.state_dict() if held_out is not None else {},
        },
        tmp / RANK_STATE.format(dist.rank),
    )
    dist.barrier()
    if dist.is_main:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        dump_config(cfg, tmp / "config.yaml")
        torch.save(
            {
                "step": step,
                "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            tmp / STATE,
        )
        state = {"step": step, "world_size": dist.world_size, "balance": balancer.state_dict()}
        (tmp / RBVL_STATE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load(path, model, optimizer, scheduler, stream, tracker, balancer, window, dist, mixer=None, held_out=None) -> dict:
    """Restore everything `save` wrote into live objects, each rank its own part; returns the saved state."""
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
    rank_file = path / RANK_STATE.format(dist.rank)
    try:
        mine = torch.load(rank_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read this rank's state {rank_file}: {e}") from None
    named = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) ^ {n for n, p in named.items() if p.requires_grad})
    if missing:
        raise CheckpointError(f"{path} does not match this model's trainable parameters (e.g. {missing[0]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"], dist.device)
    if tracker is not None:
        if not mine["tracker"]:
            raise CheckpointError(f"{path} holds no Balance window (was it written with mixing.strategy=rnb?)")
        tracker.load_state_dict(mine["tracker"])
    stream.load_state_dict(mine["stream"])
    window.load_state_dict(mine["window"])
    if mixer is not None:
        mixer.load_state_dict(mine["mixer"])
    if held_out is not None:
        held_out.load_state_dict(mine["held_out"])
    balancer.load_state_dict(extra["balance"])
    return {"step": state["step"], **extra}
