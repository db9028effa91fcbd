"""`rbvl bench balance`: what R&B Balance costs: exact vs sketched tracker vs the naive per-domain backward vs peers.

    rbvl bench balance --recipe recipes/llava15_7b_lora_rnb.yaml --domains 64     # the flagship recipe
    rbvl bench balance --recipe recipes/demo_tiny_rnb.yaml --slice-layers 2 --seq 64 --batch 4   # quick look
    rbvl bench balance --slice-layers 0 --peer-rounds 3          # the 7B table and the peers, no slice
    rbvl bench balance --dispatch                                # operations per micro-batch (rbvl/bench/dispatch.py)

Three parts, all printed as one table.

1. The recipe's full model, built on the meta device from the config shipped in `rbvl/assets/configs/` (no download,
   no memory): the tracker's accumulator memory (window + each domain's last seen gradient), the extra FLOPs of
   tracking as a share of a training step (the step's FLOPs counted by torch's FlopCounterMode on the language model
   for one optimizer step of the recipe's micro-batches; tracking FLOPs analytic, `GradientTracker.flops`, plus the
   Gram matrix every K steps), and the bytes each update all-reduces. Exact (`sketch_dim=0`) and sketched
   (`--sketch-dim`, default: the recipe's `balance.sketch_dim`).
2. A CPU-sized slice with the same layer dimensions (`--slice-layers` language-model layers, the recipe's LoRA), real
   training steps (AdamW) on token batches whose domains differ in vocabulary and answer length. Step time with
   tracking off / exact / sketched / naive (one extra forward + backward per domain present, what DGA/DoGE-style
   mixers pay) / linears (exact, with PEFT's LoRA forward through each tracked linear instead of rbvl's one function
   per adapter: the tracker's own cost apart from that function's), alternating in one process, medians. Then `--windows` Balance windows of training with the exact
   tracker; each window's sketch is the sketch of the exact window sums (the sketch is linear, so this is
   exactly what the sketched tracker accumulates), giving the relative Frobenius error of G and the L1 distance of p.
   The slice's sketch keeps the recipe's compression (tracked params per sketch number) unless `--slice-sketch-dim`.
3. R&B against the peer mixers (odm, dga, doremi, aioli) in real training runs of a small model, every strategy's
   overhead measured the same way: wall clock per step against stratified in the same process, and the extra forward
   and backward tokens and FLOPs each mixer counts (rbvl/bench/peers.py; `--no-peers` skips it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from rbvl.balance import GradientTracker, _sketch_into, label_tokens, update_proportions
from rbvl.bench import dispatch, peers
from rbvl.bench._timing import alternate, medians, set_threads
from rbvl.bench.memory import meta_dtype, per_rank_memory, print_memory
from rbvl.config import load_config
from rbvl.model import apply_lora, load_model
from rbvl.model.families import head_patterns, is_text_only_config
from rbvl.model.load import DTYPES, peft_model

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"
GIB = 2**30
# tracking on the CPU slice; "linears": exact, with each tracked LoRA linear on its own function and PEFT's LoRA
# forward (GradientTracker.pair_lora = False), so the tracker's own cost shows apart from rbvl's LoRA function's
MODES = ("off", "exact", "sketched", "naive", "linears")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe", default="recipes/llava15_7b_lora_rnb.yaml", help="model, LoRA, batch and balance from it"
    )
    p.add_argument("--domains", type=int, default=64, help="m for the full-model table")
    p.add_argument("--sketch-dim", type=int, default=0, help="sketched tracker size (default: the recipe's, else 2^20)")
    p.add_argument("--slice-layers", type=int, default=2, help="language-model layers of the slice (0 = no slice)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sample on the slice")
    p.add_argument("--batch", type=int, default=2, help="samples per micro-batch on the slice")
    p.add_argument("--slice-domains", type=int, default=8, help="m on the slice")
    p.add_argument(
        "--slice-sketch-dim", type=int, default=0, help="sketch size on the slice (default: same compression)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds on the slice")
    p.add_argument("--windows", type=int, default=5, help="Balance windows of training for the sketch's error")
    p.add_argument("--update-every", type=int, default=2, help="K on the slice (steps per window)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu", help="where the slice trains: cpu, cuda, cuda:N (timed with syncs)")
    p.add_argument(
        "--autocast",
        choices=["none", "bf16"],
        default="none",
        help="bf16: the slice's forward under bf16 autocast and its frozen base in the recipe's model.dtype, as "
        "`rbvl train` runs the recipe on a GPU (none: all fp32)",
    )
    p.add_argument("--json", help="also write the results here")
    peers.add_arguments(p)
    dispatch.add_arguments(p)


def run(args) -> dict:
    if args.dispatch:  # the operation counts alone
        result = dispatch.run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result
    if args.peers:
        peers.check_arguments(args)
    set_threads(args.threads)
    cfg = load_config(args.recipe)
    sketch_dim = args.sketch_dim or cfg.balance.sketch_dim or 2**20
    result = {"recipe": args.recipe, "model": cfg.model.name, "sketch_dim": sketch_dim}
    result["full"] = full_model_costs(cfg, args.domains, sketch_dim)
    if args.slice_layers:
        ratio = result["full"]["tracked_params"] / sketch_dim
        try:
            result["slice"] = slice_costs(cfg, args, ratio)
        except ValueError as e:  # e.g. a text config no causal-LM class builds alone (Qwen2-VL's)
            print(f"no CPU slice for {cfg.model.name}: {str(e).splitlines()[0]}")
    if args.peers:
        result["peers"] = peers.peer_costs(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The full model, on the meta device
# ---------------------------------------------------------------------------------------------------------------------


def model_config(model_cfg):
    """The recipe's model config: a local folder's config.json, the one shipped for a hub id, or a tiny model's."""
    name = model_cfg.name
    if Path(name, "config.json").exists():
        return AutoConfig.from_pretrained(name)
    shipped = CONFIGS / (name.replace("/", "--") + ".json")
    if shipped.exists():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if name.startswith("tiny-"):
        return load_model(model_cfg)[0].config
    raise FileNotFoundError(f"no config for {name!r}: ship it as {shipped} or pass a local model folder")


