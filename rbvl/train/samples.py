"""Sample generations at eval (`eval.generate: N`): what the model answers to N eval prompts of each domain.

A loss is a number; a person also wants to read what the model says. At each eval, rank 0 takes the first N eval
samples of every domain, cuts each at its first answer token (so the prompt carries the chat template's assistant
header and the images, exactly as in training), generates greedily and writes one line per sample to
OUTPUT_DIR/samples.jsonl: {step, domain, id, prompt, reference, output}. TensorBoard (and wandb / MLflow) get them as
text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rbvl.data.shards import DataError, ShardError, decode, read_shard


@torch.no_grad()
def generate_samples(model, domains, collator, n: int, max_new_tokens: int = 64) -> list[dict]:
    """Up to `n` greedy generations per domain, from its first eval samples (none when n = 0)."""
    if n <= 0:
        return []
    tokenizer = collator.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for d, domain in enumerate(domains.domains):
        for sample in _first_samples(domain.eval_shards, n):
            batch, _ = collator([sample], [d])
            if batch is None:
                continue
            is_answer = batch["labels"][0] != -100
            if not is_answer[1:].any():
                continue
            start = int(is_answer[1:].nonzero()[0]) + 1  # the first answer token: the prompt ends before it
            after = (~is_answer[start:]).nonzero()
            end = start + int(after[0]) if len(after) else len(is_answer)  # the first answer, for the reference
            prompt = {k: v[:, :start] if k in ("input_ids", "attention_mask", "token_type_ids") else v
                      for k, v in batch.items() if k != "labels"}  # fmt: skip
            prompt = {k: v.to(device) for k, v in prompt.items()}
            generated = model.generate(
                **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=collator.pad_id
            )
            out.append({
                "domain": domain.name,
                "id": sample.get("id"),
                "prompt": tokenizer.decode(batch["input_ids"][0, :start], skip_special_tokens=True),
                "reference": tokenizer.decode(batch["input_ids"][0, start:end], skip_special_tokens=True),
                "output": tokenizer.decode(generated[0, start:], skip_special_tokens=True),
            })  # fmt: skip
    model.train(was_training)
    return out


def _first_samples(shards, n: int):
    """The first `n` decodable samples of a domain's eval shards (a broken one is the eval loop's to report)."""
    got = 0
    for shard in shards:
        try:
            for raw in read_shard(shard, stop=n - got):
                try:
                    yield decode(raw)
                except DataError:
                    continue
                got += 1
        except ShardError:
            return
        if got >= n:
            return


def write_samples(run_dir: str | Path, step: int, samples: list[dict], metrics=None) -> None:
    """Append `samples` to OUTPUT_DIR/samples.jsonl (and as one text block per domain to the metrics backends)."""
    if not samples:
        return
    with (Path(run_dir) / "samples.jsonl").open("a", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
    if metrics is not None:
        for domain in dict.fromkeys(s["domain"] for s in samples):
            text = "\n\n".join(
                f"**prompt** {s['prompt']}\n\n**reference** {s['reference']}\n\n**output** {s['output']}"
                for s in samples if s["domain"] == domain
            )  # fmt: skip
            metrics.text(f"samples/{domain}", text, step)
