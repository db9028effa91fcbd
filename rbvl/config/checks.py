"""Cross-field checks of a run about to start (`rbvl train`, `rbvl validate`): settings under which the run would be
a silent no-op. Not part of loading a config: a finished run's config.yaml must still load for `rbvl eval` and
`rbvl export`."""

from __future__ import annotations

from rbvl.config.engine import ConfigError


def check_runnable(cfg) -> None:
    """Cross-field checks of a run about to start (`rbvl train`, `rbvl validate`), not of every config that loads (a
    finished run's config.yaml must still load for `rbvl eval` and `rbvl export`): a ConfigError names the key and a
    value that would work."""
    if cfg.mixing.strategy == "rnb":
        first = cfg.balance.warmup_steps + cfg.balance.update_every  # the step of the first update of p
        if first > cfg.max_steps:
            warmup = cfg.balance.warmup_steps
            fix = (
                f"set balance.update_every <= {cfg.max_steps - warmup}"
                if warmup < cfg.max_steps
                else f"set balance.warmup_steps=0 and balance.update_every <= {cfg.max_steps}"
            )
            raise ConfigError(
                f"balance.update_every: got {cfg.balance.update_every}, with balance.warmup_steps={warmup} the first "
                f"update of p would come at step {first} > max_steps={cfg.max_steps}, so Balance would never run; "
                f"{fix} (or max_steps >= {first})"
            )
    if cfg.mixing.strategy == "rnb" and not cfg.lora.enabled and cfg.balance.params == "lora":
        raise ConfigError(
            "balance.params: got lora with lora.enabled=false, expected head or regexes: there are no LoRA adapters "
            "to track; set balance.params=head (the LM head and projector, the paper's choice) or name the layers"
        )
    _check_peer_updates(cfg)
    if cfg.train.parallel == "fsdp" and cfg.model.quantization:
        raise ConfigError(
            f"model.quantization: got {cfg.model.quantization} with train.parallel=fsdp, expected null: a quantised "
            "base is not sharded here; QLoRA trains under train.parallel=ddp (each rank holds the 4-bit base)"
        )
    if cfg.train.parallel == "fsdp" and cfg.mixing.strategy in UNSHARDED_PEERS:
        raise ConfigError(
            f"mixing.strategy: got {cfg.mixing.strategy} with train.parallel=fsdp, expected rnb, odm or a static "
            f"mixture: {UNSHARDED_PEERS[cfg.mixing.strategy]}; train it with train.parallel=ddp"
        )


# peers whose extra passes were never run on a sharded model (each rank must run the same forwards under FSDP)
UNSHARDED_PEERS = {
    "dga": "its extra per-domain backward passes are untested on a sharded model",
    "doremi": "its reference model would be a whole unsharded copy on every rank",
    "aioli": "its LearnParams rounds are untested on a sharded model",
}


def _check_peer_updates(cfg) -> None:
    """A peer mixer whose first change of p would come after max_steps would run as a static mixture."""
    mixing = cfg.mixing
    first = {  # key, its value, the first optimizer step that changes p (each mixer's own rule)
        "odm": (
            "mixing.odm.update_every",
            mixing.odm.update_every,
            (mixing.odm.warmup_steps // mixing.odm.update_every + 1) * mixing.odm.update_every,
        ),
        "dga": ("mixing.dga.update_every", mixing.dga.update_every, mixing.dga.update_every),
        "doremi": ("mixing.doremi.update_every", mixing.doremi.update_every, mixing.doremi.update_every),
        "aioli": ("mixing.aioli.lp_steps", mixing.aioli.lp_steps, mixing.aioli.lp_steps),
    }.get(mixing.strategy)
    if first is not None and first[2] > cfg.max_steps:
        key, value, step = first
        raise ConfigError(
            f"{key}: got {value}, so mixing.strategy={mixing.strategy} would first change p at step {step} > "
            f"max_steps={cfg.max_steps} and the run would be a static mixture; set {key} <= {cfg.max_steps} "
            f"(or max_steps >= {step})"
        )
