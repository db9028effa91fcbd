"""Build an image-text-to-text model and its processor, and put LoRA on it.

One path for every model: `load_model(cfg.model)` takes a hub id (`llava-hf/llava-1.5-7b-hf`), a local
`save_pretrained` folder, or `tiny-llava` — a 2-layer Llama with a tiny CLIP vision tower whose config, BPE
tokenizer and processor are built offline, for tests and the CPU demo. Everything after that (LoRA, freezing,
collate, saving) is the same for all of them.

    model, processor = load_model(ModelConfig(name="tiny-llava"))
    model = apply_lora(model, LoraConfig())        # adapters on the language model, projector trained in full
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from rbvl.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

TINY = "tiny-llava"
IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ChatML turns; `{% generation %}` marks what the assistant says, so `return_assistant_tokens_mask` works too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]

# What the tiny tokenizer's BPE merges are learnt from: the words of instruction data, and digits kept apart.
_TINY_CORPUS = """
user assistant system image digit number handwritten shown picture photo what which is the this that a an of in on
odd even greater less than yes no plus minus times equals answer question reasoning think step because so and or
describe show tell me how many what's name write say identify classify read count compute solve sum product result
The digit is and so the answer is. What is this digit? Is the digit odd or even? Is it greater than four?
explain solution problem math science physics chemistry biology puzzle crossword code function value equation
""" + " ".join(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(10) for b in range(10))


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_model(cfg: ModelConfig, seed: int = 0):
    """(model, processor) for `cfg.name`: a hub id, a local folder, or `tiny-llava`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = DTYPES[cfg.dtype]
    kwargs = {"dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.name == TINY:
        processor = tiny_processor()
        with _seeded(seed):
            model = AutoModelForImageTextToText.from_config(tiny_config(processor), **kwargs)
    else:
        try:
            processor = AutoProcessor.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                cfg.name, trust_remote_code=cfg.trust_remote_code, **kwargs
            )
        except OSError as e:
            raise ModelError(f"cannot load model '{cfg.name}': {str(e).splitlines()[0]}") from None
    if cfg.freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # a frozen base gives checkpointed blocks no input that needs grad
    return model, processor


class ModelError(RuntimeError):
    """A model or processor that cannot be loaded; the message names it."""


def vision_tower(model: nn.Module) -> nn.Module:
    for name in ("vision_tower", "vision_model", "visual"):
        for module_name, module in model.named_modules():
            if module_name.split(".")[-1] == name:
                return module
    return nn.Module()


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap `model` in a PEFT LoRA model; knobs map 1:1 onto `peft.LoraConfig`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not cfg.enabled:
        return model
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=list(cfg.modules_to_save) or None,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        raise ModelError(f"lora.target_modules={cfg.target_modules!r} does not fit this model: {e}") from None


def trainable_summary(model: nn.Module) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return f"trainable params: {n_train:,} of {n_all:,} ({100 * n_train / max(n_all, 1):.2f}%)"


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------------------
# The tiny model: built offline, the same classes as the real ones
# ---------------------------------------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A byte-level BPE (vocab 512) trained in-process on a fixed corpus: deterministic, offline, reads any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_processor(image_size: int = 32, patch_size: int = 8):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
    )


def tiny_config(processor, hidden_size: int = 64, n_layers: int = 2, n_heads: int = 4, vocab_size: int | None = None):
    """A LLaVA config: 2-layer Llama text model, 2-layer CLIP vision tower on 32 px images (16 image tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=processor.patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if hidden_size <= 64 else 4 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2) if hidden_size <= 64 else n_heads,
        vocab_size=vocab_size or len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // processor.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tok.pad_token_id,
    )


def save_base(model: nn.Module, processor, path: str | Path) -> None:
    """Save a base model + processor folder (what a tiny run's adapter points at, so it reloads anywhere)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
