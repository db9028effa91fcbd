"""What `rbvl validate` checks beyond the values themselves, offline and without torch: does the manifest read and
do its shards exist, does `model.name` resolve to something this machine has, and would `output_dir` be refused?

    problems = offline_problems(cfg)     # [] when `rbvl train` would find both
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

# The tiny offline models (rbvl/model/tiny.py builds them; rbvl/model/families.py checks this list against its table).
TINY_MODELS = (
    "tiny-gemma3", "tiny-idefics3", "tiny-internvl", "tiny-llama", "tiny-llava", "tiny-llava-next",
    "tiny-llava-onevision", "tiny-mllama", "tiny-paligemma", "tiny-phi3", "tiny-qwen2", "tiny-qwen2-vl",
    "tiny-qwen2.5-vl", "tiny-qwen3", "tiny-qwen3-vl",
)  # fmt: skip


def model_name_problem(value: str) -> str | None:
    """A hub id, a folder, or one of the tiny models: a `tiny-` name that is neither a tiny model nor a folder is a
    typo, caught here (offline, before any model code runs)."""
    if not str(value).strip():
        return "expected a non-empty string"
    if str(value).startswith("tiny-") and value not in TINY_MODELS and not Path(value).expanduser().exists():
        near = difflib.get_close_matches(str(value), TINY_MODELS, n=1)
        return "no such tiny model" + (f"; did you mean {near[0]}?" if near else f" ({', '.join(TINY_MODELS)})")
    return None


def offline_problems(cfg) -> list[str]:
    """One line per thing `rbvl train` would not find or would refuse: the manifest or its shards, the model, an
    output_dir that holds a run without resume."""
    problems = []
    if cfg.manifest:
        problems += _manifest_problems(cfg.manifest, cfg.mixing)
    problem = model_problem(cfg.model.name)
    if problem:
        problems.append(problem)
    problem = run_problem(cfg)
    if problem:
        problems.append(problem)
    return problems


def run_problem(cfg) -> str | None:
    """The line `rbvl train` would stop with when output_dir already holds a run (a checkpoint-N folder with its
    trainer state, as rbvl.train.checkpoint.latest counts them) and resume is not asked for; else None."""
    out = Path(cfg.output_dir)
    if cfg.resume or not out.is_dir():
        return None
    if not any(out.glob("checkpoint-*/trainer_state.pt")):
        return None
    return f"output_dir={out} already holds a run; pass resume=true, or choose another output_dir"


def _manifest_problems(path: str, mixing=None) -> list[str]:
    from rbvl import manifest as manifest_file

    try:
        manifest = manifest_file.read(path)
    except manifest_file.ManifestError as e:
        return [f"manifest={path}: {e}"]
    names = [str(c.get("name")) for c in manifest["clusters"]]
    if mixing is not None and mixing.strategy == "manual":  # as rbvl.mixing.static reads them: a name or an index
        unknown = [str(k) for k in mixing.weights or {} if str(k) not in names and not _index_of(str(k), names)]
        if unknown:  # the words rbvl train stops with
            return [f"mixing.weights names unknown domain '{unknown[0]}' (domains: {', '.join(names)})"]
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    listed = [f for c in manifest["clusters"] for f in [*c.get("train_shards", []), *c.get("eval_shards", [])]]
    missing = [f for f in listed if not (root / f).is_file()]
    if missing:
        return [f"manifest={path}: {len(missing)} of its {len(listed)} shards are missing (e.g. {root / missing[0]})"]
    return []


def _index_of(key: str, names: list[str]) -> bool:
    return key.isdigit() and int(key) < len(names)


def model_problem(name: str) -> str | None:
    """None when `name` is a tiny model, a folder with a config.json, or a hub id in the local Hugging Face cache
    (or one that may be downloaded: HF_HUB_OFFLINE unset); else the line saying what is wrong."""
    if name in TINY_MODELS:
        return None
    if name.startswith("tiny-") and not Path(name).expanduser().exists():  # a folder may be called tiny-…
        near = difflib.get_close_matches(name, TINY_MODELS, n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; the tiny models: {', '.join(TINY_MODELS)}"
        return f"model.name={name}: no such tiny model{hint}"
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.exists():
            return f"model.name={name}: no such folder (a save_pretrained folder or a hub id is expected)"
        if path.is_file():
            gguf = " (a GGUF file: convert it to a transformers folder first)" if path.suffix == ".gguf" else ""
            return f"model.name={name}: a file, not a save_pretrained folder{gguf}"
        if not (path / "config.json").is_file():
            return f"model.name={name}: the folder holds no config.json (a save_pretrained folder is expected)"
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"model.name={name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (download it first, or name a local folder)"  # fmt: skip
    return None  # not cached, but the hub is allowed: `rbvl train` downloads it


CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"  # offline configs of the recipes' hub models


def model_type(name: str) -> str | None:
    """The model_type of `name` where it is known without loading anything: a tiny model (`tiny-qwen2.5-vl`:
    qwen2_5_vl), a folder's config.json, or a config rbvl ships for a recipe's hub model; else None."""
    if name.startswith("tiny-"):
        return name.removeprefix("tiny-").replace("-", "_").replace(".", "_")
    for config in (Path(name).expanduser() / "config.json", CONFIGS / f"{name.replace('/', '--')}.json"):
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
    return None
