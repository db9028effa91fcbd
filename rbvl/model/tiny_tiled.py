"""Tiny models of the families whose processors cut each image into tiles themselves: Idefics3 / SmolVLM, Mllama
(Llama 3.2 Vision) and InternVL. Same shape as rbvl/model/tiny.py (which lists them all under `tiny-<family>`): the
family's real classes, a byte-level BPE tokenizer with its special tokens and chat template, images of 28–64 px.

How each one's tiles reach the projector, which is what the tracker has to know (rbvl/model/families.py,
`projector_rows`):
  idefics3  the row × column crops plus the global image, padding tiles dropped by the model    (`tiles`)
  mllama    one projector row per sample: the vision output is (batch, images, tiles, patches, d)   (`samples`);
            the cross-attention layers see (batch · images · tiles) rows, sample-major
  internvl  the tiles of every image, flattened across the batch; each tile is image_seq_length
            <IMG_CONTEXT> tokens in the text                                                       (`tokens`)
"""

from __future__ import annotations

from rbvl.model.tiny_templates import IDEFICS3, INTERNVL, MLLAMA
from rbvl.model.tiny_tokenizer import bpe_tokenizer, decoder_sizes, vision_sizes


def idefics3():
    """Idefics3 / SmolVLM: a 64 px image splits into 2×2 tiles of 32 px plus the global image; 4 tokens each."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *grid]
    tok = bpe_tokenizer(special, IDEFICS3, eos="<end_of_utterance>")
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
        ),
        tokenizer=tok,
        image_seq_len=4,  # (32 / 8)² patches / scale_factor²
        chat_template=IDEFICS3,
    )
    config = Idefics3Config(
        vision_config=vision_sizes(32, 8),
        text_config=decoder_sizes(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return config, processor


def mllama():
    """Mllama (Llama 3.2 Vision): up to 4 tiles of 28 px per image, 3 decoder layers of which layer 1 cross-attends
    to the images; the text holds one <|image|> per image (the model does not expand it)."""
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>",
               "<|python_tag|>"]  # fmt: skip
    tok = bpe_tokenizer(special, MLLAMA, eos="<|eot_id|>", bos="<|begin_of_text|>", named={"image_token": "<|image|>"})
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4),
        tokenizer=tok,
        chat_template=MLLAMA,
    )
    vision = vision_sizes(28, 14, num_global_layers=1, max_num_tiles=4, intermediate_layers_indices=[0])
    vision["attention_heads"] = vision.pop("num_attention_heads")  # Mllama's own name for it
    vision = MllamaVisionConfig(**vision, vision_output_dim=64)  # the last hidden state beside one inner layer: 2 × 32
    text = MllamaTextConfig(**decoder_sizes(tok, layers=3, cross_attention_layers=[1]))
    config = MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<|image|>")
    )
    return config, processor


def internvl():
    """InternVL: 56 px tiles (up to 4 per image, a thumbnail when there are several), pixel-shuffled to 4 tokens
    each, a Qwen2 decoder; `<IMG_CONTEXT>` is expanded by the processor to 4 tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}  # fmt: skip
    tok = bpe_tokenizer(list(named.values()), INTERNVL, named=named)
    size = {"height": 56, "width": 56}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=4,  # (56 / 14)² patches, pixel-shuffled by downsample_ratio 0.5
        chat_template=INTERNVL,
    )
    vision = vision_sizes([56, 56], [14, 14])
    config = InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **decoder_sizes(tok)},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        tie_word_embeddings=False,
    )
    return config, processor


def open_gates(model) -> None:
    """Mllama starts its cross-attention gates at 0 (tanh 0 = 0: no image reaches the text, and no gradient the
    projector). A pretrained checkpoint has trained them; the tiny model opens them to tanh(1) ≈ 0.76 instead."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)
