"""Merge a LoRA checkpoint into its base model and save a standalone model + processor.

rbvl export runs/demo_tiny_rnb/checkpoint-300 --merge exported/demo
# then, without rbvl or PEFT:
AutoModelForImageTextToText.from_pretrained("exported/demo"); AutoProcessor.from_pretrained("exported/demo")
"""

from __future__ import annotations

from pathlib import Path

from rbvl.train.checkpoint import CheckpointError


def export_merged(checkpoint: str | Path, out: str | Path) -> Path:
    """PEFT's `merge_and_unload` folds the adapters (and the modules_to_save copies) into the base weights."""
    from peft import PeftModel

    from rbvl.config import load_config
    from rbvl.model import load_model

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "adapter_config.json").exists():
        raise CheckpointError(f"{checkpoint} holds no LoRA adapter (adapter_config.json); is it RUN_DIR/checkpoint-N?")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty")
    cfg = load_config(checkpoint / "config.yaml")
    base, processor = load_model(cfg.model, seed=cfg.seed)
    model = PeftModel.from_pretrained(base, checkpoint)
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
