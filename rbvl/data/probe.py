"""Before the first step: can every domain that will be trained or evaluated on give a label token at all?

A `data.max_length` below a domain's image tokens, or one that cuts off every answer, does not crash anything later:
the stream skips the samples and the eval line quietly loses the domain. `probe_domains` finds that in seconds, at
the start, by collating each domain's first few samples (train and eval), and says which length the data needs.
"""

from __future__ import annotations

import copy

from rbvl.data.domains import Domains
from rbvl.data.shards import DataError, ShardError, decode, read_shard

PROBE = 8  # samples per domain and split; the probe stops at the first one that keeps a label token


def probe_domains(domains: Domains, collate, train_weights=None, probe: int = PROBE) -> None:
    """Raise DataError naming the domains none of whose first `probe` samples (train or eval) keeps a label token.

    `train_weights`: the initial proportions; a domain with weight 0 is never drawn (a manual mixture may leave
    domains out) and its train split is not probed. Eval is probed for every domain: the run evaluates them all.
    Shards that cannot be read are left to the stream and the eval loop, which name them.
    """
    check_images_per_sample(domains, getattr(collate, "family", None))  # the family's limit first: it says more
    failed, seen = [], {}
    for d, domain in enumerate(domains.domains):
        splits = []
        if train_weights is None or float(train_weights[d]) > 0:
            splits.append(("train", domain.train_shards))
        splits.append(("eval", domain.eval_shards))
        for split, shards in splits:
            verdict = _probe(shards, d, collate, probe)
            if verdict is not None:
                stats = verdict
                failed.append(f"{domain.name} ({split})")
                for key in ("image_tokens", "answer_starts"):
                    seen[key] = max(seen.get(key, 0), stats.get(key, 0))
                seen["text_lm"] = seen.get("text_lm") or stats.get("text_lm")
    if failed:
        names = ", ".join(failed[:6]) + (f" and {len(failed) - 6} more" if len(failed) > 6 else "")
        head = f"none of the first {probe} samples of {names} can be trained on"
        raise DataError(needed_length(head, seen, getattr(collate, "max_length", None)))


def check_images_per_sample(domains: Domains, family) -> None:
    """A model family that takes one image per sample refuses a manifest holding multi-image samples, at the start,
    in one line naming the family (rather than dropping those samples one warning at a time)."""
    max_images = int((domains.manifest.get("input") or {}).get("max_images") or 0)
    if family is not None and max_images > 1 and not family.multi_image:
        raise DataError(
            f"model family '{family.model_type}' takes one image per sample, and this manifest holds samples with up "
            f"to {max_images} images: train a family that takes several (the README's family table, multi-image "
            "column), or regroup without the multi-image records"
        )


def _probe(shards, d: int, collate, probe: int):
    """None when one of the first `probe` samples keeps a label token (or there are none to try); else why not:
    the most image tokens seen, and the length that keeps an answer token of every sample tried."""
    tried, stats = 0, {}
    try:
        for shard in shards:
            for raw in read_shard(shard, stop=probe - tried):
                tried += 1
                try:
                    sample = decode(raw)
                except DataError:
                    continue  # a sample that does not decode is the stream's to count and name
                batch, info = collate([sample], [d])
                if batch is not None and int(info["label_tokens"].sum()) > 0:
                    return None
                family = getattr(collate, "family", None)
                if getattr(family, "kind", None) == "text" and (
                    sample.get("images") or sample.get("image") is not None
                ):
                    stats["text_lm"] = family.model_type  # a sample with an image, for a model that reads no image
                stats["image_tokens"] = max(stats.get("image_tokens", 0), info.get("image_tokens", 0))
                stats["answer_starts"] = max(stats.get("answer_starts", 0), _answer_start(collate, sample, d))
            if tried >= probe:
                break
    except ShardError:
        return None
    return stats if tried else None


def _answer_start(collate, sample: dict, d: int) -> int:
    """The shortest max_length that keeps the sample's first answer token, from its uncut encoding (0: none)."""
    uncut = copy.copy(collate)
    uncut.max_length = 1 << 30
    batch, _ = uncut([sample], [d])
    if batch is None:
        return 0
    answer = (batch["labels"][0, 1:] != -100).nonzero()
    return int(answer[0]) + 2 if len(answer) else 0


def needed_length(head: str, seen: dict, max_length: int | None) -> str:
    """`head`, then what the data needs: which `data.max_length` keeps the image tokens and the first answer token."""
    if seen.get("text_lm"):
        model = "the model" if seen["text_lm"] == "text" else seen["text_lm"]
        return (
            f"{head}: its samples have images, and {model} is a text-only LM; train a vision-language model.name "
            f"on them, or regroup text-only data for this model"
        )
    image, answer = seen.get("image_tokens", 0), seen.get("answer_starts", 0)
    why = []
    if image:
        why.append(f"image tokens {image} > data.max_length {max_length}")
    if answer:
        why.append(f"the answers start after data.max_length {max_length} (at token {answer - 1})")
    if image and not answer:
        return f"{head}: {why[0]}; set data.max_length above {image} (room for the text)"
    if why:
        return f"{head}: {' and '.join(why)}; set data.max_length >= {max(answer, image + 1)}"
    if max_length is not None:
        return f"{head}: every one was dropped or has no answer tokens (longer than data.max_length {max_length}? data.overlong=drop?, no assistant turn?)"  # fmt: skip
    return f"{head}: every one was dropped (does any sample decode?)"
