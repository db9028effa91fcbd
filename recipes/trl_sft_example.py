"""R&B Balance in a TRL `SFTTrainer` script: LoRA (via `peft_config=`) on a tiny text-only causal LM.

    python recipes/trl_sft_example.py --output-dir runs/trl_example --max-steps 40

An ordinary SFT script; the lines marked `# R&B` are what Balance adds. Each example is a chat (`messages`) with an
int `domain` column. Swap in your own model id and dataset.
"""

from __future__ import annotations

import argparse
import random

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig

from rbvl.integrations.hf import BalanceSFTTrainer  # R&B
from rbvl.model import tiny

DOMAINS = ["addition", "multiplication", "spelling"]


def make_dataset(n: int = 400, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.choices(range(3), weights=[0.6, 0.3, 0.1])[0]
        a, b = rng.randrange(10), rng.randrange(10)
        if d == 0:
            q, ans = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif d == 1:
            q, ans = f"What is {a} * {b}?", f"{a} * {b} = {a * b}."
        else:
            word = rng.choice(["digit", "image", "number", "answer"])
            q, ans = f"Spell the word {word}.", " ".join(word)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}], "domain": d})
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/trl_example")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    tokenizer = tiny.build("tiny-llava")[1].tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_steps=args.save_steps,
        logging_steps=5,
        report_to="none",
        seed=0,
        use_cpu=True,
        max_length=64,
    )
    trainer = BalanceSFTTrainer(
        model=model,
        args=config,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        ),
        n_domains=len(DOMAINS),  # R&B
        balance={"update_every": 10, "lam": 3.0, "params": "lora"},  # R&B
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print("final proportions:", " ".join(f"{n}={p:.3f}" for n, p in zip(DOMAINS, trainer.proportions)))
    return trainer


if __name__ == "__main__":
    main()
