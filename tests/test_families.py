"""Every supported family on its tiny offline model: load + LoRA, collate, forward/backward, export, tracker.

For each family (rbvl/model/families.py): LoRA lands on the language model only and the projector trains; a mixed batch
(images, text-only and multi-image samples where the family takes them) gets labels on the assistant turns only; a
forward/backward runs; `rbvl export --merge` reloads with equal logits; and GradientTracker's per-domain gradients
(params lora and head) equal plain autograd on each domain's samples collated and run on their own.
"""

import re

import pytest
import torch
from PIL import Image

from rbvl.balance import GradientTracker
from rbvl.config import LoraConfig, ModelConfig
from rbvl.data.collate import Encoder
from rbvl.model import apply_lora, load_model
from rbvl.model.families import FAMILIES, TINY_FAMILIES, family_for, head_patterns, introspect, markdown_table

NAMES = sorted(TINY_FAMILIES)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def image(colour: str, w: int = 32, h: int = 32) -> Image.Image:
    return Image.new("RGB", (w, h), COLOURS[colour])


def samples_for(fam) -> list[tuple[dict, int]]:
    """(sample, domain) pairs: 3 domains; each holds what the family takes (images, text-only, multi-image, tiles)."""
    out = []
    if fam.kind == "vlm":
        out += [
            ({"id": "img-0", "conversation": _turns("<image>\nWhat colour is this?", "red"), "image": image("red")}, 0),
            (
                {
                    "id": "img-1",
                    "conversation": _turns("What colour?\n<image>", "green is the colour"),
                    "image": image("green", 64, 32),  # any-resolution / split: more than one tile
                },
                2,
            ),
        ]
    if fam.kind == "text" or fam.text_only_samples:
        two_turns = [*_turns("What is 2 + 3?", "2 + 3 = 5."), *_turns("And 4 + 4?", "8")]
        out += [({"id": "txt-0", "conversation": two_turns, "image": None}, 1)]
        out += [({"id": "txt-1", "conversation": _turns("Say yes.", "yes"), "image": None}, 2)]
    if fam.kind == "vlm" and fam.multi_image:
        pair = {"id": "multi", "conversation": _turns("<image> or <image>: which is blue?", "the second")}
        out += [({**pair, "images": [image("red"), image("blue", 64, 64)]}, 1)]
    if fam.kind == "text":
        out += [({"id": "txt-2", "conversation": _turns("What is 1 + 1?", "2"), "image": None}, 0)]
    return out


def _turns(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def answers(sample: dict, prefix_lm: bool) -> str:
    said = [t["content"] for t in sample["conversation"] if t["role"] == "assistant"]
    return said[-1] if prefix_lm else "".join(said)  # a prefix-LM learns the last answer (the suffix) only


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def build(name: str, seed: int = 0):
    model, processor = load_model(ModelConfig(name=name), seed=seed)
    torch.manual_seed(seed)
    return apply_lora(model, LoraConfig(r=4, lora_dropout=0.0)), processor


def perturb(model, scale: float = 0.05):
    """Move adapters and projector copies off their initial values (LoRA B starts at 0: gradients of A vanish)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


def test_table_covers_the_families_users_bring():
    wanted = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"}
    assert wanted | {"gemma3", "llama", "qwen2", "qwen3", "mistral"} <= set(FAMILIES)
    for fam in FAMILIES.values():
        re.compile(fam.target_modules())
        assert all(re.compile(p) for p in fam.head_patterns())


def test_readme_lists_the_table():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's table of families is out of date: python -m rbvl.model.families"


def test_unknown_family_falls_back_to_introspection(caplog):
    model, _ = load_model(ModelConfig(name="tiny-llava"))
    model.config.model_type = "my_vlm"
    fam = introspect(model)
    assert "no entry for model_type 'my_vlm'" in caplog.text and "lora.target_modules" in caplog.text
    assert fam.projector == "multi_modal_projector" and fam.head_linear == "linear_2"
    assert fam.target_modules() == FAMILIES["llava"].target_modules()


def test_an_introspected_family_is_worked_out_before_lora_and_kept():
    """qwen3_vl and internvl used to have their projector's last linear announced, then not tracked: the family was
    worked out again after LoRA had wrapped the layers that introspection reads, and the error fell back to lm_head."""
    from rbvl.config import LoraConfig
    from rbvl.model import apply_lora

    model, _ = load_model(ModelConfig(name="tiny-llava"))
    model.config.model_type = "my_vlm"
    before = head_patterns(model)
    assert any("multi_modal_projector" in p for p in before)
    wrapped = apply_lora(model, LoraConfig())
    assert head_patterns(wrapped) == before, "the family found before LoRA is the one used after"
    assert family_for(wrapped) is family_for(model)


def test_a_fused_qkv_projection_is_adapted():
    """Phi-3 has one qkv_proj per layer: LoRA used to land on o_proj alone, in silence."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from rbvl.config import LoraConfig
    from rbvl.model import apply_lora

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)  # fmt: skip
    model = apply_lora(Phi3ForCausalLM(config), LoraConfig())
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")}
    assert adapted == {"qkv_proj", "o_proj"}


