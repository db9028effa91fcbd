"""Tiny models of every supported family, built offline from configs: `model.name: tiny-<family>`.

Each builder returns (config, processor) with the family's real classes: a byte-level BPE tokenizer trained
in-process (deterministic, vocab ~512) carrying the family's special tokens and a chat template shaped like the
real one (role names, image placeholders, system prompt, quirks), the family's image processor at 32–64 px, and a
2-layer language model of hidden 64 beside a 2-layer vision tower of hidden 32 — a few hundred thousand parameters,
a training step in tens of milliseconds on a CPU. Nothing is downloaded.

    config, processor = build("tiny-qwen2-vl")
    model = AutoModelForImageTextToText.from_config(config)     # rbvl.model.load_model does this (and seeds it)
"""

from __future__ import annotations

from rbvl.model.families import TINY_FAMILIES
from rbvl.model.tiny_templates import (
    CHATML,
    GEMMA3,
    LLAMA3,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    PHI3,
    QWEN2,
    QWEN2_VL,
)
from rbvl.model.tiny_tiled import idefics3, internvl, mllama, open_gates
from rbvl.model.tiny_tokenizer import bpe_tokenizer, decoder_sizes, vision_sizes

# ---------------------------------------------------------------------------------------------------------------------
# Builders: name → (config, processor)
# ---------------------------------------------------------------------------------------------------------------------


def llava(image_size: int = 32, patch_size: int = 8):
    """LLaVA-1.5: CLIP tower on 32 px (16 image tokens, CLS dropped), 2-layer Llama."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]  # as rbvl 0.1 (same ids)
    tok = bpe_tokenizer(special, CHATML, named={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHATML,
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
    )
    return llava_config(processor), processor


def llava_config(processor, hidden_size: int = 64, n_layers: int = 2, n_heads: int = 4, vocab_size: int | None = None):
    """The tiny LLaVA's config; `hidden_size` / `n_layers` scale its language model (rbvl.bench.balance)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    vision = CLIPVisionConfig(**vision_sizes(image_size, processor.patch_size, projection_dim=32))
    text = decoder_sizes(tok, hidden_size, n_layers, n_heads)
    if hidden_size > 64:  # the benchmark's larger slices: Llama's 4× MLP and full multi-head attention
        text.update(intermediate_size=4 * hidden_size, num_key_value_heads=n_heads)
    if vocab_size:
        text["vocab_size"] = vocab_size
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // processor.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tok.pad_token_id,
    )


