"""The tiny LLaVA: builds offline, LoRA lands where intended, learns, and reloads from a saved adapter."""

import re

import pytest
import torch
from PIL import Image

from rbvl.config import LoraConfig, ModelConfig
from rbvl.model import apply_lora, load_model, save_base, trainable_summary
from rbvl.model import tiny as tiny_models


def batch(processor):
    conversations = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
            {"role": "assistant", "content": "7"},
        ],
        [{"role": "user", "content": "What is 4 + 5?"}, {"role": "assistant", "content": "4 + 5 = 9."}],
    ]
    texts = [processor.apply_chat_template(c, tokenize=False) for c in conversations]
    image = Image.new("RGB", (32, 32), color=(200, 30, 30))
    inputs = processor(text=texts, images=[image], padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name="tiny-llava"))


def test_tiny_processor_is_deterministic_and_expands_images():
    a, b = tiny_models.build("tiny-llava")[1], tiny_models.build("tiny-llava")[1]
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    inputs = batch(a)
    image_id = a.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"][0] == image_id).sum() == 16  # (32 / 8)² patches, CLS dropped
    assert (inputs["input_ids"][1] == image_id).sum() == 0


def test_same_seed_same_weights():
    m1, _ = load_model(ModelConfig(), seed=3)
    m2, _ = load_model(ModelConfig(), seed=3)
    m3, _ = load_model(ModelConfig(), seed=4)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m1.state_dict()[w], m2.state_dict()[w])
    assert not torch.equal(m1.state_dict()[w], m3.state_dict()[w])


def test_lora_only_on_the_language_model():
    model, _ = load_model(ModelConfig())
    model = apply_lora(model, LoraConfig(r=4))
    lora = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert lora, "no adapters were added"
    assert all(".language_model." in n for n in lora)
    assert not any("vision" in n for n in lora)
    assert {re.search(r"(q|k|v|o)_proj", n).group(0) for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable), "the projector trains through modules_to_save"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    assert "trainable params" in trainable_summary(model)


def test_bare_names_would_hit_the_vision_tower():
    # Why the default is a regex: CLIP's attention uses the same projection names.
    model, _ = load_model(ModelConfig())
    model = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision" in n for n, _ in model.named_modules() if n.endswith("lora_A"))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    model, processor = load_model(ModelConfig(), seed=0)
    # A random base model: as in the demo recipe, the head trains in full beside the adapters.
    lora = LoraConfig(
        r=8,
        lora_dropout=0.0,
        modules_to_save=["multi_modal_projector", "lm_head"],
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    model = apply_lora(model, lora)
    inputs = batch(processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(20):
        loss = model(**inputs).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(**inputs).loss.item() < 0.3 * first


def test_adapter_save_reload_gives_identical_logits_and_generates(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, processor = load_model(ModelConfig(), seed=0)
    save_base(base, processor, tmp_path / "base")
    model = apply_lora(base, LoraConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():  # move the adapter and projector away from their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    inputs = batch(processor)
    inputs.pop("labels")
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded_base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)

    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]}],
        add_generation_prompt=True,
    )
    gen_inputs = proc(text=[prompt], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    out = reloaded.generate(**gen_inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == gen_inputs["input_ids"].shape[1] + 4 or out.shape[1] <= gen_inputs["input_ids"].shape[1] + 4


def test_loading_training_and_reloading_print_no_deprecation_of_transformers(tmp_path):
    """Every run with gradient checkpointing, and every eval and export (PEFT's adapter load), printed a transformers
    FutureWarning the user could do nothing about; checkpointing still recomputes (same gradients as without)."""
    import warnings

    from rbvl.model.load import load_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        grads = []
        for checkpointing in (False, True):
            base, processor = load_model(ModelConfig(gradient_checkpointing=checkpointing), seed=0)
            torch.manual_seed(0)  # the same adapters
            model = apply_lora(base, LoraConfig(r=4, lora_dropout=0.0))
            model.train()
            model(**batch(processor)).loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules()), "it is on"
        model.save_pretrained(tmp_path / "adapter")
        load_adapter(load_model(ModelConfig(), seed=0)[0], tmp_path / "adapter")
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
