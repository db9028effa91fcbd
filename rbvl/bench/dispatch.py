"""`rbvl bench balance --dispatch`: the operations tracking adds to a micro-batch, which a GPU pays in launches.

    rbvl bench balance --dispatch                          # 32 layers × 7 LoRA projections × A and B = 448 linears
    rbvl bench balance --dispatch --dispatch-layers 4 --dispatch-domains 1,16

FLOPs say R&B is nearly free; on a GPU a small LoRA micro-batch is bound by kernel launches and Python dispatch,
one per operation. This bench counts them: the torch.profiler CPU events (aten operations and autograd nodes) of one
training micro-batch (set_domains, forward, loss, watch_loss, backward) of a Llama at tiny width with the recipe's
tracked-layer count, with tracking off / exact / sketched, and 1, 4 and 16 domains present among 16 samples (rows
sorted by domain, as MixtureStream batches them, and interleaved, as a user's sampler may give them). Counts are
printed as ratios to the untracked micro-batch. The width does not change the counts, so the table holds for the 7B
model's 448 linears too.

Then torch.compile: whether the tracked model's micro-batch runs under `torch.compile` (backend "eager": dynamo
alone, no code generation, so it stays quick on a CPU) with eager's gradients, and the graph breaks dynamo counts with
tracking off and on, on a 1-layer model (breaks per tracked layer are what scale). A tracked linear's forward is
`torch._dynamo.disable`d (its backward stages parts in Python and queues an autograd callback, which dynamo cannot
trace), so it costs a graph break of its own, and the rest of the model compiles around it.
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from rbvl.balance import GradientTracker, label_tokens
from rbvl.model.load import peft_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAMPLES, SEQ, VOCAB = 16, 8, 128


def add_arguments(p) -> None:
    p.add_argument("--dispatch", action="store_true", help="count the operations tracking adds per micro-batch")
    p.add_argument("--dispatch-layers", type=int, default=32, help="layers of the tiny Llama (7 LoRA projections each)")
    p.add_argument("--dispatch-domains", default="1,4,16", help="domains present among the 16 samples")


def tiny_model(layers: int):
    """A Llama of width 32 with LoRA r = 4 on the seven projections: 14 tracked linears per layer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    model = peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def micro_batch_fn(model, tracker: GradientTracker | None, keep_grads: bool = False):
    """One micro-batch as the training loop runs it; `tracker` None is the untracked step."""

    def run(ids, labels, domains):
        if tracker is not None:
            tracker.set_domains(domains, tokens=label_tokens(labels))
        loss = model(input_ids=ids, labels=labels).loss
        if tracker is not None:
            tracker.watch_loss(loss, normalizer=label_tokens(labels).sum())
        loss.backward()
        if not keep_grads:
            model.zero_grad(set_to_none=True)

    return run


def inputs(n_domains: int, order: str):
    g = torch.Generator().manual_seed(n_domains)
    ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)
    domains = torch.arange(SAMPLES) % n_domains  # interleaved: 0 1 2 ... 0 1 2 ...
    if order == "sorted":
        domains = domains.sort().values
    return ids, ids.clone(), domains


