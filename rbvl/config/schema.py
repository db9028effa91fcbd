"""rbvl's recipe schema: one typed section per stage, each field documented once, where it is defined.

A recipe's keys are these fields (`balance.lam`, `train.batch_size`, ...); each declares what it allows with
`option(...)` and its attribute docstring is what `rbvl train --help-config` prints. The field engine
(rbvl/config/engine.py) coerces and checks them; `load_config` merges defaults ← YAML ← `key=value` into a
validated `RunConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rbvl.config import help as _help
from rbvl.config.engine import Checked, ConfigError, follow_model, load, option
from rbvl.config.resolve import model_name_problem

# ---------------------------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------------------------


def _regex_or_names(value: str | list[str]) -> str | None:
    if isinstance(value, list):
        return "expected at least one module name" if not value else None
    if not value:
        return "expected a regex or a list of module names"
    try:
        re.compile(value)
    except re.error as e:
        return f"not a valid regex ({e})"
    return None


def _nonempty(value: str) -> str | None:
    return "expected a non-empty string" if not str(value).strip() else None


def _device(value: str) -> str | None:
    ok = re.fullmatch(r"auto|cpu|mps|meta|(cuda|xpu|npu|hpu)(:\d+)?", value)
    return None if ok else "expected auto, cpu, mps, cuda or cuda:N"


def _backends(value) -> str | None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(n in ("tensorboard", "wandb", "mlflow", "none") for n in names):
        return "expected a list of tensorboard, wandb, mlflow (or none)"
    return None


def _attn(value: str | None) -> str | None:
    known = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
    if value is None or value in known or "/" in value:  # `org/kernel`: a hub kernel, as transformers allows
        return None
    return f"expected one of {', '.join(known)}, a hub kernel `org/name`, or null"


def _betas(value: list[float]) -> str | None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        return "expected two numbers in [0, 1), e.g. [0.9, 0.999]"
    return None


def _resume(value: bool | str) -> str | None:
    return None if isinstance(value, bool) or value == "force" else "expected true, false or force"


def _weights(value: dict[str, float]) -> str | None:
    if any(not w >= 0 for w in value.values()):
        return "expected non-negative weights"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(Checked):
    KEY: ClassVar[str] = "model."

    name: str = option("tiny-llava", check=model_name_problem, allowed="a hub id, a folder, or a tiny-* model")
    """A hub id (`llava-hf/llava-1.5-7b-hf`), a local `save_pretrained` folder, or a tiny model built offline, one per
    family: tiny-llava, tiny-llava-next, tiny-qwen2-vl, tiny-idefics3, tiny-llama, ... (README, model families)."""
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; off unless you trust the checkpoint's code."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (LoRA and the projector train)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (enables PEFT's input-grads fix)."""
    attn_implementation: str | None = option(None, check=_attn, allowed="eager, sdpa, flash_attention_2, ... or null")
    """`eager`, `sdpa`, `flash_attention_2`; None lets transformers choose."""
    quantization: str | None = option(None, choices=(None, "4bit", "8bit"))
    """QLoRA: load the frozen base through bitsandbytes, `4bit` (NF4, double quantisation, bf16 compute) or `8bit`,
    and prepare it for k-bit training (PEFT's `prepare_model_for_kbit_training`); the LoRA adapters, which the
    tracker reads, stay in full precision. Needs a CUDA GPU and `pip install bitsandbytes`; null = no quantisation."""
    init_seed: int = option(-1, ge=-1)
    """Seed of a tiny model's random weights; -1 = the run's `seed`. Fix it to compare seeds on one base model, as
    runs of a pretrained checkpoint are (only data order, adapter init and dropout then change with `seed`)."""