def test_cross_attention_vlms_get_lora_on_self_attention():
    """Mllama's cross-attention keys and values are image tiles, not text rows: LoRA there broke the tracker."""
    model, _ = build("tiny-mllama")
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    assert adapted and all(".self_attn." in n and "language_model.layers." in n for n in adapted), adapted
    assert {n.split(".")[-3] for n in adapted} == {"0", "2"}, "layer 1 is the cross-attention layer"


@pytest.mark.parametrize("sketch_dim", [0, 4096])
def test_cross_attention_layers_a_user_targets_give_each_tile_row_its_samples_domain(sketch_dim):
    """With LoRA on cross_attn too, its k/v rows are (batch · images · tiles), sample-major: each takes its sample's
    domain. Reference: each domain's token-mean loss within the mixed batch, by plain autograd."""
    model, processor = load_model(ModelConfig(name="tiny-mllama"), seed=3)
    torch.manual_seed(3)
    model = apply_lora(
        model, LoraConfig(r=4, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    )
    assert any(".cross_attn.k_proj.lora_A" in n for n, _ in model.named_modules())
    perturb(model)
    pairs = samples_for(TINY_FAMILIES["tiny-mllama"])
    batch, info = Encoder(processor)([s for s, _ in pairs], [d for _, d in pairs])
    tracker = GradientTracker(model, 3, params="lora", sketch_dim=sketch_dim)
    cross = [n for n in tracker.tracked_names if ".cross_attn.k_proj." in n or ".cross_attn.v_proj." in n]
    assert cross
    tracker.set_domains(info["domain_ids"], tokens=info["label_tokens"], image_domain_ids=info["image_domain_ids"])
    loss = model(**batch).loss
    tracker.watch_loss(loss, normalizer=info["label_tokens"].sum())
    loss.backward()
    got = tracker.domain_grads() if not sketch_dim else tracker.gram("plugin")
    tracker.remove()
    weights = [mod.weight for _, mod in tracker.modules]
    refs = []
    for d in range(3):
        domain_loss = masked_loss(model(**model_inputs(batch)).logits, batch["labels"], info["domain_ids"] == d)
        ref = torch.autograd.grad(domain_loss, weights, allow_unused=True)
        refs.append(torch.cat([(g if g is not None else torch.zeros_like(w)).flatten() for g, w in zip(ref, weights)]))
    refs = torch.stack(refs)
    rows = [k for k, n in enumerate(tracker.tracked_names) if n in cross]
    assert all(refs[:, sum(w.numel() for w in weights[:k]) :][:, : weights[k].numel()].abs().sum() > 0 for k in rows)
    if not sketch_dim:
        torch.testing.assert_close(got, refs, rtol=1e-4, atol=1e-4 * refs.abs().max().item())
    else:  # the sketch keeps inner products: G from 4096 buckets near the exact one (P ≈ 10k here)
        exact = refs.double() @ refs.double().T
        assert (got - exact).abs().max() < 0.25 * exact.diagonal().max()


def test_head_tracking_of_a_family_that_cannot_be_worked_out_says_which_key_to_set():
    from torch import nn

    from rbvl.model.families import FamilyError

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(FamilyError, match=r"^balance.params=head: .*set balance.params to regexes"):
        head_patterns(Opaque())


# ---------------------------------------------------------------------------------------------------------------------
# Per family
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_load_lora_collate_forward_backward(name):
    fam = TINY_FAMILIES[name]
    model, processor = build(name)
    assert family_for(model).model_type == fam.model_type

    # LoRA on the language model's attention only; never in the vision tower; the projector trains in full
    adapters = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapters and all(re.search(r"\.(q|k|v|o|qkv)_proj\.lora_A$", n) for n in adapters)
    if fam.kind == "vlm":
        assert all(f".{fam.language_model}." in n for n in adapters)
        assert not any(f".{fam.vision}." in n for n in adapters), "an adapter landed in the vision tower"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(f"{fam.projector}.modules_to_save" in n for n in trainable), "the projector does not train"
        frozen_vision = [
            p.requires_grad
            for n, p in model.named_parameters()
            if f".{fam.vision}." in n and f".{fam.projector}." not in n
        ]
        assert frozen_vision and not any(frozen_vision)

    # a mixed batch: labels on the assistant turns only
    pairs = samples_for(fam)
    samples, domains = [s for s, _ in pairs], [d for _, d in pairs]
    batch, info = Encoder(processor, max_length=512)(samples, domains)
    assert (info["truncated"], info["dropped"]) == (0, 0)
    tok = getattr(processor, "tokenizer", processor)
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    for b, sample in enumerate(samples):
        said = tok.decode(labels[b][labels[b] != -100], skip_special_tokens=True)
        assert re.sub(r"\s", "", said) == re.sub(r"\s", "", answers(sample, fam.prefix_lm)), (sample["id"], said)
    assert info["domain_ids"].tolist() == domains
    n_images = sum(len(s.get("images") or ([s["image"]] if s.get("image") else [])) for s in samples)
    assert info["image_domain_ids"].numel() >= n_images  # one row per image, or more (tiles, patches)

    # forward / backward: gradients reach the adapters and the projector, never the frozen vision tower
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if "lora_A" in n)
    if fam.kind == "vlm":
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if fam.projector in n)


