"""One training run: the loop, its state and checkpoints, the optimizer side of a step, and what the run writes.

    from rbvl.train import train
    summary = train(load_config("recipes/demo_tiny_rnb.yaml", ["max_steps=20", "balance.update_every=5", "balance.warmup_steps=0"]))

- loop.py        `train(cfg)`: the training loop, top to bottom (config → data → model → steps)
- checkpoint.py  TrainState (what a checkpoint holds), atomic save, exact resume, `open_run`
- optim.py       AdamW, warmup + cosine lr, autocast, clipping and the fp16 overflow check
- metrics.py     metrics.jsonl + TensorBoard, per-domain train loss between log lines
- plots.py       the run's PNGs (proportions, eval loss, Gram matrix)

`train` is imported when first used, so the light modules here (metrics, checkpoint) load without the loop and
everything it imports (rbvl.mixing, rbvl.evaluate and rbvl.mixing.context import them).
"""

from __future__ import annotations

__all__ = ["train"]


def __getattr__(name: str):
    if name == "train":
        from rbvl.train.loop import train

        return train
    raise AttributeError(f"module 'rbvl.train' has no attribute {name!r}")
