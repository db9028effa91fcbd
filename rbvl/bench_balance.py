"""`rbvl bench balance`: what R&B Balance costs a training step, measured side by side in one process.

    rbvl bench balance --recipe recipes/demo_tiny_rnb.yaml              # the tiny demo shape
    rbvl bench balance --hidden 1024 --layers 8 --seq 512 --batch 2     # a larger Llama-style shape

The same LoRA training step runs with the GradientTracker on and off, alternating (so drift in machine speed hits
both alike); the wall-clock overhead is the ratio of the median step times. The analytic FLOPs of tracking (one
domain-split weight-gradient product per tracked layer), the Gram matrix and the update are reported as a fraction
of the step's FLOPs, which torch's FlopCounterMode counts on the real step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="take model, LoRA and balance settings from this recipe (default: the tiny demo)")
    p.add_argument("--hidden", type=int, help="hidden size of a tiny-llava-style model (overrides the recipe's model)")
    p.add_argument("--layers", type=int, default=8, help="language-model layers (with --hidden)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sample")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--domains", type=int, default=8, help="m, the number of domains")
    p.add_argument("--steps", type=int, default=20, help="measured steps per setting (after warmup)")
    p.add_argument("--params", default=None, help="tracked set: lora | head (default: the recipe's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def run(args) -> dict:
    from rbvl.balance import GradientTracker, gram, update_proportions
    from rbvl.config import LoraConfig, load_config
    from rbvl.model import apply_lora, load_model, tiny_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe) if args.recipe else load_config("recipes/demo_tiny_rnb.yaml")
    params = args.params or cfg.balance.params
    torch.manual_seed(0)
    model, processor = load_model(cfg.model)
    if args.hidden:
        from transformers import AutoModelForImageTextToText

        # A Llama-style language model (head dim 64, MLP 4×, vocab 32k) behind the tiny vision tower.
        config = tiny_config(processor, args.hidden, args.layers, n_heads=max(4, args.hidden // 64), vocab_size=32000)
        model = AutoModelForImageTextToText.from_config(config)
        cfg.lora = LoraConfig()  # a pretrained base: rbvl's default adapters (attention of the language model)
    model = apply_lora(model, cfg.lora)
    model.train()
    vocab = model.config.text_config.vocab_size
    m = args.domains
    input_ids = torch.randint(10, vocab, (args.batch, args.seq))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    domain_ids = torch.randint(0, m, (args.batch,), generator=torch.Generator().manual_seed(1))  # as p = uniform draws
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tracker = GradientTracker(model, m, params=params)

    def step(enabled: bool) -> float:
        tracker.enabled = enabled
        t = time.perf_counter()
        tracker.set_domains(domain_ids)
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    # ------------------------------------------------------------------------------------------------ FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    tracker.enabled = False
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    opt.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    track_flops = tracker.flops(domain_ids, args.seq)
    P = tracker.n_params
    update_flops = 2 * m * m * P + 4 * m * m  # Gram (m² dot products of length P), then G q and the softmax
    K = cfg.balance.update_every

    # ------------------------------------------------------------------------------------------------ wall clock
    for _ in range(3):
        step(True), step(False)
    on, off = [], []
    for i in range(args.steps):
        order = (True, False) if i % 2 == 0 else (False, True)
        for enabled in order:
            (on if enabled else off).append(step(enabled))
    tracker.enabled = True
    t = time.perf_counter()
    for _ in range(5):
        update_proportions(gram(tracker.domain_grads()), None, lam=cfg.balance.lam)
    update_time = (time.perf_counter() - t) / 5
    tracker.remove()

    on_med, off_med = statistics.median(on), statistics.median(off)
    result = {
        "domain_ids": domain_ids.tolist(),
        "shape": f"hidden={model.config.text_config.hidden_size} layers={model.config.text_config.num_hidden_layers} "
        f"seq={args.seq} batch={args.batch} m={m} params={params}",
        "tracked_params": P,
        "step_ms_off": 1000 * off_med,
        "step_ms_on": 1000 * on_med,
        "wallclock_overhead": on_med / off_med - 1,
        "update_ms_every_K": 1000 * update_time,
        "step_flops": step_flops,
        "tracking_flops_fraction": track_flops / step_flops,
        "update_flops_fraction": update_flops / (K * step_flops),
        "total_flops_fraction": (track_flops + update_flops / K) / step_flops,
    }
    print(f"rbvl bench balance — {result['shape']}, tracked {P:,} params, K={K}, batch domains {domain_ids.tolist()}")
    print(f"  step time, balance off   {result['step_ms_off']:9.2f} ms (median of {args.steps})")
    print(f"  step time, balance on    {result['step_ms_on']:9.2f} ms")
    print(f"  wall-clock overhead      {100 * result['wallclock_overhead']:+9.3f} %  (on/off - 1)")
    print(
        f"  Gram + update, every K   {result['update_ms_every_K']:9.2f} ms  "
        f"({100 * update_time / (K * off_med):.4f} % of K steps)"
    )
    print(
        f"  FLOPs: step {step_flops:.3e}; tracking {100 * result['tracking_flops_fraction']:.4f} %, "
        f"Gram+update {100 * result['update_flops_fraction']:.6f} %, total {100 * result['total_flops_fraction']:.4f} %"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
