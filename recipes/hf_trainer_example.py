"""R&B Balance in a plain Hugging Face Trainer script: LoRA on a tiny LLaVA, three domains of digit questions.

    python recipes/hf_trainer_example.py --output-dir runs/hf_example --max-steps 40
    python recipes/hf_trainer_example.py --output-dir runs/hf_example --max-steps 80 --resume   # continue
    torchrun --nproc_per_node=2 recipes/hf_trainer_example.py --fsdp                            # FSDP2, 2 GPUs

Everything here is an ordinary Trainer script (model + LoRA, a map-style dataset, a collator, TrainingArguments);
the lines marked `# R&B` are what Balance adds. Swap in your own model (e.g. `llava-hf/llava-1.5-7b-hf`), data and
collator: each example only needs an int `domain` column.
"""

from __future__ import annotations

import argparse
import random

import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import TrainingArguments

from rbvl.config import LoraConfig, ModelConfig
from rbvl.data.collate import Encoder
from rbvl.integrations.hf import BalanceTrainer  # R&B
from rbvl.model import apply_lora, load_model

DOMAINS = ["digit_name", "parity", "text_math"]


def make_dataset(n: int = 600, seed: int = 0) -> list[dict]:
    """Examples with a conversation, an optional image and their domain id (an int column)."""
    digits, rng = load_digits(), random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.choices(range(3), weights=[0.6, 0.3, 0.1])[0]  # imbalanced, as real data is
        k = rng.randrange(len(digits.target))
        image = Image.fromarray((255 - digits.images[k] * 15).astype("uint8")).resize((32, 32)).convert("RGB")
        digit = int(digits.target[k])
        if d == 0:
            turns, img = ("<image>\nWhat digit is this?", str(digit)), image
        elif d == 1:
            turns, img = ("<image>\nIs the digit odd or even?", "odd" if digit % 2 else "even"), image
        else:
            a, b = rng.randrange(10), rng.randrange(10)
            turns, img = (f"What is {a} + {b}?", f"{a} + {b} = {a + b}."), None
        conversation = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]}]
        rows.append({"conversation": conversation, "image": img, "domain": d})
    return rows


def main(argv: list[str] | None = None) -> BalanceTrainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/hf_example")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output-dir")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun; accelerate on GPUs)")
    args = parser.parse_args(argv)

    model, processor = load_model(ModelConfig(name="tiny-llava", freeze_vision=False), seed=0)
    torch.manual_seed(0)  # the adapters' initial weights (the Trainer seeds only once it is built, after them)
    model = apply_lora(
        model,
        LoraConfig(
            r=8,
            lora_dropout=0.0,
            modules_to_save=["multi_modal_projector", "lm_head"],
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ),
    )
    chat = Encoder(processor, max_length=128)

    def collate(features: list[dict]) -> dict | None:
        inputs, info = chat(features, [f["domain"] for f in features])
        # R&B: the encoder drops an over-long example; the domains of the rows it kept say which ids go with them
        return None if inputs is None else {**inputs, "domain_ids": info["domain_ids"]}

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_steps=args.save_steps,
        logging_steps=5,
        report_to="none",
        seed=0,
        use_cpu=not (args.fsdp and torch.cuda.is_available()),
        fsdp=args.fsdp,  # FSDP2 on each decoder layer, each vision encoder layer, then the root
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLIPEncoderLayer"]}
        if args.fsdp
        else None,
        remove_unused_columns=False,  # R&B: the domain column must reach the collator (BalanceTrainer forces it)
    )
    trainer = BalanceTrainer(
        model=model,
        args=training_args,
        train_dataset=make_dataset(),
        data_collator=collate,
        n_domains=len(DOMAINS),  # R&B
        domain_column="domain",  # R&B
        target=None,  # R&B: the eval set's share of each domain; None = uniform
        balance={"update_every": 10, "lam": 3.0, "params": "lora"},  # R&B
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print("final proportions:", " ".join(f"{n}={p:.3f}" for n, p in zip(DOMAINS, trainer.proportions)))
    return trainer


if __name__ == "__main__":
    main()
