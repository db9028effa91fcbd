"""Merge a LoRA checkpoint into its base model and save a standalone model + processor.

rbvl export runs/demo_tiny_rnb/checkpoint-300 --merge exported/demo   # or the run folder: its newest checkpoint
# then, without rbvl or PEFT:
AutoModelForImageTextToText.from_pretrained("exported/demo"); AutoProcessor.from_pretrained("exported/demo")

The adapter file is checked before the base model loads (a truncated or damaged file is one line naming it), and the
merged model is written into a temporary folder beside OUT that becomes OUT only when complete: a full disk or a
read-only folder leaves no partial OUT behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rbvl.runtime import fsfault
from rbvl.train.checkpoint import CheckpointError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def export_merged(checkpoint: str | Path, out: str | Path) -> Path:
    """PEFT's `merge_and_unload` folds the adapters (and the modules_to_save copies) into the base weights. A run
    folder exports its newest checkpoint; a full fine-tune's checkpoint (no adapter) is copied as it is.

    Raises:
        CheckpointError: neither an adapter nor a model (nor a checkpoint-N), a damaged adapter file, or an OUT that
            is not empty.
        OSError: a file-system fault while writing (its file name says where); no partial OUT is left.
    """
    from rbvl.config import load_config
    from rbvl.model import load_model
    from rbvl.model.load import load_adapter
    from rbvl.train import checkpoint as ckpt

    checkpoint, out = Path(checkpoint), Path(out)
    weights = [*checkpoint.glob("model*.safetensors"), *checkpoint.glob("pytorch_model*.bin")]
    full = (checkpoint / "config.json").exists() and bool(weights)
    if not (checkpoint / "adapter_config.json").exists() and not full:
        newest = ckpt.latest(checkpoint)  # a run folder: its newest checkpoint, as `rbvl eval RUN_DIR` takes
        if newest is None:
            raise CheckpointError(
                f"{checkpoint} holds no LoRA adapter (adapter_config.json) nor a model, and no checkpoint-N; is it "
                f"RUN_DIR or RUN_DIR/checkpoint-N?"
            )
        print(f"rbvl export: {checkpoint} is a run folder: exporting its newest checkpoint, {newest.name}")
        return export_merged(newest, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} exists and is not empty: export into a new or empty folder (nothing is overwritten)"
        )
    if not (checkpoint / "adapter_config.json").exists():  # lora.enabled=false: the model itself, nothing to merge
        return _write_out(out, lambda tmp: _copy_model(checkpoint, tmp))
    adapter = check_adapter(checkpoint)
    cfg = load_config(checkpoint / "config.yaml")
    base, processor = load_model(cfg.model, seed=cfg.seed)
    try:
        model = load_adapter(base, checkpoint)
    except Exception as e:  # noqa: BLE001 - safetensors, torch and PEFT raise several types for a bad adapter
        raise CheckpointError(f"{adapter}: cannot load the adapter: {_short(e)}") from None
    merged = model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _write_out(out, write)


def _copy_model(checkpoint: Path, tmp: Path) -> None:
    """A full fine-tune's checkpoint is a transformers folder already: its files, without rbvl's own (the run's
    config.yaml, the trainer and rank states)."""
    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and f.name not in ("config.yaml", "rbvl_state.json") and f.suffix != ".pt":
            shutil.copy2(f, tmp / f.name)


def _write_out(out: Path, write) -> Path:
    """`write(tmp)` into a temporary folder beside OUT, which becomes OUT only when complete."""
    tmp = out.parent / f".{out.name}.tmp-export"
    try:
        with fsfault.writing(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write(tmp)
        with fsfault.writing(out):
            if out.is_dir():
                out.rmdir()  # empty (checked above): the finished folder takes its place
            tmp.rename(out)
    except OSError as e:
        if not fsfault.is_fault(e):
            raise
        raise CheckpointError(f"--merge {out}: {fsfault.describe(e)}") from None  # the folder asked for, and the file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face Hub as `repo_id` (created when missing); returns its URL.

    Uses the token `huggingface-cli login` stored (or HF_TOKEN). The merged model is a plain transformers folder, so
    `from_pretrained(repo_id)` loads it without rbvl."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message="Upload a model fine-tuned with rbvl (LoRA merged)")  # fmt: skip
    return str(url)


def check_adapter(checkpoint: Path) -> Path:
    """The checkpoint's adapter weights file, checked to be complete (CheckpointError naming it otherwise)."""
    found = next((checkpoint / n for n in ADAPTER_FILES if (checkpoint / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{checkpoint} has adapter_config.json but no {' or '.join(ADAPTER_FILES)}")
    if found.suffix != ".safetensors":
        return found
    from safetensors import safe_open

    try:
        with safe_open(str(found), framework="pt") as f:  # the header, and the file long enough for it
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise CheckpointError(
            f"{found}: damaged or truncated adapter file ({_short(e)}); export an earlier checkpoint"
        ) from None
    return found


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