@pytest.mark.parametrize("name", [n for n in NAMES if TINY_FAMILIES[n].kind == "vlm"])
def test_overlong_samples_never_lose_image_tokens(name):
    from rbvl.model.tiny import build as build_tiny

    _, processor = build_tiny(name)
    image_sample = samples_for(TINY_FAMILIES[name])[0][0]
    long_text = {"id": "long", "conversation": _turns("What is this? " * 40, "7"), "image": None}
    probe = Encoder(processor, max_length=10_000)
    prepared = [(0, *probe._prepare(image_sample)), (1, *probe._prepare(long_text))]
    _, lengths, last_image = probe._encode(prepared)
    assert last_image[0] >= 0 and last_image[1] == -1
    cut = last_image[0]  # keeping `cut` tokens would lose the image's last token
    batch, info = Encoder(processor, max_length=cut)([image_sample, long_text], [0, 1])
    assert (info["dropped"], info["truncated"]) == (1, 1) and info["domain_ids"].tolist() == [1]
    assert batch["input_ids"].shape == (1, cut) and "pixel_values" not in batch
    batch, info = Encoder(processor, max_length=cut + 1)([image_sample], [0])
    expected = (0, 1) if lengths[0] > cut + 1 else (0, 0)
    assert (info["dropped"], info["truncated"]) == expected and batch["input_ids"].shape[1] <= cut + 1
    batch, info = Encoder(processor, max_length=lengths[1] - 1, overlong="drop")([image_sample, long_text], [0, 1])
    assert info["dropped"] >= 1 and 1 not in info["domain_ids"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_export_merge_reloads_with_equal_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from rbvl.config import RunConfig, dump_config
    from rbvl.model.export import export_merged

    fam = TINY_FAMILIES[name]
    model, processor = build(name, seed=3)
    perturb(model)
    ckpt = tmp_path / "run" / "checkpoint-1"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    cfg = RunConfig()
    cfg.model.name, cfg.seed, cfg.lora.lora_dropout = name, 3, 0.0
    dump_config(cfg, ckpt / "config.yaml")

    export_merged(ckpt, tmp_path / "merged")  # what `rbvl export CKPT --merge OUT` calls
    auto = AutoModelForCausalLM if fam.kind == "text" else AutoModelForImageTextToText
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    pairs = samples_for(fam)
    batch, _ = Encoder(processor)([s for s, _ in pairs], [d for _, d in pairs])
    with torch.no_grad():
        expected = model.eval()(**model_inputs(batch)).logits
        torch.testing.assert_close(merged(**model_inputs(batch)).logits, expected, rtol=1e-4, atol=1e-4)


# Families whose output for a sample depends on the rest of its batch. Run alone, a domain's samples compute another
# function; the reference for them is the domain's token-mean loss within the mixed batch (masked), by plain autograd.
BATCH_DEPENDENT = {
    "tiny-mllama": "a text row with no image before it attends uniformly over every (padded) image tile of the batch",
}


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The token-mean next-token loss over the label tokens of the samples `rows` selects."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    keep = (labels[:, 1:] != -100) & rows[:, None]
    return losses[keep].sum() / keep.sum()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_tracker_equals_separate_per_domain_backward(name):
    """One backward over the mixed batch; each domain's token-mean gradient = autograd on its samples alone."""
    fam = TINY_FAMILIES[name]
    model, processor = build(name, seed=5)
    perturb(model)
    encoder = Encoder(processor)
    pairs = samples_for(fam)
    samples, domains = [s for s, _ in pairs], [d for _, d in pairs]
    batch, info = encoder(samples, domains)
    m = 3
    for params in ("lora", "head"):
        tracker = GradientTracker(model, m, params=params, head_patterns=head_patterns(model))
        if params == "head" and fam.head_linear is not None:
            assert any(fam.projector in n for n in tracker.tracked_names), tracker.tracked_names
        rows = {}  # what the tracked projector layer sees: as many rows as image_domain_ids
        handles = [
            mod.register_forward_pre_hook(lambda mod, a, n=n, rows=rows: rows.__setitem__(n, a[0].shape[0]))
            for n, mod in tracker.modules
            if fam.projector and fam.projector in n
        ]
        model.zero_grad(set_to_none=True)
        tracker.set_domains(info["domain_ids"], tokens=info["label_tokens"], image_domain_ids=info["image_domain_ids"])
        loss = model(**batch).loss  # the mean over the batch's label tokens
        tracker.watch_loss(loss, normalizer=info["label_tokens"].sum())
        loss.backward()
        got = tracker.domain_grads()  # (m, P): each domain's token-mean gradient
        tracker.remove()
        for h in handles:
            h.remove()
        assert all(r == info["image_domain_ids"].numel() for r in rows.values()), rows

        weights = [mod.weight for _, mod in tracker.modules]
        frozen = [w for w in weights if not w.requires_grad]  # a frozen LM head is tracked too
        for w in frozen:
            w.requires_grad_(True)
        for d in range(m):
            if name in BATCH_DEPENDENT:  # domain d's token-mean loss within the mixed batch
                domain_loss = masked_loss(model(**model_inputs(batch)).logits, batch["labels"], info["domain_ids"] == d)
            else:  # domain d's token-mean loss on its own samples, collated alone
                mine = [s for s, dd in zip(samples, domains) if dd == d]
                sub, _ = encoder(mine, [d] * len(mine))
                domain_loss = model(**sub).loss
            ref = torch.autograd.grad(domain_loss, weights, allow_unused=True)
            ref = torch.cat([(g if g is not None else torch.zeros_like(w)).flatten() for g, w in zip(ref, weights)])
            err = (got[d] - ref).abs().max() / ref.abs().max().clamp(min=1e-8)
            assert err < 1e-4, f"{name} params={params} domain {d}: relative error {err:.2e}"
            assert ref.abs().sum() > 0
        for w in frozen:
            w.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# `rbvl train` per family: 10 steps of rnb on a regrouped manifest, eval, exact resume
# ---------------------------------------------------------------------------------------------------------------------


def family_manifest(root, fam):
    """The conftest's 3-domain shards (images, arithmetic, phrases); a text-only LM gets 3 text domains."""
    import json

    from conftest import write_tiny_manifest

    if fam.kind == "vlm":
        return write_tiny_manifest(root, n_domains=3, n_train=16, n_eval=4)
    path = write_tiny_manifest(root, n_domains=4, n_train=16, n_eval=4)
    manifest = json.loads(path.read_text())
    manifest["clusters"] = manifest["clusters"][1:]  # domain 0 holds the images
    manifest["k"] = 3
    manifest["eval_distribution"] = manifest["train_distribution"] = [1 / 3] * 3
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_rnb_and_resume_exactly(name, tmp_path):
    import shutil

    from rbvl.config import load_config
    from rbvl.train import train
    from rbvl.train.metrics import read_metrics

    fam = TINY_FAMILIES[name]
    manifest = family_manifest(tmp_path / "shards", fam)

    def config(run, *extra):
        return load_config(
            None,
            [
                f"model.name={name}",
                f"manifest={manifest}",
                f"output_dir={run}",
                "max_steps=10",
                "train.batch_size=4",
                "train.log_every=2",
                "train.save_every=5",
                "balance.update_every=3",  # updates at 3, 6, 9: checkpoint-5 falls inside a window
                "balance.lam=10",
                f"balance.params={'head' if fam.head_linear is not None else 'lora'}",
                "lora.lora_dropout=0.1",  # dropout on: resume must restore its RNG too
                "eval.every=0",
                "data.max_length=256",
                "data.num_workers=0",
                "optim.lr=0.005",
                "optim.warmup_steps=2",
                "logging.progress=false",
                "logging.plots=false",
                "logging.tensorboard=false",
                *extra,
            ],
        )

    full = train(config(tmp_path / "a"))
    assert [r["step"] for r in read_metrics(tmp_path / "a", "balance")] == [3, 6, 9]
    assert all(x is not None for x in full["eval"]["loss_per_domain"]), full["eval"]
    assert max(abs(x - 1 / 3) for x in full["proportions"][-1][1]) > 1e-3, "p never moved"

    run_b = tmp_path / "b"
    run_b.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-5", run_b / "checkpoint-5")
    resumed = train(config(run_b, "resume=true"))
    assert resumed["proportions"] == full["proportions"]
    assert resumed["eval"]["loss_per_domain"] == full["eval"]["loss_per_domain"]
    a = [r["loss"] for r in read_metrics(tmp_path / "a", "train") if r["step"] > 5]
    b = [r["loss"] for r in read_metrics(run_b, "train") if r["step"] > 5]
    assert a == b and len(a) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_balance_trainer_runs_with_the_familys_processor(name, tmp_path):
    """`BalanceTrainer` (transformers.Trainer + Balance) with each family's processor and rbvl's collator."""
    from transformers import TrainingArguments

    from rbvl.integrations.hf import BalanceTrainer

    fam = TINY_FAMILIES[name]
    model, processor = build(name)
    encoder = Encoder(processor, max_length=256)
    rows = [{**s, "domain": d} for s, d in samples_for(fam)] * 4

    def collate(features: list[dict]) -> dict:
        batch, _ = encoder(features, [f["domain"] for f in features])
        return batch

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=2,
        disable_tqdm=True,
    )
    trainer = BalanceTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collate,
        n_domains=3,
        balance={"update_every": 2, "lam": 10.0, "params": "lora"},
    )
    trainer.train()
    p = trainer.proportions
    assert abs(sum(p) - 1) < 1e-6 and max(abs(x - 1 / 3) for x in p) > 1e-4, p


