"""Any family's model: loading (hub id, local folder, tiny config), LoRA, the family table, tiny models, export.

    from rbvl.model import load_model, apply_lora
    model, processor = load_model(ModelConfig(name="tiny-qwen2-vl"))
    model = apply_lora(model, LoraConfig())   # adapters on the language model, projector trained in full

- load.py      `load_model`, `apply_lora`, `prepare_model` (what `rbvl train` does), `save_base`
- families.py  one table of per-family facts (LoRA targets, projector, head, placeholder, projector rows), and
               introspection for families the table does not name (`python -m rbvl.model.families` prints it)
- tiny.py      tiny offline models of every family (`tiny-<family>`), built from configs
- export.py    merge a LoRA checkpoint into a standalone model (`rbvl export`)
"""

from rbvl.model.load import (
    DTYPES,
    ModelError,
    apply_lora,
    is_tiny,
    load_model,
    prepare_model,
    save_base,
    trainable_summary,
    vision_tower,
)

__all__ = [
    "DTYPES",
    "ModelError",
    "apply_lora",
    "is_tiny",
    "load_model",
    "prepare_model",
    "save_base",
    "trainable_summary",
    "vision_tower",
]