_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def llava_next():
    """LLaVA-NeXT: any-resolution tiles of 32 px (a 64×32 image → 2 tiles + the base image) and `image_sizes`."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tok = bpe_tokenizer(["<image>"], LLAVA_NEXT, eos="</s>", named={"image_token": "<image>"})
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT,
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_sizes(32, 8, projection_dim=32)),
        text_config=MistralConfig(**decoder_sizes(tok, head_dim=16)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tok.pad_token_id,
    )
    return config, processor


def llava_onevision():
    """LLaVA-OneVision: SigLIP tiles (any-resolution for one image, one tile per image for several), Qwen2 LM."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = bpe_tokenizer(
        ["<image>", "<video>"], LLAVA_ONEVISION, named={"image_token": "<image>", "video_token": "<video>"}
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION,
        vision_aspect_ratio="anyres_max_9",
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision_sizes(32, 8)),
        text_config=Qwen2Config(**decoder_sizes(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=tok.pad_token_id,
    )
    return config, processor


def qwen2_vl(version: str = "2"):
    """Qwen2-VL / Qwen2.5-VL: 4 px patches merged 2×2 (a 32×32 image → 16 <|image_pad|> tokens), M-RoPE."""
    import transformers as tf

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tok = bpe_tokenizer(special, QWEN2_VL, named=named)
    vision_kw = dict(depth=2, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        image_cls, video_cls, proc_cls, cfg_cls = (
            tf.Qwen2VLImageProcessor,
            tf.Qwen2VLVideoProcessor,
            tf.Qwen2VLProcessor,
            tf.Qwen2VLConfig,
        )
        vision_kw.update(embed_dim=32, mlp_ratio=2)
    else:
        image_cls, video_cls, proc_cls, cfg_cls = (
            tf.Qwen2VLImageProcessor,
            tf.Qwen2VLVideoProcessor,
            tf.Qwen2_5_VLProcessor,
            tf.Qwen2_5_VLConfig,
        )
        vision_kw.update(
            out_hidden_size=64, hidden_size=32, intermediate_size=64, window_size=16, fullatt_block_indexes=[1]
        )
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = proc_cls(
        image_processor=image_cls(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, **pixels),
        tokenizer=tok,
        video_processor=video_cls(**pixels),
        chat_template=QWEN2_VL,
    )
    ids = tok.convert_tokens_to_ids
    config = cfg_cls(
        vision_config=vision_kw,
        text_config=decoder_sizes(tok, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return config, processor


def qwen3_vl():
    """Qwen3-VL: Qwen2-VL's 4 px patches merged 2×2, a Qwen3 decoder with interleaved M-RoPE, one DeepStack merger."""
    import transformers as tf

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = bpe_tokenizer(special, QWEN2_VL, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, **pixels),
        tokenizer=tok,
        video_processor=tf.Qwen3VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL,
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[1])  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    ids = tok.convert_tokens_to_ids
    config = tf.Qwen3VLConfig(
        vision_config=vision,
        text_config=decoder_sizes(tok, head_dim=16, rope_scaling=rope),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return config, processor


def paligemma():
    """PaliGemma: SigLIP on 32 px (16 image tokens), Gemma LM; prefix-LM (the prompt attends both ways)."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor, SiglipVisionConfig

    tok = bpe_tokenizer(["<image>", "<bos>", "<eos>"], None, eos="<eos>", bos="<bos>", named={"image_token": "<image>"})
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision_sizes(32, 8, projection_dim=64)),
        text_config=GemmaConfig(**decoder_sizes(tok, head_dim=16)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,  # as every tiny model: the tracker's LM head is the head's own weight
    )
    return config, processor


def gemma3():
    """Gemma 3: SigLIP on 32 px pooled to 4 soft tokens per image, <start_of_image> placeholder, bidirectional images."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    special = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *named.values()]
    tok = bpe_tokenizer(special, GEMMA3, eos="<end_of_turn>", bos="<bos>", named=named)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        chat_template=GEMMA3,
        image_seq_length=4,
    )
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**vision_sizes(32, 8)),
        text_config=Gemma3TextConfig(**decoder_sizes(tok, head_dim=16, sliding_window=64)),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    return config, processor


def text_lm(model_type: str):
    """A text-only causal LM (Llama 3, Qwen2.5/Qwen3 or Phi-3 shaped); its 'processor' is the tokenizer."""
    import transformers as tf

    if model_type == "llama":
        special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = bpe_tokenizer(special, LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>")
        return tf.LlamaConfig(**decoder_sizes(tok)), tok
    if model_type == "phi3":
        special = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
        tok = bpe_tokenizer(special, PHI3, eos="<|end|>")
        return tf.Phi3Config(**decoder_sizes(tok)), tok
    tok = bpe_tokenizer([], QWEN2)
    if model_type == "qwen3":
        return tf.Qwen3Config(**decoder_sizes(tok, head_dim=16)), tok
    return tf.Qwen2Config(**decoder_sizes(tok)), tok


BUILDERS = {
    "tiny-llava": llava,
    "tiny-llava-next": llava_next,
    "tiny-llava-onevision": llava_onevision,
    "tiny-qwen2-vl": lambda: qwen2_vl("2"),
    "tiny-qwen2.5-vl": lambda: qwen2_vl("2.5"),
    "tiny-qwen3-vl": qwen3_vl,
    "tiny-idefics3": idefics3,
    "tiny-mllama": mllama,
    "tiny-internvl": internvl,
    "tiny-paligemma": paligemma,
    "tiny-gemma3": gemma3,
    "tiny-llama": lambda: text_lm("llama"),
    "tiny-qwen2": lambda: text_lm("qwen2"),
    "tiny-qwen3": lambda: text_lm("qwen3"),
    "tiny-phi3": lambda: text_lm("phi3"),
}
assert set(BUILDERS) == set(TINY_FAMILIES), "every tiny name in the family table needs a builder"


# What a tiny model's random init leaves where a pretrained checkpoint would not (run on the built model).
AFTER_INIT = {"tiny-mllama": open_gates}


def is_tiny(name: str) -> bool:
    return name in BUILDERS


def build(name: str):
    """(config, processor) of the tiny model `name` (one of BUILDERS)."""
    return BUILDERS[name]()
