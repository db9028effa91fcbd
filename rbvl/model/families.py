"""Per-family facts: the one table that says where LoRA goes, what the projector is, and how images reach it.

Everything that differs between model families and matters to rbvl lives here, keyed by transformers'
`config.model_type`; the rest of the code asks this table instead of branching on names:

    fam = family_for(model.config)               # Family("qwen2_vl", ...) or one found by introspection
    fam.target_modules()                          # LoRA regex on the language model only
    fam.modules_to_save                           # the projector, trained in full beside the adapters
    fam.head_patterns()                           # what `balance.params: head` tracks (LM head + projector's last linear)

`projector_rows` says how the images of a batch map to the rows the projector sees, which the tracker needs to give
each row its domain (rbvl.data.collate.projector_rows computes it):
  image    one row per image (LLaVA-1.5, PaliGemma, Gemma 3 without pan-and-scan crops)
  anyres   one row per tile of an any-resolution grid (LLaVA-NeXT; LLaVA-OneVision for single-image samples)
  tiles    one row per image split (Idefics3 / SmolVLM: the row × column crops plus the global image)
  patches  one row per merged patch token, a flat (N, d) tensor (Qwen2-VL, Qwen2.5-VL: t·h·w / merge² per image)
  tokens   one row per tile, counted from the sample's image tokens (`image_seq_length` per tile: InternVL)
  samples  one row per sample of a batch that holds images: the projector sees (batch, images, tiles, patches, d)
           (Mllama). Its cross-attention layers see (batch · images · tiles) rows, sample-major: the tracker gives
           them their sample's domain (rbvl.balance.layers.CROSS_ATTENTION)

A model_type the table does not know is read by introspection (`introspect`): the language model's attention
projections and a module named like a projector, with a warning naming the recipe keys that override it.

    python -m rbvl.model.families          # prints the README's table of families from this one
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from rbvl.config.resolve import TINY_MODELS

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FUSED_ATTENTION = ("qkv_proj", "query_key_value", "c_attn")  # one linear for q, k and v (Phi-3, GPT-NeoX, GPT-2)


@dataclass(frozen=True)
class Family:
    """What rbvl needs to know about one model family."""

    model_type: str
    """transformers' `config.model_type`."""
    kind: str = "vlm"
    """`vlm` (AutoModelForImageTextToText + AutoProcessor) or `text` (AutoModelForCausalLM + AutoTokenizer)."""
    language_model: str = "language_model"
    """Name of the module that holds the language model's layers (empty for a text-only LM: all of it is)."""
    projector: str | None = None
    """Module trained in full through `lora.modules_to_save` (PEFT matches it by name suffix)."""
    head_linear: str | None = None
    """The projector's last nn.Linear, relative to the projector (`linear_2`), tracked by `balance.params: head`;
    "" when the projector is itself one nn.Linear (Mllama), None when it has none (Gemma 3)."""
    vision: str | None = None
    """The vision tower's module name (frozen when `model.freeze_vision`)."""
    image_token: str | None = None
    """The image placeholder of the chat text, before the processor expands it."""
    projector_rows: str = "image"
    """How images map to the rows the projector sees: image | anyres | tiles | patches | tokens | samples (see the
    module docstring)."""
    text_only_samples: bool = True
    """Whether a batch may mix text-only samples with image samples."""
    multi_image: bool = True
    """Whether a sample may hold several images."""
    prefix_lm: bool = False
    """PaliGemma: the prompt is a bidirectional prefix (`token_type_ids` 0), the answer the suffix (1); loss on the
    last assistant turn only."""
    tiny: str | None = None
    """The offline `model.name` that builds a ~1M-parameter model of this family (rbvl.model.tiny)."""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    """Hub checkpoints of this family (documentation)."""
    attention: tuple[str, ...] = ATTENTION
    """The attention projections LoRA adapts by default (introspection adds a fused `qkv_proj` when there is one)."""
    self_attention_only: bool = False
    """Leave `cross_attn` layers out of the default targets (Mllama: their keys and values are image tiles)."""

    def target_modules(self, names: tuple[str, ...] | None = None) -> str:
        """PEFT regex (fullmatch) for `names` (default: the family's attention projections) inside the language
        model, never the vision tower."""
        names = names or self.attention
        inside = f".*{re.escape(self.language_model)}" if self.language_model else ""
        skip = r"(?!.*\.cross_attn\.)" if self.self_attention_only else ""
        return rf"{inside}{skip}.*\.({'|'.join(names)})"

    @property
    def modules_to_save(self) -> list[str]:
        return [self.projector] if self.projector else []

    def head_patterns(self) -> list[str]:
        """Regexes (re.search) of what `params: head` tracks: the LM head and the projector's last linear.

        PEFT's `modules_to_save` wraps a module as `NAME.modules_to_save.default.…`; the trained copy is matched,
        its frozen `original_module` is not (see rbvl.balance.select_modules)."""
        patterns = [r"(^|\.)lm_head(\.modules_to_save\.[^.]+)?$"]
        if self.projector and self.head_linear == "":  # the projector is one nn.Linear
            patterns.append(rf"(^|\.){re.escape(self.projector)}(\.modules_to_save\.[^.]+)?$")
        elif self.projector and self.head_linear:
            patterns.append(
                rf"(^|\.){re.escape(self.projector)}\.(modules_to_save\.[^.]+\.)?{re.escape(self.head_linear)}$"
            )
        return patterns