def full_model_costs(cfg, m: int, sketch_dim: int) -> dict:
    config = model_config(cfg.model)
    auto = AutoModelForCausalLM if is_text_only_config(config) else AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config, dtype=meta_dtype(cfg.model.dtype))  # the recipe's dtype: memory per rank
    model = apply_lora(model, cfg.lora)
    text = getattr(config, "text_config", config)

    # One optimizer step's FLOPs: grad_accum micro-batches of batch_size × max_length tokens through the language
    # model (forward + backward of the frozen base with LoRA), counted on meta tensors.
    B, T = cfg.train.batch_size, cfg.data.max_length
    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    try:  # the language model alone, with the recipe's LoRA on its projections
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(type(text).from_dict(text.to_dict()))
        lm_lora = type(cfg.lora)(**{**vars(cfg.lora), "target_modules": _projections(cfg.lora.target_modules)})
        lm_lora.modules_to_save = []
        lm = apply_lora(lm, lm_lora)
    except ValueError:  # a text config no causal-LM class takes (Qwen2-VL's): the whole model, text-only inputs
        lm = model
    with FlopCounterMode(display=False) as counter:
        lm(input_ids=ids).logits.float().sum().backward()
    step_flops = counter.get_total_flops() * cfg.train.grad_accum
    del lm

    gen = torch.Generator().manual_seed(0)
    domain_ids = torch.randint(0, m, (B,), generator=gen)  # a micro-batch drawn from a uniform p
    out = {"tracked_params": 0, "step_flops": step_flops, "m": m, "K": cfg.balance.update_every}
    for name, dim in (("exact", 0), ("sketched", sketch_dim)):
        tracker = GradientTracker(
            model,
            m,
            params=cfg.balance.params,
            sketch_dim=dim,
            head_patterns=head_patterns(model) if cfg.balance.params == "head" else None,
        )
        D = tracker.n_params if dim == 0 else dim
        track = tracker.flops(domain_ids, T) * cfg.train.grad_accum
        gram = 2 * m * m * D + 4 * m * m  # every K steps: m² dot products of length D, then G q and the softmax
        out[name] = {
            "memory_gib": tracker.nbytes / GIB,
            "flops_fraction": (track + gram / cfg.balance.update_every) / step_flops,
            "allreduce_bytes": tracker.allreduce_bytes(),
        }
        out["tracked_params"] = tracker.n_params
        if (dim > 0) == (cfg.balance.sketch_dim > 0):  # the recipe's own tracker goes into the memory per rank
            out["memory"] = per_rank_memory(model, tracker.nbytes, worlds=(8, 64))
            out["memory_tracker"] = f"sketched, {dim:,}" if dim else "exact"
        tracker.remove()
    return out


