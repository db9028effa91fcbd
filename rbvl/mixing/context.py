"""What `rbvl train` hands the mixers: the schedule, held-out draws, a target sampler, losses, eval.

    ctx, held_out = build_mix_context(cfg, model, domains, collator, dist, target, scheduler, schedule)
    mixer = build_mixer(cfg.mixing.strategy, m, target, cfg.mixing, ctx, seed=cfg.seed, balance=cfg.balance)

The held-out readers are separate from the training stream (their own seed), so a mixer's extra passes never change
what training draws; they count what they handed out, and `HeldOut.state_dict()` goes into each checkpoint, so a
resumed run draws the same batches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from rbvl.data import decode_or_none, domain_samples, read_shard
from rbvl.evaluate import causal_lm_token_loss, evaluate_domains
from rbvl.mixing.base import MixContext
from rbvl.model import load_model
from rbvl.model.families import head_patterns
from rbvl.train import checkpoint as ckpt


class HeldOut:
    """Fresh training samples of a domain, and target samples drawn by q from the eval shards; resumable."""

    def __init__(self, domains, collator, seed: int, device, target=None):
        self.domains, self.collator, self.seed, self.device = domains, collator, seed, device
        m = len(domains.names)
        self.q = np.asarray(target if target is not None else [1.0] * m, dtype=float)
        self.q = self.q / self.q.sum()
        self.counts = [0] * m  # samples handed out per domain
        self.target_draws = 0
        self._readers: dict[int, object] = {}
        self._eval: list[list[dict]] | None = None

    def domain_batch(self, d: int, n: int):
        """n fresh training samples of domain d → (inputs on the device, collate info)."""
        if d not in self._readers:
            dom = self.domains.domains[d]
            # resume: skip what earlier draws handed out, without reading it
            self._readers[d] = domain_samples(
                dom.train_shards, 0, 1, self.seed + 104_729, d, 0, dom.shard_sizes, self.counts[d]
            )
        samples = []
        while len(samples) < n:
            self.counts[d] += 1
            sample = decode_or_none(next(self._readers[d]))
            if sample is not None:
                samples.append(sample)
        return self._collate(samples, [d] * n)

    def target_batch(self, n: int):
        """n eval samples, domains drawn by q, samples uniformly within a domain → (inputs, collate info)."""
        if self._eval is None:
            self._eval = [[raw for s in dom.eval_shards for raw in read_shard(s)] for dom in self.domains.domains]
        rng = np.random.default_rng([self.seed, 7, self.target_draws])
        self.target_draws += 1
        have = np.array([len(x) > 0 for x in self._eval], dtype=float)
        p = self.q * have
        if p.sum() == 0:
            raise ValueError("the manifest's eval shards hold no samples: the mixer needs a target set")
        ds = rng.choice(len(p), size=n, p=p / p.sum())
        samples, ids = [], []
        for d in ds.tolist():
            sample = decode_or_none(self._eval[d][int(rng.integers(len(self._eval[d])))])
            if sample is not None:
                samples.append(sample)
                ids.append(d)
        return self._collate(samples, ids)

    def _collate(self, samples, ids):
        inputs, info = self.collator(samples, ids)
        if inputs is None:
            raise ValueError("every held-out sample was too long for data.max_length")
        return {k: v.to(self.device) for k, v in inputs.items()}, _Meta(info)

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "target_draws": self.target_draws}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # rbvl 0.3 saved no held-out state for R&B and static runs
            return
        self.counts, self.target_draws = list(state["counts"]), int(state["target_draws"])
        self._readers.clear()


class _Meta:
    """The collate info with attribute access, like the stream's BatchMeta."""

    def __init__(self, info: dict):
        self.__dict__.update(info)


def per_sample_loss(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum (B,), tokens (B,)) with grad: each sample's summed next-token loss over its label tokens."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    token_loss = causal_lm_token_loss(model(**inputs).logits, labels)  # (B, T)
    return token_loss.sum(1), (labels[:, 1:] != -100).sum(1)


def load_reference(run_dir: str, cfg, device) -> torch.nn.Module:
    """A frozen model from `run_dir`'s newest checkpoint (base + adapter), for DoReMi's excess loss."""
    from rbvl.model.load import load_adapter

    path = ckpt.latest(run_dir)
    if path is None:
        raise FileNotFoundError(f"mixing.reference: {run_dir} holds no checkpoint (train the reference run first)")
    ref = reference_config(Path(path), cfg)
    full = (Path(path) / "config.json").exists() and not (Path(path) / "adapter_config.json").exists()
    # lora.enabled=false: the checkpoint is the trained model; else the base it trained (a tiny one from its seed)
    model, _ = load_model(dataclasses.replace(ref.model, name=str(path)) if full else ref.model, seed=ref.seed)
    if (Path(path) / "adapter_config.json").exists():
        model = load_adapter(model, path)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reference_config(checkpoint: Path, cfg):
    """The reference run's config (from its checkpoint), checked against this run: DoReMi's excess loss compares the
    two models token by token on this run's domains, so they must be the same model, on the same domains."""
    from rbvl.config import ConfigError, load_config
    from rbvl.manifest import ManifestError, read

    if not (checkpoint / "config.yaml").exists():
        raise ConfigError(f"mixing.reference: {checkpoint} has no config.yaml: is it an rbvl train run?")
    ref = load_config(checkpoint / "config.yaml")
    if _same_model_name(ref.model.name) != _same_model_name(cfg.model.name):
        raise ConfigError(
            f"mixing.reference: {checkpoint.parent} trained model.name={ref.model.name}, this run {cfg.model.name}: "
            f"DoReMi's reference must be the same model (train it with mixing.strategy=stratified on this recipe)"
        )
    try:
        names = [[c.get("name") for c in read(m)["clusters"]] for m in (ref.manifest, cfg.manifest)]
    except ManifestError:  # the reference's manifest moved since: nothing to compare
        return ref
    if names[0] != names[1]:
        raise ConfigError(
            f"mixing.reference: {checkpoint.parent} trained on domains {names[0][:6]}"
            f"{' ...' if len(names[0]) > 6 else ''}, this run's manifest has {names[1][:6]}"
            f"{' ...' if len(names[1]) > 6 else ''}: DoReMi's reference must see the same domains"
        )
    return ref


def _same_model_name(name: str) -> str:
    """A model name as comparable: a local folder by its resolved path (`./m` and `m` are one model)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def build_mix_context(
    cfg, model, domains, collator, dist, target, scheduler, schedule=None
) -> tuple[MixContext, HeldOut]:
    """The context every mixer gets in `rbvl train`, and the held-out reader (its state goes into checkpoints)."""
    held_out = HeldOut(domains, collator, cfg.seed + dist.rank, dist.device, target)
    ctx = MixContext(
        model=model,
        device=dist.device,
        domain_batch=held_out.domain_batch,
        target_batch=held_out.target_batch,
        per_sample_loss=lambda inputs: per_sample_loss(model, inputs),
        evaluate=lambda: evaluate_domains(model, domains, collator, cfg.eval, dist, target=target),
        flops_per_token=2.0 * sum(p.numel() for p in model.parameters()),
        load_reference=lambda run_dir: load_reference(run_dir, cfg, dist.device),
        lr=lambda: scheduler.get_last_lr()[0],
        schedule=schedule,
        publish=None if schedule is None else lambda p, step: schedule.publish(p, after_step=step),
        spread=dist.spread,
        head_patterns=head_patterns(model) if cfg.balance.params == "head" else None,
        fp16=cfg.train.precision == "fp16",
    )
    return ctx, held_out