_LLAVA = dict(projector="multi_modal_projector", head_linear="linear_2", vision="vision_tower", image_token="<image>")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("llava", **_LLAVA, tiny="tiny-llava", aliases=("llava-hf/llava-1.5-7b-hf",)),
        Family(
            "llava_next",
            **_LLAVA,
            projector_rows="anyres",
            tiny="tiny-llava-next",
            aliases=("llava-hf/llava-v1.6-mistral-7b-hf",),
        ),
        Family(
            "llava_onevision",
            **_LLAVA,
            projector_rows="anyres",
            tiny="tiny-llava-onevision",
            aliases=("llava-hf/llava-onevision-qwen2-0.5b-ov-hf",),
        ),
        Family(
            "qwen2_vl",
            projector="merger",
            head_linear="mlp.2",
            vision="visual",
            image_token="<|image_pad|>",
            projector_rows="patches",
            tiny="tiny-qwen2-vl",
            aliases=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        ),
        Family(
            "qwen3_vl",
            projector="merger",
            head_linear="linear_fc2",
            vision="visual",
            image_token="<|image_pad|>",
            projector_rows="patches",
            tiny="tiny-qwen3-vl",
            aliases=("Qwen/Qwen3-VL-8B-Instruct",),
        ),
        Family(
            "qwen2_5_vl",
            projector="merger",
            head_linear="mlp.2",
            vision="visual",
            image_token="<|image_pad|>",
            projector_rows="patches",
            tiny="tiny-qwen2.5-vl",
            aliases=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ),
        Family(
            "idefics3",
            language_model="text_model",
            projector="connector",
            head_linear="modality_projection.proj",
            vision="vision_model",
            image_token="<image>",
            projector_rows="tiles",
            tiny="tiny-idefics3",
            aliases=("HuggingFaceM4/Idefics3-8B-Llama3", "HuggingFaceTB/SmolVLM-256M-Instruct"),
        ),
        Family(
            "smolvlm",  # SmolVLM2; SmolVLM (v1) checkpoints are model_type idefics3. Its processor needs num2words.
            language_model="text_model",
            projector="connector",
            head_linear="modality_projection.proj",
            vision="vision_model",
            image_token="<image>",
            projector_rows="tiles",
            aliases=("HuggingFaceTB/SmolVLM2-2.2B-Instruct",),
        ),
        Family(
            "mllama",  # cross-attends to its images: LoRA on self-attention (cross_attn's keys are image tiles)
            projector="multi_modal_projector",
            head_linear="",
            vision="vision_model",
            image_token="<|image|>",
            projector_rows="samples",
            self_attention_only=True,
            tiny="tiny-mllama",
            aliases=("meta-llama/Llama-3.2-11B-Vision-Instruct",),
        ),
        Family(
            "internvl",
            **{**_LLAVA, "image_token": "<IMG_CONTEXT>"},
            projector_rows="tokens",
            tiny="tiny-internvl",
            aliases=("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf"),
        ),
        Family(
            "paligemma",
            projector="multi_modal_projector",
            head_linear="linear",
            vision="vision_tower",
            image_token="<image>",
            prefix_lm=True,
            tiny="tiny-paligemma",
            aliases=("google/paligemma-3b-pt-224",),
        ),
        Family(
            "gemma3",  # the projector is a matmul with a Parameter, no nn.Linear: params=head tracks lm_head alone
            projector="multi_modal_projector",
            vision="vision_tower",
            image_token="<start_of_image>",
            tiny="tiny-gemma3",
            aliases=("google/gemma-3-4b-it",),
        ),
        *[
            Family(t, kind="text", language_model="", multi_image=False, tiny=tiny, aliases=hub)
            for t, tiny, hub in [
                ("llama", "tiny-llama", ("meta-llama/Llama-3.1-8B-Instruct",)),
                ("qwen2", "tiny-qwen2", ("Qwen/Qwen2.5-7B-Instruct",)),
                ("qwen3", "tiny-qwen3", ("Qwen/Qwen3-8B",)),
                ("mistral", None, ("mistralai/Mistral-7B-Instruct-v0.3",)),
            ]
        ],
        Family(
            "phi3",
            kind="text",
            language_model="",
            multi_image=False,
            attention=(*ATTENTION, "qkv_proj"),  # one fused projection per layer
            tiny="tiny-phi3",
            aliases=("microsoft/Phi-3.5-mini-instruct",),
        ),
    ]
}

TINY_FAMILIES = {f.tiny: f for f in FAMILIES.values() if f.tiny}
assert set(TINY_FAMILIES) == set(TINY_MODELS), "rbvl/config/resolve.py lists the tiny models for `rbvl validate`"


# ---------------------------------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / PEFT wrappers (for its config)."""
    model = getattr(model, "module", model)  # DDP
    return model


def model_type_of(model_or_config) -> str | None:
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    return getattr(config, "model_type", None)


