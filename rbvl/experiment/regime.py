"""The regime a report states: what its runs fine-tuned and how, from a results row alone."""

from __future__ import annotations


def regime(row: dict) -> str | None:
    """One sentence on what a run fine-tuned and how, from its row's resolved config (and its base's base.json)."""
    cfg, base = row.get("config") or {}, row.get("base")
    model, lora = cfg.get("model") or {}, cfg.get("lora") or {}
    if not model:
        return None
    name = model.get("name", "?")
    if base:
        start = (f"a pretrained base ({name}: {base.get('from', '?')}, {base.get('steps', '?')} steps of "
                 f"{base.get('batch_size', '?')} on {len(base.get('families') or [])} reasoning-gym families that no "
                 f"setting uses, eval loss {_fmt(base.get('eval_loss'))})")  # fmt: skip
    elif name.startswith("tiny-"):
        seed = model.get("init_seed", "?")
        seed = "= each run's seed" if isinstance(seed, int) and seed < 0 else seed  # -1: every seed its own base
        start = f"{name} from random weights (init_seed {seed})"
    else:
        start = name
    if lora.get("enabled", True):
        full = ", ".join(lora.get("modules_to_save") or []) or "nothing else"
        how = f"LoRA r = {lora.get('r', '?')} on the language model, trained in full: {full}"
    else:
        how = "every weight trained"
    train = cfg.get("train") or {}
    return f"{start}; {how}; {cfg.get('max_steps', '?')} steps of {train.get('batch_size', '?')}."


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"