# ---------------------------------------------------------------------------------------------------------------------
# Recipe models, built on the meta device from the configs shipped in rbvl/assets/configs
# ---------------------------------------------------------------------------------------------------------------------

# Published sizes (model cards): a wrong value in a shipped config shows here.
PUBLISHED = {
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "llava-hf/llava-1.5-7b-hf": 7.06e9,
}
RECIPES = {
    "Qwen/Qwen2.5-7B-Instruct": "recipes/s1_59k_rnb.yaml",
    "Qwen/Qwen2-VL-2B-Instruct": "recipes/qwen2_vl_2b_rnb.yaml",
    "llava-hf/llava-1.5-7b-hf": "recipes/llava15_7b_lora_rnb.yaml",
}


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_recipe_model_configs_build_and_take_the_recipes_lora(hub_id):
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from rbvl.config import load_config
    from rbvl.model.families import is_text_only_config

    path = Path(__file__).parents[1] / "rbvl" / "assets" / "configs" / f"{hub_id.replace('/', '--')}.json"
    config = AutoConfig.for_model(**json.loads(path.read_text()))
    auto = AutoModelForCausalLM if is_text_only_config(config) else AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED[hub_id] - 1) < 0.01, f"{hub_id}: {n:,} parameters"

    cfg = load_config(RECIPES[hub_id])
    assert cfg.model.name == hub_id
    fam = family_for(model)
    model = apply_lora(model, cfg.lora)
    adapters = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert adapters and not any(fam.vision and f".{fam.vision}." in n for n in adapters)
    for name in cfg.lora.modules_to_save or []:
        assert any(n.endswith(f"{name}.modules_to_save") for n, _ in model.named_modules()), name


def test_internvl_outside_the_table_tracks_its_projector_after_lora():
    """InternVL (introspected) announced multi_modal_projector.linear_2 for params=head and then tracked lm_head only."""
    import transformers as tf

    from rbvl.balance import GradientTracker
    from rbvl.config import LoraConfig
    from rbvl.model import apply_lora

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[28, 28], patch_size=[14, 14])  # fmt: skip
    text = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = tf.InternVLForConditionalGeneration(
        tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=1)
    )
    model = apply_lora(model, LoraConfig())
    tracker = GradientTracker(model, 2, params="head", head_patterns=head_patterns(model))
    assert sorted(n.split(".")[-1] for n in tracker.tracked_names) == ["linear_2", "lm_head"]
    assert any(".multi_modal_projector.modules_to_save." in n for n in tracker.tracked_names)