def count_events(fn, *args) -> int:
    """The profiler's CPU records of one call of `fn` (after a warm-up call: lazy initialisation stays out).

    Counted on the raw records: parsing them into FunctionEvents (`prof.events()`) takes ~14 s per micro-batch of 44k
    records on a 2-core CPU, and folds an operation that redispatches to one of the same name into one (the untracked
    step: 44,076 raw records, 43,819 parsed)."""
    fn(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    results = getattr(prof.profiler, "kineto_results", None)
    return len(results.events()) if results is not None else len(prof.events())


def dispatch_counts(layers: int, domain_counts: list[int]) -> dict:
    model = tiny_model(layers)
    trackers = {}
    for mode, sketch_dim in (("exact", 0), ("sketched", 4096)):
        trackers[mode] = GradientTracker(model, max(domain_counts), params="lora", sketch_dim=sketch_dim)
        trackers[mode].remove()  # one tracker at a time routes the layers
    n_tracked = len(trackers["exact"].modules)
    untracked = count_events(micro_batch_fn(model, None), *inputs(1, "sorted"))
    rows = {}
    for mode, tracker in trackers.items():
        tracker.attach()
        for order in ("sorted", "interleaved"):
            for k in domain_counts:
                if order == "interleaved" and k == 1:
                    continue  # one domain: the same rows either way
                if order == "interleaved" and k >= SAMPLES:  # one sample per domain: interleaved rows are sorted
                    rows[(mode, order, k)] = rows[(mode, "sorted", k)]
                    continue
                rows[(mode, order, k)] = count_events(micro_batch_fn(model, tracker), *inputs(k, order))
        tracker.remove()
    return {"layers": layers, "tracked_linears": n_tracked, "untracked": untracked, "counts": rows}


def compile_check(layers: int = 1) -> dict:
    """A micro-batch of the model under torch.compile(backend="eager") (dynamo alone: no code generation), untracked
    and tracked: the graph breaks and graphs dynamo counts in each (breaks per tracked layer are what scale), and
    whether the tracked one trains (the window fills) with the same weight gradients as eager."""
    from torch._dynamo.utils import counters

    ids, labels, domains = inputs(2, "sorted")
    out = {"layers": layers}
    for side in ("off", "tracked"):
        model = tiny_model(layers)
        tracker = GradientTracker(model, 2, params="lora") if side == "tracked" else None
        micro_batch_fn(model, tracker, keep_grads=True)(ids, labels, domains)  # eager: the reference gradients
        want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.reset()
        torch._dynamo.reset()
        counters.clear()
        try:
            micro_batch_fn(torch.compile(model, backend="eager"), tracker, keep_grads=True)(ids, labels, domains)
            got = [p.grad for p in model.parameters() if p.grad is not None]
            same = len(got) == len(want) and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
            trains = tracker is None or bool(tracker.tokens.sum() > 0 and tracker.sums[0].abs().sum() > 0)
            out[f"compiles_{side}"] = same and trains
        except Exception as e:  # noqa: BLE001 - the bench reports what dynamo says, whatever it is
            out[f"compiles_{side}"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        out[f"breaks_{side}"] = sum(counters["graph_break"].values())
        out[f"graphs_{side}"] = counters["stats"]["unique_graphs"]
        if tracker is not None:
            out["tracked_linears"] = len(tracker.modules)
            tracker.remove()
    torch._dynamo.reset()
    return out


def run(args) -> dict:
    start = time.perf_counter()
    domain_counts = [int(k) for k in args.dispatch_domains.split(",")]
    result = dispatch_counts(args.dispatch_layers, domain_counts)
    result["compile"] = compile_check()
    result["seconds"] = time.perf_counter() - start
    print_dispatch(result)
    result["counts"] = {"/".join(map(str, key)): n for key, n in result["counts"].items()}
    return result


def print_dispatch(r: dict) -> None:
    base = r["untracked"]
    print(
        f"rbvl bench balance --dispatch — a {r['layers']}-layer Llama, {r['tracked_linears']} tracked LoRA linears, "
        f"{SAMPLES} samples per micro-batch; profiler CPU events per micro-batch, untracked {base:,}"
    )
    keys = sorted({(mode, order) for mode, order, _ in r["counts"]})
    ks = sorted({k for *_, k in r["counts"]})
    print(f"  {'tracking':10s}{'rows':13s}" + "".join(f"{f'{k} domains':>16s}" for k in ks))
    for mode, order in keys:
        cells = []
        for k in ks:
            n = r["counts"].get((mode, order, k))
            cells.append(f"{n / base:>10.3f}× {100 * (n / base - 1):+4.0f}%" if n else f"{'':>16s}")
        print(f"  {mode:10s}{order:13s}" + "".join(cells))
    c = r["compile"]
    print(
        f"  torch.compile(backend='eager'), {c['layers']} layer, {c['tracked_linears']} tracked linears: graphs "
        f"untracked {c['graphs_off']}, tracked {c['graphs_tracked']} (dynamo's graph_break counter: "
        f"{c['breaks_off']}, {c['breaks_tracked']}); trains with eager's gradients: untracked {c['compiles_off']}, "
        f"tracked {c['compiles_tracked']}"
    )
    if "seconds" in r:
        print(f"  ({r['seconds']:.0f} s)")