def lookup(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def family_for(model: nn.Module) -> Family:
    """The table's entry for `model`, or one found by introspection (with a warning that says what to set).

    Worked out once and kept on the model: introspection reads plain nn.Linear layers, which LoRA later wraps, so a
    second look after `apply_lora` would not see the projector's last linear any more."""
    base = _base(model)
    kept = getattr(base, "_rbvl_family", None)
    if isinstance(kept, Family):
        return kept
    fam = lookup(model_type_of(base))
    fam = fam if fam is not None else introspect(base)
    if isinstance(base, nn.Module):
        base._rbvl_family = fam
    return fam


def _base(model):
    """The transformers model inside DDP and PEFT wrappers."""
    model = unwrap(model)
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    return get_base() if callable(get_base) else model


def head_patterns(model: nn.Module) -> list[str]:
    """What `balance.params: head` tracks in `model`: its LM head and its projector's last linear.

    Raises FamilyError, naming the key to set, when the family cannot be worked out: tracking the LM head alone in
    silence would leave the projector out of the Gram matrix."""
    try:
        return family_for(model).head_patterns()
    except FamilyError as e:
        raise FamilyError(
            f"balance.params=head: {e}; or set balance.params to regexes of the modules to track"
        ) from None


def is_text_only_config(config) -> bool:
    """A config that AutoModelForCausalLM builds and AutoModelForImageTextToText does not."""
    fam = lookup(getattr(config, "model_type", None))
    if fam is not None:
        return fam.kind == "text"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    t = getattr(config, "model_type", None)
    return t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger", "projector", "aligner", "adapter")
_LM_NAMES = ("language_model", "text_model", "llm")
_VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")


def introspect(model: nn.Module) -> Family:
    """A Family for a model_type the table does not know, read off its module names."""
    model_type = model_type_of(model) or type(unwrap(model)).__name__
    names = [n for n, _ in unwrap(model).named_modules()]
    leaves = {n.split(".")[-1] for n in names}
    lm = next((x for x in _LM_NAMES if x in leaves), "")
    vision = next((x for x in _VISION_NAMES if x in leaves), None)
    projector = next((x for x in _PROJECTOR_NAMES if x in leaves), None)
    linears = [n for n, mod in unwrap(model).named_modules() if isinstance(mod, nn.Linear)]
    head_linear = None
    if projector:
        inside = [n.split(f"{projector}.", 1)[1] for n in linears if f"{projector}." in n]
        head_linear = inside[-1] if inside else None
    linear_leaves = {n.split(".")[-1] for n in linears}
    fam = Family(
        model_type,
        kind="vlm" if vision else "text",
        language_model=lm,
        projector=projector,
        head_linear=head_linear,
        vision=vision,
        attention=ATTENTION + tuple(x for x in FUSED_ATTENTION if x in linear_leaves),
        self_attention_only=any(".cross_attn." in n for n in linears),  # LoRA on self-attention, as for Mllama
    )
    attn = [n for n in linears if re.fullmatch(fam.target_modules(), n)]
    if not attn:
        found = sorted({n.split(".")[-1] for n in linears})[:12]
        raise FamilyError(
            f"rbvl has no entry for model_type '{model_type}' and found no attention projections "
            f"({', '.join(ATTENTION)}) in its language model; set lora.target_modules (a regex over these nn.Linear "
            f"names: {', '.join(found)} ...), lora.modules_to_save and balance.params in the recipe"
        )
    log.warning(
        "rbvl has no entry for model_type '%s'; by introspection: lora.target_modules=%r, lora.modules_to_save=%s, "
        "balance.params=head tracks %s. Set these keys in the recipe if they are wrong (and see rbvl/model/families.py).",
        model_type,
        fam.target_modules(),
        fam.modules_to_save,
        fam.head_patterns(),
    )
    return fam


class FamilyError(ValueError):
    """A model whose family rbvl cannot work out; the message says which recipe keys to set."""


# ---------------------------------------------------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------------------------------------------------


def markdown_table() -> str:
    rows = [
        "| model_type | loads with | LoRA target_modules (default) | modules_to_save | params: head | image "
        "placeholder | projector rows | text-only / multi-image samples | tiny config |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in FAMILIES.values():
        loads = "AutoModelForCausalLM" if f.kind == "text" else "AutoModelForImageTextToText"
        head = "lm_head" + (
            f" + {'.'.join(filter(None, (f.projector, f.head_linear)))}" if f.head_linear is not None else ""
        )
        mixed = "n/a (text)" if f.kind == "text" else f"{_yes(f.text_only_samples)} / {_yes(f.multi_image)}"
        rows.append(
            f"| {f.model_type} | {loads} | `{_cell(f.target_modules())}` | {', '.join(f.modules_to_save) or '—'} | {head} | "
            f"{f'`{_cell(f.image_token)}`' if f.image_token else '—'} | {f.projector_rows if f.kind == 'vlm' else '—'}"
            f"{' (prefix-LM)' if f.prefix_lm else ''} | {mixed} | {f.tiny or '—'} |"
        )
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a table cell, even in code, must be escaped


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    print(markdown_table())