@dataclass
class LoraConfig(Checked):
    """Maps 1:1 onto `peft.LoraConfig`."""

    KEY: ClassVar[str] = "lora."

    enabled: bool = True
    """Train LoRA adapters; when False the language model trains in full (small models only)."""
    r: int = option(8, ge=1)
    """Adapter rank."""
    lora_alpha: int = option(16, ge=1)
    """Scaling numerator: the adapter's output is multiplied by lora_alpha / r."""
    lora_dropout: float = option(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: str | list[str] | None = option(
        None, check=_regex_or_names, allowed="a regex, a list of names, or null (the model family's)"
    )
    """A regex or a list of names. None: the model family's regex (rbvl/model/families.py), the language model's attention
    projections only (e.g. `.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)`): bare names would also hit the vision
    tower, whose attention shares them."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter. None: the family's projector (`multi_modal_projector`,
    Qwen2-VL's `merger`, Idefics3's `connector`; none for a text-only LM), as in LLaVA stage 2."""


@dataclass
class DataConfig(Checked):
    KEY: ClassVar[str] = "data."

    max_length: int = option(512, ge=2)
    """Tokens per sample, image tokens included (at least 2: a prompt token and a label)."""
    overlong: str = option("truncate", choices=("truncate", "drop"))
    """What to do with a longer sample: `truncate` (keep the first max_length tokens) or `drop` (skip it). Counted."""
    num_workers: int = option(0, ge=0)
    """DataLoader workers that read and decode shards (0 = in the training process)."""
    prefetch_factor: int = option(2, ge=1)
    """Batches each worker prepares ahead; with `num_workers` it bounds how late a new p reaches the data."""
    shuffle_buffer: int = option(100, ge=0)
    """Per-domain shuffle buffer (samples; 0 or 1 = no buffer)."""


@dataclass
class OdmConfig(Checked):
    """Online Data Mixing (Albalak et al. 2023): EXP3 over domains with the training loss as reward."""

    KEY: ClassVar[str] = "mixing.odm."

    alpha: float = option(0.9, ge=0.0, lt=1.0)
    """α in the smoothed reward R̂_i ← α·R̂_i + (1 − α)·L_i/π_i (the authors' final 1B run used 0.5)."""
    warmup_steps: int = option(0, ge=0)
    """Steps on the initial p before EXP3 moves it (rewards still accumulate); the authors used 2% of training."""
    update_every: int = option(1, ge=1)
    """Optimizer steps between updates of p (the authors: every step)."""
    reward_scale: float = option(1.0, gt=0.0)
    """Multiplies the loss before it becomes a reward (the authors' plain EXP3 code divides by 10: 0.1)."""


@dataclass
class DgaConfig(Checked):
    """Gradient alignment (DoGE / DGA, Fan et al. 2024): extra backward passes on held-out batches."""

    KEY: ClassVar[str] = "mixing.dga."

    update_every: int = option(1, ge=1)
    """Optimizer steps between updates (DoGE: every step); each costs m + 1 extra forward + backward passes."""
    batch_size: int = option(8, ge=1)
    """Samples per domain (and of the target) in each extra pass."""
    mu: float = option(0.01, gt=0.0)
    """μ: p ← softmax(log p + scores/μ) (DoGE's default)."""
    dw_min: float = option(0.0, ge=0.0)
    """Scores are clipped to [lr·dw_min, lr·dw_max] (DoGE: 0 and 5)."""
    dw_max: float = option(5.0, ge=0.0)
    """Upper clip of the scores, in units of the learning rate (DoGE: 5)."""
    smoothing: float = option(0.0, ge=0.0, lt=1.0)
    """Mix (1 − s)·p + s/m after each update (DoGE's reweight_eps, 0 by default)."""
    max_grad_norm: float = option(5.0, ge=0.0)
    """Each domain gradient is clipped to this norm before the alignment (DoGE: 5; 0 = off)."""


@dataclass
class DoremiConfig(Checked):
    """DoReMi (Xie et al. 2023): excess loss over a reference model, exponentiated-gradient update."""

    KEY: ClassVar[str] = "mixing.doremi."

    eta: float = option(1.0, gt=0.0)
    """η: p ← softmax(log p + η·λ) (the paper's value)."""
    smoothing: float = option(1e-3, ge=0.0, lt=1.0)
    """c: p ← (1 − c)·p + c/m after each update (the paper's value)."""
    update_every: int = option(1, ge=1)
    """Optimizer steps between updates (the paper: every step)."""


@dataclass
class AioliConfig(Checked):
    """Aioli (Chen et al. 2024): LearnParams rounds, interaction matrix, exponentiated-gradient update."""

    KEY: ClassVar[str] = "mixing.aioli."

    eta: float = option(0.2, gt=0.0)
    """η: p ∝ exp(η · qᵀA) (the authors' Aioli-unrestricted runs)."""
    update_steps: int = option(250, ge=1)
    """Optimizer steps per round, LearnParams included (the authors: 250 of 5,000)."""
    lp_rounds: int = option(4, ge=1)
    """Sweeps over the domains in each LearnParams."""
    lp_steps: int = option(4, ge=1)
    """Training steps on each perturbed mixture before an eval-loss measurement."""
    one_hot_factor: float = option(0.625, gt=0.0, le=1.0)
    """Share of the perturbed domain in its LearnParams mixture (the rest spread evenly)."""
    ema: float = option(0.1, ge=0.0, lt=1.0)
    """Ā ← (1 − ema)·A + ema·Ā_prev; 0 = no smoothing, and the weights then compound round over round."""
    normalize_a: bool = True
    """Shift A to be non-negative and divide by its sum before the update (the authors' `aioli_normalize_A`)."""


MIXING_STRATEGIES = ("stratified", "natural", "manual", "rnb", "odm", "dga", "doremi", "aioli")


@dataclass
class MixingConfig(Checked):
    KEY: ClassVar[str] = "mixing."

    strategy: str = option("rnb", choices=MIXING_STRATEGIES)
    """`stratified` (uniform over domains), `natural` (by domain size), `manual` (`weights`), `rnb` (R&B Balance), or
    a peer for comparison: `odm` (Online Data Mixing), `dga` (gradient alignment, DoGE/DGA), `doremi` (needs
    `reference`), `aioli`. See rbvl/mixing/."""
    weights: dict[str, float] = option(factory=dict, check=_weights, allowed="domain → weight >= 0")
    """For `manual`: domain name (e.g. `cluster_003`) or index → weight; normalised; missing domains get 0."""
    reference: str = ""
    """For `doremi`: the run folder of a finished reference run on the same domains (its final checkpoint)."""
    odm: OdmConfig = field(default_factory=OdmConfig)
    """Online Data Mixing's settings (`mixing.strategy=odm`)."""
    dga: DgaConfig = field(default_factory=DgaConfig)
    """Gradient alignment's settings (`mixing.strategy=dga`)."""
    doremi: DoremiConfig = field(default_factory=DoremiConfig)
    """DoReMi's settings (`mixing.strategy=doremi`)."""
    aioli: AioliConfig = field(default_factory=AioliConfig)
    """Aioli's settings (`mixing.strategy=aioli`)."""

    def __post_init__(self):
        super().__post_init__()
        if self.strategy == "manual" and not any(w > 0 for w in self.weights.values()):
            raise ConfigError(
                f"mixing.weights: got {self.weights!r}, expected at least one domain with a positive weight "
                "when mixing.strategy=manual"
            )
        if self.strategy == "doremi" and not self.reference:
            raise ConfigError("mixing.reference: got '', expected a finished run folder when mixing.strategy=doremi")


@dataclass
class BalanceConfig(Checked):
    """R&B Balance every `update_every` optimizer steps: p ← softmax(λ · G q / ‖G q‖) on the window's plug-in G, the
    paper's rule, by default (chosen on the development settings: the one rule never worse than stratified beyond noise
    there, docs/balance.md); `update: mirror`, `gram: unbiased | shrunk`, `gram_ema` and `pull` are the options."""

    KEY: ClassVar[str] = "balance."

    update_every: int = option(20, ge=1)
    """K: optimizer steps per window. The paper updated a handful of times per run (about every tenth of training)."""
    lam: float = option(3.0, ge=0.0)
    """λ of `update: replace`: how far p may move from uniform (the paper used 3 on S1-59k); mirror's η when eta = 0."""
    params: str | list[str] = option("lora", check=_regex_or_names, allowed="lora, head, or regexes")
    """Tracked parameters: `lora` (the adapters), `head` (LM head and projector: the paper's last layer), or regexes."""
    warmup_steps: int = option(0, ge=0)
    """Optimizer steps with uniform p before the first window starts."""
    floor: float = option(0.0, ge=0.0, lt=1.0)
    """Lower bound on each p_i after an update (0 = off)."""
    smoothing: float = option(0.0, ge=0.0, lt=1.0)
    """s in p ← (1−s)·p_new + s·p_old (0 = off: as the paper, p comes from the current window alone)."""
    sketch_dim: int = option(0, ge=0)
    """Numbers of the seeded sketch each domain's gradient is kept in (0 = exact: m × tracked params); docs/balance.md,
    'Memory'."""
    gram: str = option("plugin", choices=("unbiased", "plugin", "shrunk"))
    """How G is estimated from a window. `unbiased`: G_ii from the U-statistic over micro-batches
    (‖Σ_k s_ik‖² − Σ_k ‖s_ik‖²) / (T_i² − Σ_k T_ik²), whose mean is ‖g_i‖²; `plugin`: ĝ_i · ĝ_j, the paper's, whose
    diagonal is biased up by tr Σ_i / n_i; `shrunk`: the Gram of c_i ĝ_i, c_i = unbiased / plug-in G_ii (docs/balance.md)."""
    update: str = option("replace", choices=("replace", "mirror"))
    """`replace` (the paper): p ← softmax(λ · G q / ‖G q‖) every window; `mirror`: one exponentiated-gradient step from
    the previous p, p ∝ p_prev · exp(η · G q / ‖G q‖) (η = `eta`): each log-ratio of p moves by at most √2 · η."""
    eta: float = option(0.5, ge=0.0)
    """η, the step of `update: mirror` (0 = λ)."""
    pull: float = option(0.0, ge=0.0, le=1.0)
    """γ of `update: mirror`: each update first moves log p a fraction γ back toward the initial p, so window noise
    cannot walk p away (a score that keeps its sign holds log-ratios at η·u/γ); 0 = off, 1 = `replace` with λ = η."""
    gram_ema: float = option(0.0, ge=0.0, lt=1.0)
    """β in Ḡ ← β · Ḡ + (1 − β) · G: the update reads an average of G over windows (0 = off: the window's G alone)."""
    temperature: str = option("fixed", choices=("fixed", "sqrt_m"))
    """`fixed` (the paper): logits λ · G q / ‖G q‖, whose spread shrinks like λ / √m; `sqrt_m`: × √m, so λ is the
    logits' root mean square for any m (the paper's λ = 3 at m = 64 is λ = 0.375)."""
    paper: bool = False
    """The paper's rules, whatever the four keys above say: plug-in G, `replace` every window, no EMA, fixed λ (the
    defaults; `paper: true` pins them when a recipe or override sets any of the four)."""

    PAPER: ClassVar[dict] = {"gram": "plugin", "update": "replace", "gram_ema": 0.0, "temperature": "fixed"}

    def __post_init__(self):
        super().__post_init__()
        for key, value in self.PAPER.items() if self.paper else ():
            object.__setattr__(self, key, value)


@dataclass
class OptimConfig(Checked):
    """AdamW with linear warmup and cosine decay."""

    KEY: ClassVar[str] = "optim."

    lr: float = option(2e-4, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = option(0.0, ge=0.0)
    """AdamW's decoupled weight decay."""
    betas: list[float] = option(factory=lambda: [0.9, 0.999], check=_betas, allowed="two numbers in [0, 1)")
    """AdamW's (β1, β2)."""
    warmup_steps: int = option(10, ge=0)
    """Linear learning-rate warmup, then cosine decay to `min_lr_ratio` · lr at max_steps."""
    min_lr_ratio: float = option(0.1, ge=0.0, le=1.0)
    """The learning rate at max_steps, as a fraction of lr."""
    max_grad_norm: float = option(1.0, ge=0.0)
    """Gradient clipping (0 = off)."""
    fused: bool = True
    """AdamW's fused kernel (one per step, not a Python loop over the parameters) where torch has it for the
    parameters' device (CPU, CUDA), as transformers' Trainer uses by default; false: torch's default AdamW."""


@dataclass
class TrainConfig(Checked):
    KEY: ClassVar[str] = "train."
    REMOVED_KEYS: ClassVar[dict[str, str]] = {"compile": "it was never used"}

    batch_size: int = option(8, ge=1)
    """Samples per micro-batch (per rank)."""
    grad_accum: int = option(1, ge=1)
    """Micro-batches per optimizer step."""
    precision: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"))
    """`auto` (bf16 autocast on a GPU that has it, else fp32), `fp32`, `bf16`, `fp16`."""
    log_every: int = option(5, ge=1)
    """Optimizer steps between train rows in metrics.jsonl (and the progress bar's loss)."""
    save_every: int = option(0, ge=0)
    """Optimizer steps between checkpoints (0 = only at the end)."""
    save_total_limit: int = option(0, ge=0)
    """Checkpoints to keep: the newest N, and the one with the best eval loss besides (0 = keep them all)."""
    device: str = option("auto", check=_device, allowed="auto, cpu, mps, cuda or cuda:N")
    """`auto`, `cpu`, `cuda`, `cuda:1` ..."""
    max_nonfinite_steps: int = option(3, ge=0)
    """Stop the run after this many optimizer steps in a row whose loss or gradients are not finite (each one is
    skipped, as fp16's loss scaler skips an overflow); 0 = never stop. No checkpoint holds non-finite weights."""
    parallel: str = option("ddp", choices=("ddp", "fsdp"))
    """How torchrun's ranks share the model. `ddp`: every rank holds all of it (enough for a 7B model with LoRA on
    80 GB). `fsdp`: FSDP2 shards each decoder layer, the vision tower and the rest over the ranks, for a model one
    GPU cannot hold (`rbvl bench balance --recipe` prints both per-rank memories). One process: the same either way."""
    fsdp_precision: str = option("auto", choices=("auto", "bf16", "fp32"))
    """Under `parallel: fsdp`, the parameters' all-gather and compute dtype: `bf16` (gradients reduced in fp32), `fp32`;
    `auto`: bf16 on a GPU that has it, fp32 on the CPU."""
    fsdp_cpu_offload: bool = False
    """Under `parallel: fsdp` on GPUs, keep the parameter shards, gradients and optimizer state in CPU memory (the
    optimizer steps on the CPU): slower, for a model whose shards do not fit."""

    def __post_init__(self):
        super().__post_init__()
        if self.fsdp_cpu_offload and (self.parallel != "fsdp" or self.device in ("cpu", "meta", "mps")):
            why = (f"train.parallel={self.parallel}, expected train.parallel=fsdp" if self.parallel != "fsdp" else
                   f"train.device={self.device}, expected a GPU: on the CPU the shards are in CPU memory already")  # fmt: skip
            raise ConfigError(f"train.fsdp_cpu_offload: got true with {why}")


@dataclass
class EvalConfig(Checked):
    KEY: ClassVar[str] = "eval."

    every: int = option(0, ge=0)
    """Optimizer steps between evaluations (0 = only at the end)."""
    batch_size: int = option(16, ge=1)
    """Samples per eval batch."""
    max_samples: int = option(0, ge=0)
    """Per domain (0 = the whole eval shard set)."""
    generate: int = option(0, ge=0)
    """Sample generations per domain at each eval, written to OUTPUT_DIR/samples.jsonl and TensorBoard (0 = none)."""
    max_new_tokens: int = option(64, ge=1)
    """Longest generation of `generate`, in tokens (greedy)."""


@dataclass
class LoggingConfig(Checked):
    KEY: ClassVar[str] = "logging."

    report_to: str | list[str] = option(
        factory=lambda: ["tensorboard"], check=_backends, allowed="tensorboard, wandb, mlflow"
    )
    """Where metrics.jsonl is mirrored: any of `tensorboard` (OUTPUT_DIR/tensorboard), `wandb` (WANDB_MODE etc.),
    `mlflow` (MLFLOW_TRACKING_URI, default OUTPUT_DIR/mlruns); `[]` or `none` for none (rbvl/train/report.py)."""
    tensorboard: bool = True
    """False drops `tensorboard` from report_to."""
    plots: bool = True
    """Write train_loss.png and eval_loss.png at the end of the run, and with Balance updates proportions.png and
    gram.png."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class RunConfig(Checked):
    output_dir: str = option("runs/default", check=_nonempty, allowed="a folder path")
    """The run folder: resolved config, metrics, plots, checkpoints. One run at a time owns it (a lock file)."""
    max_steps: int = option(100, ge=1)
    """Optimizer steps."""
    seed: int = option(0, ge=0)
    """Seeds the adapters' init, dropout and every draw of the mixture stream."""
    resume: bool | str = option(False, check=_resume, allowed="true, false or force")
    """Continue from the newest checkpoint in output_dir. A checkpoint written with another manifest or other data,
    mixing or balance settings (or seed, batch size, grad_accum) is refused, naming the keys; `force` resumes anyway."""
    manifest: str = ""
    """Path to the regroup manifest.json (its domains are the clusters)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: defaults ← YAML ← key=value
# ---------------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← the recipe YAML at `path` ← `key=value` overrides; returns a validated `RunConfig`.

    A recipe's LoRA module names belong to its model: when `model.name` is overridden with another model, the recipe's
    `lora.target_modules` / `lora.modules_to_save` give way to the new model's family defaults (said in a warning),
    unless they are overridden too."""
    return load(RunConfig, path, follow_model(path, list(overrides or []), ModelConfig.name))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, what it allows, default, doc) for every recipe key (`rbvl train --help-config`), or for section `cls`."""
    return _help.describe(cls, prefix)
