"""`model.quantization` (QLoRA through bitsandbytes): one line without CUDA; on a GPU the tracker reads the adapters
over a 4-bit base."""

import pytest
import torch

from rbvl.config import ConfigError, check_runnable, load_config
from rbvl.model import ModelError, load_model, save_base


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA line")
def test_quantization_without_cuda_is_one_line(tmp_path):
    cfg = load_config(None, ["model.quantization=4bit", f"model.name={tmp_path}"])
    with pytest.raises(ModelError) as e:
        load_model(cfg.model)
    msg = str(e.value)
    assert msg.startswith("model.quantization=4bit needs a CUDA GPU") and "\n" not in msg


def test_quantization_values_and_fsdp_give_one_line():
    with pytest.raises(ConfigError, match=r"^model.quantization: '3bit' is not one of null, 4bit, 8bit"):
        load_config(None, ["model.quantization=3bit"])
    cfg = load_config(None, ["model.quantization=4bit", "train.parallel=fsdp", "max_steps=40"])
    with pytest.raises(ConfigError, match="model.quantization: got 4bit with train.parallel=fsdp, expected null"):
        check_runnable(cfg)


@pytest.mark.gpu
def test_qlora_4bit_base_trains_adapters_the_tracker_reads(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")

    from rbvl.balance import GradientTracker, label_tokens
    from rbvl.model import prepare_model

    tiny, processor = load_model(load_config(None, []).model, seed=0)
    save_base(tiny, processor, tmp_path / "base")
    cfg = load_config(None, [f"model.name={tmp_path / 'base'}", "model.quantization=4bit", f"output_dir={tmp_path}"])
    model, processor = prepare_model(cfg, tmp_path, 0, torch.device("cuda"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the base must be 4-bit"
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tracker = GradientTracker(model, 2, params="lora")
    tok = processor.tokenizer
    enc = tok(["What is 1 + 1? 2", "Say yes. yes"], return_tensors="pt", padding=True).to("cuda")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    tracker.set_domains(torch.tensor([0, 1]), tokens=label_tokens(labels.cpu()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**enc).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")  # fmt: skip
    n = label_tokens(labels).sum()
    tracker.watch_loss(ce / n, normalizer=n).backward()
    grads = tracker.domain_grads()
    assert torch.isfinite(grads).all() and (grads.norm(dim=1) > 0).all()
    for i, (name, mod) in enumerate(tracker.modules):  # the domains' parts add up to the adapter's own gradient
        torch.testing.assert_close(tracker.sums[i].sum(0) / n.float(), mod.weight.grad.float(), rtol=1e-3, atol=1e-6, msg=name)  # fmt: skip
