"""Benchmarks: speed and cost figures, every one measured side by side in one process (alternating rounds, medians).

    rbvl bench --help               # the list below
    rbvl bench NAME --help          # a benchmark's options and what it measures
    rbvl bench NAME [options]       # run it; most print a table (and write it as JSON with --json)

regroup   Regroup's embedding pipeline against the model's raw encode speed, and k-means times; with
          --synthetic-records, reading and writing a LLaVA-665k-sized JSON (peak RSS against the JSON's size).
balance   what Balance costs: exact vs sketched tracker on the recipe's full model (memory, FLOPs, all-reduce bytes),
          step time and sketch error on a CPU slice, and (peers.py, its part 3) R&B against odm, dga, doremi and
          aioli in real training runs, every mixer's overhead measured alike.
stream    the mixture stream + collate against a raw webdataset pipeline with the same decode and workers.
train     `rbvl train` (stratified, rnb) and BalanceTrainer against a plain Hugging Face Trainer, samples/s.

Each benchmark is one module with `add_arguments(parser)` and `run(args)`; `rbvl bench NAME` imports it only when it
runs (building `rbvl --help` imports none of them). `_timing` holds what they share: alternating rounds, medians,
ratios, thread setup. The benchmarks import the library; nothing in the library imports them.
"""

BENCHMARKS: dict[str, tuple[str, str]] = {  # name → (module, one-line help)
    "regroup": ("rbvl.bench.regroup", "regroup pipeline throughput vs raw encode_image; k-means times"),
    "balance": ("rbvl.bench.balance", "training step time with Balance on vs off; analytic FLOPs"),
    "stream": ("rbvl.bench.stream", "mixture stream + collate vs a raw webdataset pipeline (same decode, workers)"),
    "train": ("rbvl.bench.train", "rbvl train (stratified, rnb) and BalanceTrainer vs a plain HF Trainer, samples/s"),
}
