"""Build a model of any supported family and its processor, and put LoRA on its language model.

One path for every model: `load_model(cfg.model)` takes a hub id (`Qwen/Qwen2-VL-2B-Instruct`), a local
`save_pretrained` folder, or a tiny offline model (`tiny-llava`, `tiny-qwen2-vl`, ... see rbvl/model/tiny.py). The config's
`model_type` picks the family (rbvl/model/families.py): image-text-to-text families load with AutoModelForImageTextToText
and AutoProcessor, text-only causal LMs (Llama, Qwen2/2.5/3, Mistral) with AutoModelForCausalLM and AutoTokenizer.
Everything after that (LoRA, freezing, collate, saving) is the same for all of them.

    model, processor = load_model(ModelConfig(name="tiny-qwen2-vl"))
    model = apply_lora(model, LoraConfig())   # adapters on the language model, projector trained in full (family table)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rbvl.config import LoraConfig, ModelConfig
from rbvl.model import tiny
from rbvl.model.families import FamilyError, family_for, is_text_only_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
is_tiny = tiny.is_tiny


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_model(cfg: ModelConfig, seed: int = 0):
    """(model, processor) for `cfg.name`: a hub id, a local folder, or a tiny model (`tiny-<family>`).

    The processor of a text-only LM is its tokenizer. A tiny model's random weights come from `cfg.init_seed`, or
    from `seed` (the run's) when that is -1."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    kwargs = {"dtype": DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization:
        kwargs.update(quantization_kwargs(cfg))
    if is_tiny(cfg.name) and cfg.quantization:
        raise ModelError(
            f"model.quantization={cfg.quantization} loads a saved model through bitsandbytes; {cfg.name} is built from "
            "a config: save it first (rbvl.model.save_base) and set model.name to that folder"
        )
    if is_tiny(cfg.name):
        config, processor = tiny.build(cfg.name)
        auto = AutoModelForCausalLM if is_text_only_config(config) else AutoModelForImageTextToText
        with _seeded(seed if cfg.init_seed < 0 else cfg.init_seed):
            model = auto.from_config(config, **kwargs)
            tiny.AFTER_INIT.get(cfg.name, lambda model: None)(model)
    else:
        remote = {"trust_remote_code": cfg.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(cfg.name, **remote)
            text_only = is_text_only_config(config)
            auto = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
            processor = (AutoTokenizer if text_only else AutoProcessor).from_pretrained(cfg.name, **remote)
            model = auto.from_pretrained(cfg.name, **remote, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model '{cfg.name}': {str(e).splitlines()[0]}") from None
    if cfg.freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers' new name; the old one warns
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # a frozen base gives checkpointed blocks no input that needs grad
    return model, processor


def quantization_kwargs(cfg: ModelConfig) -> dict:
    """`from_pretrained` keywords of `model.quantization`: a BitsAndBytesConfig (4bit: NF4, double quantisation, bf16
    compute) and the process's GPU as the device map. One line when there is no CUDA GPU or no bitsandbytes."""
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes' k-bit kernels) and none is "
            "visible; set model.quantization=null to train unquantised"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model.quantization={cfg.quantization} needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    import os

    return {"quantization_config": bnb, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def prepare_model(cfg, run_dir: Path, rank: int = 0, device: torch.device | str = "cpu"):
    """`rbvl train`'s model: load it, put LoRA on it, move it to `device`; returns (model, processor).

    Adapters start the same on every rank (seeded by `cfg.seed`); dropout then differs between ranks, as their data
    does. A tiny model's base is saved into `run_dir/base_model` (by rank 0) and the adapter points at it, so the
    adapter reloads without rbvl."""
    model, processor = load_model(cfg.model, seed=cfg.seed)
    base = Path(run_dir) / "base_model"
    if is_tiny(cfg.model.name) and rank == 0:
        save_base(model, processor, base)
    try:
        family_for(model)  # worked out once, before LoRA wraps the layers introspection reads, and kept on the model
    except FamilyError as e:
        if cfg.lora.target_modules is None or cfg.lora.modules_to_save is None:
            raise ModelError(str(e)) from None
    if cfg.model.quantization:  # norms and head in fp32, input grads on: PEFT's QLoRA preparation
        from peft import prepare_model_for_kbit_training

        with quiet_peft():
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    torch.manual_seed(cfg.seed)
    model = apply_lora(model, cfg.lora)
    torch.manual_seed(cfg.seed + rank)
    if is_tiny(cfg.model.name) and hasattr(model, "peft_config"):
        model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    if not cfg.model.quantization:  # a quantised base was placed on this rank's GPU as it loaded
        model.to(device)
    log.info(trainable_summary(model))
    return model, processor


class ModelError(RuntimeError):
    """A model or processor that cannot be loaded; the message names it."""


def vision_tower(model: nn.Module) -> nn.Module:
    """The family's vision tower (an empty module for a text-only LM)."""
    try:
        name = family_for(model).vision
    except FamilyError:
        return nn.Module()
    for module_name, module in model.named_modules():
        if name and module_name.split(".")[-1] == name:
            return module
    return nn.Module()


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap `model` in a PEFT LoRA model; knobs map 1:1 onto `peft.LoraConfig`.

    `target_modules` / `modules_to_save` left None come from the model's family (rbvl/model/families.py): the language
    model's attention projections, and the projector."""
    from peft import LoraConfig as PeftLoraConfig

    if not cfg.enabled:
        return model
    target, save = cfg.target_modules, cfg.modules_to_save
    if target is None or save is None:
        try:
            fam = family_for(model)
        except FamilyError as e:
            raise ModelError(str(e)) from None
        target = fam.target_modules() if target is None else target
        save = fam.modules_to_save if save is None else save
    names = [n for n, _ in model.named_modules()]
    missing = [m for m in save if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:  # PEFT would skip it in silence, and the projector would stay untrained
        raise ModelError(
            f"lora.modules_to_save: {missing[0]!r} matches no module of this model; leave lora.modules_to_save "
            "unset (null) for the family's projector, or name a module the model has"
        )
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        modules_to_save=list(save) or None,
    )
    try:
        return peft_model(model, peft_config)
    except ValueError as e:
        raise ModelError(f"lora.target_modules={target!r} does not fit this model: {e}") from None


@contextlib.contextmanager
def quiet_peft():
    """PEFT calls what transformers deprecates (`is_gradient_checkpointing`, `gradient_checkpointing_enable`): a
    FutureWarning in every run, eval and export that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        yield


def peft_model(model: nn.Module, peft_config):
    """PEFT's `get_peft_model` (`quiet_peft`)."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, peft_config)


def load_adapter(model: nn.Module, path, **kwargs):
    """PEFT's `PeftModel.from_pretrained(model, path)` (`quiet_peft`)."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, path, **kwargs)


def trainable_summary(model: nn.Module) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return f"trainable params: {n_train:,} of {n_all:,} ({100 * n_train / max(n_all, 1):.2f}%)"


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_base(model: nn.Module, processor, path: str | Path) -> None:
    """Save a base model + processor folder (what a tiny run's adapter points at, so it reloads anywhere)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
