"""What every tiny model shares: a byte-level BPE tokenizer trained in-process on a fixed corpus (deterministic,
offline), and the sizes of its decoder and vision tower.

Every tiny family (rbvl/model/tiny.py, rbvl/model/tiny_tiled.py) builds its tokenizer here, with the family's special
tokens and chat template.
"""

from __future__ import annotations

# What the tiny tokenizer's BPE merges are learnt from: the words of instruction data, and digits kept apart.
_CORPUS = """
user assistant system image digit number handwritten shown picture photo what which is the this that a an of in on
odd even greater less than yes no plus minus times equals answer question reasoning think step because so and or
describe show tell me how many what's name write say identify classify read count compute solve sum product result
The digit is and so the answer is. What is this digit? Is the digit odd or even? Is it greater than four?
explain solution problem math science physics chemistry biology puzzle crossword code function value equation
""" + " ".join(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(10) for b in range(10))

BASE_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(
    special: list[str],
    chat_template: str | None,
    eos: str = "<|im_end|>",
    bos: str = "<s>",
    named: dict[str, str] | None = None,
):
    """A byte-level BPE (vocab 512 + specials) trained in-process on a fixed corpus: deterministic, reads any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special
        if special[:1] == ["<pad>"]
        else BASE_SPECIAL + [t for t in special if t not in BASE_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        extra_special_tokens=named or {},
    )
    tok.chat_template = chat_template
    return tok


def decoder_sizes(tok, hidden: int = 64, layers: int = 2, heads: int = 4, **extra) -> dict:
    """Keyword arguments of a tiny decoder (Llama, Qwen2, Gemma ... share these names)."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def vision_sizes(image_size: int, patch_size: int, **extra) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )
