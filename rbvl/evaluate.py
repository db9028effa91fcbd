"""Per-domain eval loss on the manifest's eval shards, and the mixture loss weighted by the target q.

rbvl eval runs/demo_tiny_rnb                       # newest checkpoint of a run
rbvl compare demo/runs/stratified demo/runs/rnb    # final per-domain eval losses side by side
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rbvl.train.metrics import mixture_summary, read_metrics


@torch.no_grad()
def evaluate_domains(model, domains, collator, eval_cfg, dist=None, target=None) -> dict:
    """Token-averaged loss per domain, and Σ_d q_d · loss_d (q = target, uniform when None); with the eval samples
    the collator truncated or dropped (data.max_length, data.overlong).

    Under DDP each rank takes every world_size-th batch of each domain and the sums are all-reduced. Under FSDP
    (`dist.sharded`) every forward is a collective, so a rank left with fewer batches of a domain runs its last one
    again, uncounted, until every rank has run as many.
    """
    from rbvl.data import iter_eval_batches

    was_training = model.training
    model.eval()
    device = dist.device if dist is not None else next(model.parameters()).device
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    m = len(domains.names)
    sums = torch.zeros(2, m, dtype=torch.float64, device=device)  # (loss sum, tokens) per domain
    lockstep = dist is not None and getattr(dist, "sharded", False)
    counts = {"truncated": 0, "dropped": 0}  # every rank collates every batch: the same counts on each
    for d in range(m):
        batches = iter_eval_batches(
            domains, d, eval_cfg.batch_size, collator, max_samples=eval_cfg.max_samples, counts=counts
        )
        n_batches, spare, ran = 0, None, 0
        for i, batch in enumerate(batches):
            n_batches, spare = i + 1, spare if spare is not None else batch
            if i % world != rank:
                continue
            inputs = {k: v.to(device) for k, v in batch.items()}
            labels = inputs.pop("labels")
            token_loss = causal_lm_token_loss(model(**inputs).logits, labels)  # (B, T)
            sums[0, d] += token_loss.sum().double()
            sums[1, d] += (labels[:, 1:] != -100).sum()
            ran += 1
        for _ in range(-(-n_batches // world) - ran if lockstep else 0):  # uncounted: the collectives line up
            model(**{k: v.to(device) for k, v in spare.items() if k != "labels"})
    if dist is not None:
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, tokens = sums.cpu()
    per_domain = [(s / t).item() if t > 0 else None for s, t in zip(loss_sum, tokens)]
    q = torch.full((m,), 1.0 / m, dtype=torch.float64) if target is None else torch.as_tensor(target).double()
    seen = torch.tensor([x is not None for x in per_domain])
    weights = q * seen
    values = torch.tensor([x if x is not None else 0.0 for x in per_domain], dtype=torch.float64)
    mixture = (weights * values).sum() / weights.sum() if weights.sum() > 0 else torch.tensor(float("nan"))
    return {
        "loss": mixture.item(),
        "loss_per_domain": per_domain,
        "tokens_per_domain": tokens.tolist(),
        **counts,  # eval samples cut to data.max_length (truncated) or left out (dropped, data.overlong=drop)
    }


def causal_lm_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 cross-entropy of each position's next-token prediction; 0 where the label is ignored.

    The per-token loss training and evaluation share. Labels are shifted by padding them (not by slicing the
    logits), so the logits are read once, as HF models do.
    """
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten().to(logits.device), ignore_index=-100, reduction="none"
    )
    return loss.view(labels.shape)


def evaluate_run(run_dir: str | Path, manifest: str | None = None, max_samples: int = 0) -> dict:
    """Load a run's newest checkpoint (or the checkpoint folder given) and print its per-domain eval loss."""
    from rbvl.config import load_config
    from rbvl.data import load_domains
    from rbvl.data.collate import Encoder
    from rbvl.model import load_model
    from rbvl.model.load import load_adapter
    from rbvl.train import checkpoint as ckpt

    path = Path(run_dir)
    if not (path / ckpt.STATE).exists():
        found = ckpt.latest(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path}" if path.is_dir() else f"no run folder {path}")
        path = found
    cfg = load_config(path / "config.yaml", [f"eval.max_samples={max_samples}"])
    model, processor = load_model(cfg.model, seed=cfg.seed)
    if (path / "adapter_config.json").exists():
        model = load_adapter(model, path)
    domains = load_domains(manifest or cfg.manifest)
    collator = Encoder(processor, max_length=cfg.data.max_length, overlong=cfg.data.overlong)
    result = evaluate_domains(model, domains, collator, cfg.eval, target=domains.eval_distribution)
    print(f"{path}: mixture eval loss {result['loss']:.4f}")
    for name, loss in zip(domains.names, result["loss_per_domain"]):
        print(f"  {name:16s} {'-' if loss is None else f'{loss:.4f}'}")
    return result


def compare_runs(run_dirs: list[str]) -> str:
    """A table of each run's final per-domain eval losses (from metrics.jsonl), the lowest per row marked with *.

    Runs over different domains (another k, another regroup) line up by domain name; a run without a domain shows -.
    """
    finals, names, manifests = [], [], []
    for run in run_dirs:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"{run}: no such run folder")
        evals = read_metrics(run, "eval")
        if not evals:
            raise FileNotFoundError(f"{run}: no eval results in metrics.jsonl (did the run finish?)")
        finals.append(evals[-1])
        run_names, manifest = _domain_names(run, len(evals[-1]["loss_per_domain"]))
        names.append(run_names)
        manifests.append(manifest)
    labels = [Path(r).name for r in run_dirs]
    width = max(12, *(len(x) for x in labels)) + 2
    rows = [(n, [dict(zip(ns, f["loss_per_domain"])).get(n) for ns, f in zip(names, finals)])
            for n in dict.fromkeys(n for ns in names for n in ns)]  # fmt: skip
    rows.append(("mixture (q)", [f["loss"] for f in finals]))
    lines = [f"{'domain':18s}" + "".join(f"{x:>{width}s}" for x in labels)]
    for name, values in rows:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        best = min(finite) if finite else None
        cells = "".join(
            f"{'-':>{width}s}" if v is None else f"{(f'{v:.4f}' + ('*' if v == best and len(finite) > 1 else ' ')):>{width}s}"
            for v in values
        )  # fmt: skip
        lines.append(f"{name:18s}{cells}")
    lines.append(f"{'p stability':18s}" + "".join(f"{_p_stability(run):>{width}s}" for run in run_dirs))
    lines.append("* the lowest eval loss in its row; - the run has no such domain (or no eval token in it)")
    lines.append("p stability: median L1 change of p per update (0 = p stays, 2 = all mass moves; - no update)")
    lines.append(f"steps: {', '.join(str(f['step']) for f in finals)}; plots in each run folder: *.png")
    if len(set(manifests)) > 1:
        lines.append("the runs read different manifests: each mixture loss weighs its own eval set by its own q")
    return "\n".join(lines)


def _p_stability(run: str) -> str:
    """The median L1 change of p per update of a run (its balance rows; a peer's p rows otherwise), as text."""
    summary = mixture_summary(run)
    median = summary and summary["p_l1_median"]
    return f"{median:.3f} " if median is not None else "- "


def _domain_names(run_dir: str, m: int) -> tuple[list[str], str | None]:
    """The run's domain names from its manifest, and the manifest's path (plain indices when it cannot be read)."""
    try:
        from rbvl.config import load_config
        from rbvl.data import load_domains

        cfg = load_config(Path(run_dir) / "config.yaml")
        return load_domains(cfg.manifest).names, str(Path(cfg.manifest).resolve())
    except Exception:  # noqa: BLE001 - the table still reads with plain indices
        return [f"domain_{i}" for i in range(m)], None