def _projections(target_modules) -> list[str]:
    """`.*language_model.*\\.(q_proj|v_proj)` → ["q_proj", "v_proj"] (the same layers in a bare language model)."""
    if isinstance(target_modules, list):
        return target_modules
    if target_modules is None:  # the recipe leaves it to the model family: the attention projections
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    found = re.search(r"\(([^()]*)\)\$?$", target_modules)
    return found.group(1).split("|") if found else ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------------------------------
# The CPU slice: real steps, timed side by side
# ---------------------------------------------------------------------------------------------------------------------


def slice_costs(cfg, args, compression: float) -> dict:
    device = torch.device(args.device)
    base_dtype = DTYPES[cfg.model.dtype] if args.autocast == "bf16" else None  # as `rbvl train` loads the base
    model, config = slice_model(cfg, args.slice_layers, device, base_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    m, B, T = args.slice_domains, args.batch, args.seq
    exact = GradientTracker(model, m, params="lora")
    exact.remove()  # one tracker at a time routes the layers: each attaches for its own steps
    P = exact.n_params
    sketch_dim = args.slice_sketch_dim or max(len(exact.modules), int(P / compression))
    sketch = GradientTracker(model, m, params="lora", sketch_dim=sketch_dim)
    sketch.remove()
    GradientTracker.pair_lora = False
    try:
        linears = GradientTracker(model, m, params="lora")
    finally:
        GradientTracker.pair_lora = True
    linears.remove()
    trackers = {"exact": exact, "sketched": sketch, "linears": linears}
    batches = synthetic_batches(m, B, T, config.vocab_size, device)
    batch_index = itertools.count()  # every step, timed or not, trains on the next batch
    dtype = torch.bfloat16 if args.autocast == "bf16" else None

    def forward(ids, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return masked_loss(model, ids, labels)

    def step(mode: str) -> float:
        ids, labels, domains, tokens = batches(next(batch_index))
        tracker = trackers.get(mode)
        _sync(device)
        t = time.perf_counter()
        if tracker is not None:
            tracker.set_domains(domains, tokens=tokens)
        loss = forward(ids, labels)
        if tracker is not None:
            tracker.watch_loss(loss, normalizer=tokens.sum())
        loss.backward()
        if mode == "naive":  # one more forward + backward per domain present, on that domain's samples
            for d in domains.unique().tolist():
                rows = (domains == d).nonzero().flatten().to(device)
                torch.autograd.grad(forward(ids[rows], labels[rows]), params, allow_unused=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.commit()
        _sync(device)
        return time.perf_counter() - t

    def timed_step(mode: str, _round: int) -> float:
        if mode in trackers:
            trackers[mode].attach()
        dt = step(mode)
        for tracker in trackers.values():
            tracker.remove()
        return dt

    figures = alternate(MODES, args.rounds, timed_step, order="mirror", warmup=1)  # round 0 warms up
    med = medians(figures)
    # each mode's step over the same round's untracked step: median and range over rounds (the spread under load)
    paired = {mode: [t / off - 1 for t, off in zip(figures[mode], figures["off"], strict=True)] for mode in MODES}
    errors, l1s, gram_time = sketch_error(exact, sketch, step, args.windows, args.update_every, cfg.balance.lam)
    return {
        "device": str(device),
        "autocast": args.autocast,
        "shape": f"{args.slice_layers} layers of hidden {config.hidden_size} (intermediate {config.intermediate_size}), "
        f"seq {T}, batch {B}, m {m}, LoRA r {cfg.lora.r} on {'/'.join(_projections(cfg.lora.target_modules))}",
        "tracked_params": P,
        "sketch_dim": sketch_dim,
        "step_s": med,
        "overhead": {mode: med[mode] / med["off"] - 1 for mode in MODES},
        "overhead_paired": {
            mode: {"median": statistics.median(v), "min": min(v), "max": max(v)} for mode, v in paired.items()
        },
        "memory_gib": {mode: tracker.nbytes / GIB for mode, tracker in trackers.items()},
        "gram_s": medians(gram_time),
        "gram_rel_error": errors,
        "p_l1": l1s,
        "rounds": args.rounds,
    }


def slice_model(cfg, n_layers: int, device="cpu", base_dtype: torch.dtype | None = None):
    """The recipe's language model cut to `n_layers` layers, random weights, built on `device`, the frozen base in
    `base_dtype` (None: fp32), with the recipe's LoRA (fp32 adapters, as PEFT makes them; lora_B away from zero, as
    after some training, so lora_A has gradients too); returns it and its config."""
    full = model_config(cfg.model)
    text = getattr(full, "text_config", None) or full
    config = type(text).from_dict({**text.to_dict(), "num_hidden_layers": n_layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if base_dtype is not None:
        model.to(base_dtype)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=0.0,
        target_modules=_projections(cfg.lora.target_modules),
    )
    model = peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.train()
    return model, config


def sketch_error(exact, sketch, step, windows: int, update_every: int, lam: float):
    """Gram + update time, and the sketch's error over `windows` windows of real training with the exact tracker:
    each window's relative Frobenius error of G and L1 distance of p, sketched against exact.

    The reference keeps every domain's last seen gradient exactly (the exact tracker itself keeps it in a small
    sketch), so the error is the sketch's."""
    m = len(exact.tokens)  # (m,) label tokens per domain in the window
    for tracker in (exact, sketch):  # forget the timing rounds: both start from nothing
        tracker.reset(), tracker.last.zero_(), tracker.seen.zero_()
    exact.attach()
    last = [torch.zeros_like(s) for s in exact.sums]  # (m, out, in) per layer: exact last seen token-mean gradients
    errors, l1s, gram_time = [], [], {"exact": [], "sketched": []}
    for _ in range(windows):
        for _step in range(update_every):
            step("exact")
        sketch.tokens.copy_(exact.tokens)
        for index, sums in enumerate(exact.sums):  # the sketch of the window = the window of the sketches
            for d in range(m):
                _sketch_into(sketch.sums[0][d], sketch.sketches, index, sums[d])
        fresh = exact.tokens > 0
        t = time.perf_counter()
        exact.gram("plugin")
        _sync(exact.sq.device)
        gram_time["exact"].append(time.perf_counter() - t)
        G = torch.zeros(m, m, dtype=torch.float64)
        for held, sums in zip(last, exact.sums, strict=True):
            held[fresh] = sums[fresh] / exact.tokens[fresh].float().view(-1, 1, 1).to(sums.device)
            g = held.flatten(1).double()
            G += (g @ g.T).cpu()
        t = time.perf_counter()
        Gs = sketch.gram("plugin")
        _sync(exact.sq.device)
        gram_time["sketched"].append(time.perf_counter() - t)
        p, ps = update_proportions(G, lam=lam), update_proportions(Gs, lam=lam)
        errors.append(float((Gs - G).norm() / G.norm()))
        l1s.append(float((ps - p).abs().sum()))
        exact.reset(), sketch.reset()
    exact.remove()
    return errors, l1s, gram_time


def _sync(device) -> None:
    """Wait for the device, so that a wall-clock reading covers the work queued before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(m: int, B: int, T: int, vocab: int, device="cpu"):
    """Batch i: B samples, domains drawn uniformly and sorted (as rbvl's loader sorts a micro-batch's rows); domain d's
    tokens come from its own band of the vocabulary and its answers (labelled tokens) are longer the larger d is."""
    band = max(1, vocab // m)

    def make(i: int):
        g = torch.Generator().manual_seed(1000 + i)
        domains = torch.randint(0, m, (B,), generator=g).sort().values
        ids = torch.stack([torch.randint(d * band, (d + 1) * band, (T,), generator=g) for d in domains.tolist()])
        labels = torch.full_like(ids, -100)
        for row, d in enumerate(domains.tolist()):
            n = max(2, T * (d + 1) // (2 * m))
            labels[row, T - n :] = ids[row, T - n :]
        # domain ids and label tokens stay on the CPU, as a loader's metadata does (no device read in the step)
        return ids.to(device), labels.to(device), domains, label_tokens(labels)

    return make


def masked_loss(model, ids, labels):
    logits = model(input_ids=ids).logits
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    tokens = (shifted != -100).sum().clamp(min=1)
    return (
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum"
        )
        / tokens
    )


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


def print_table(r: dict) -> None:
    f = r["full"]
    print(f"rbvl bench balance — {r['recipe']} ({r['model']}), m = {f['m']}, K = {f['K']}")
    print(f"  tracked params {f['tracked_params']:,}; one optimizer step {f['step_flops']:.3e} FLOPs (language model)")
    print(f"  {'':22s}{'memory':>12s}{'extra FLOPs':>14s}{'all-reduce/update':>20s}")
    for name in ("exact", "sketched"):
        label = name if name == "exact" else f"sketched ({r['sketch_dim']:,})"
        x = f[name]
        print(
            f"  {label:22s}{x['memory_gib']:9.3f} GiB{100 * x['flops_fraction']:12.4f} %"
            f"{x['allreduce_bytes'] / GIB:16.3f} GiB"
        )
    if "memory" in f:
        print_memory(f["memory"], f["memory_tracker"])
    if "slice" in r:
        print_slice(r["slice"])
    if "peers" in r:
        peers.print_peers(r["peers"], f)


def print_slice(s: dict) -> None:
    where = s.get("device", "cpu").split(":")[0].upper()
    if s.get("autocast", "none") != "none":
        where += f" ({s['autocast']} autocast)"
    print(f"  {where} slice: {s['shape']}; tracked {s['tracked_params']:,}, sketch {s['sketch_dim']:,}")
    print(f"  {'':22s}{'step (median)':>14s}{'overhead':>11s}{'per round: median [min, max]':>32s}{'memory':>12s}")
    for mode in MODES:
        mem = s["memory_gib"].get(mode)
        p = s.get("overhead_paired", {}).get(mode)
        spread = f"{100 * p['median']:+8.2f} % [{100 * p['min']:+.2f}, {100 * p['max']:+.2f}]" if p else ""
        print(
            f"  {mode:22s}{1000 * s['step_s'][mode]:11.2f} ms{100 * s['overhead'][mode]:+10.2f} %{spread:>32s}"
            + (f"{mem:9.3f} GiB" if mem is not None else "")
        )
    naive, sk = s["step_s"]["naive"], s["step_s"]["sketched"]
    print(f"  naive / sketched step time: {naive / sk:.2f}×  ({s['rounds']} alternating rounds)")
    print(
        f"  Gram every K: exact {s['gram_s']['exact'] * 1000:.1f} ms, sketched {s['gram_s']['sketched'] * 1000:.1f} ms"
    )
    e, l1 = s["gram_rel_error"], s["p_l1"]
    print(
        f"  sketch vs exact over {len(e)} windows: ‖ΔG‖/‖G‖ mean {statistics.mean(e):.4f} (max {max(e):.4f}); "
        f"L1(p) mean {statistics.mean(l1):.4f} (max {max(l1):.4f})"
    )
