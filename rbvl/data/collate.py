"""Samples → model inputs for every family: chat template, image placeholders, assistant-only labels, projector rows.

    encoder = Encoder(processor, max_length=512)                 # the family comes from the processor's class
    batch, stats = encoder(samples, domain_ids)                   # samples: {"id", "conversation", "image"/"images"}

How labels stay right whatever the template or the image expansion. Each assistant turn is a character span of the
rendered (unexpanded) chat text: from where the conversation rendered up to that turn with the generation prompt
stops matching the full text, to where the conversation rendered through that turn does. The processor expands each
image placeholder (LLaVA's 576 `<image>`, Qwen2-VL's t·h·w/4 `<|image_pad|>`, Idefics3's tiles, Gemma 3's
`<start_of_image>` block) and reports where (`return_text_replacement_offsets`); the spans move by those
replacements, and a token is labelled when the tokenizer's character offset of its start falls inside a span. One
processor call per batch, no per-family branch. PaliGemma is a prefix-LM: its prompt is a bidirectional prefix
(`token_type_ids` 0) and only the last assistant turn is the suffix the loss reads (as its processor's `suffix`).

`image_domain_ids` gives the domain of each row the projector sees, in order: per image, per any-resolution tile, per
Idefics3 split, or per Qwen merged patch token (the family table's `projector_rows`), so GradientTracker can give
each projector row its sample's domain.
"""

from __future__ import annotations

import logging

import torch

from rbvl.model.families import FAMILIES, Family
from rbvl.records.images import ImageRejected, check_aspect

log = logging.getLogger(__name__)

MARKER = "<image>"  # how rbvl records mark an image inside a turn's text (docs/formats.md)
TEXT_ONLY = Family("text", kind="text", language_model="", multi_image=False)
PER_TOKEN = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def family_of_processor(processor) -> Family:
    """The family whose processor class `processor` is (a bare tokenizer: a text-only LM)."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if isinstance(processor, PreTrainedTokenizerBase):
        return TEXT_ONLY
    name = type(processor).__name__
    for fam in FAMILIES.values():
        if PROCESSOR_MAPPING_NAMES.get(fam.model_type) == name:
            return fam
    token = getattr(processor, "image_token", MARKER)
    log.warning("collate: no family entry for %s; one projector row per image, placeholder %r", name, token)
    return Family(name, image_token=token)


class Encoder:
    """Conversations → model inputs with the processor's chat template; loss only on assistant turns.

    Over-long samples (more than `max_length` tokens, image tokens included): `truncate` keeps the first max_length
    tokens unless that would cut an image's tokens (the model would then see fewer image tokens than image
    features), in which case the sample is dropped; `drop` drops every over-long sample. Both are counted. A sample
    the family cannot take (an image for a text-only LM, more images than placeholders) is dropped, counted, logged;
    so is one whose image's sides differ by more than `images.MAX_ASPECT` (50:1), before the processor resizes it.
    """

    def __init__(self, processor, max_length: int = 512, overlong: str = "truncate", family: Family | None = None):
        self.processor = processor
        self.family = family or family_of_processor(processor)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length, self.overlong = max_length, overlong
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._image_token_id = getattr(processor, "image_token_id", None)

    def __call__(self, samples: list[dict], domain_ids: list[int]):
        """Returns (model inputs, or None when every sample was dropped; info).

        info: "truncated" and "dropped" counts, "domain_ids" (B,), "image_domain_ids" (rows,): the domain of each
        row the projector sees, in its order (per image, tile or merged patch: the family's `projector_rows`),
        "label_tokens" (B,).
        """
        stats = {"truncated": 0, "dropped": 0}
        prepared = []  # (sample index, messages, images)
        for i, s in enumerate(samples):
            item = self._prepare(s)
            if item is None:
                stats["dropped"] += 1
                continue
            prepared.append((i, *item))
        if not prepared:
            return None, stats
        enc, lengths, last_image = self._encode(prepared)
        keep = []
        for k, length in enumerate(lengths):
            if length > self.max_length:
                if self.overlong == "drop" or last_image[k] >= self.max_length:
                    stats["dropped"] += 1
                    if last_image[k] >= self.max_length:  # the tokens its image needs (for the stream's message)
                        stats["image_tokens"] = max(stats.get("image_tokens", 0), int(last_image[k]) + 1)
                    continue
                stats["truncated"] += 1
            keep.append(k)
        if not keep:
            return None, stats
        if len(keep) < len(prepared):  # pixel tensors are laid out per family: encode the kept samples again
            prepared = [prepared[k] for k in keep]
            enc, lengths, _ = self._encode(prepared)
        batch = self._truncate(enc)
        if batch is not enc and not (batch["labels"][:, 1:] != -100).any():  # every answer cut off: where do they start
            starts = [int(row.nonzero()[0]) + 2 for row in enc["labels"][:, 1:] != -100 if row.any()]
            stats["answer_starts"] = min(starts, default=0)  # the length that keeps the first answer token
        domains = torch.tensor([domain_ids[i] for i, _, _ in prepared], dtype=torch.long)
        rows = projector_rows(self.family, batch, [len(images) for _, _, images in prepared], self.processor)
        info = {
            **stats,
            "domain_ids": domains,
            "image_domain_ids": domains.repeat_interleave(rows),
            "label_tokens": (batch["labels"][:, 1:] != -100).sum(1),
        }
        return batch, info

    # -- one sample -----------------------------------------------------------------------------------------------

    def _prepare(self, sample: dict):
        """(messages, images) of one sample, or None (logged) when the family cannot take it."""
        images = list(sample.get("images") or ([sample["image"]] if sample.get("image") is not None else []))
        messages = to_messages(sample["conversation"])
        n_marked = sum(part["type"] == "image" for m in messages for part in _parts(m))
        key = sample.get("id", "?")
        if self.family.kind == "text":
            if images or n_marked:
                log.warning("dropping sample %s: it has an image and %s is a text-only LM", key, self.family.model_type)
                return None
            return [{"role": m["role"], "content": _text(m)} for m in messages], []
        if images and n_marked == 0:  # an image without a marker goes before the first user text (LLaVA's habit)
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is not None:
                first["content"] = [{"type": "image"}] * len(images) + _parts(first)
                n_marked = len(images)
        if n_marked != len(images):
            log.warning("dropping sample %s: %d image markers for %d images", key, n_marked, len(images))
            return None
        if len(images) > 1 and not self.family.multi_image:
            log.warning("dropping sample %s: %s takes one image per sample", key, self.family.model_type)
            return None
        for image in images:  # before the processor: it resizes the short side, so a sliver would blow up
            try:
                check_aspect(image.size)
            except ImageRejected as e:
                log.warning("dropping sample %s: %s", key, e)
                return None
        return messages, images

    # -- the batch ------------------------------------------------------------------------------------------------

    def _encode(self, prepared):
        """Processor outputs (plus labels) for `prepared`, each sample's length and the index of its last image token."""
        if self.family.prefix_lm:
            return self._encode_prefix_lm(prepared)
        texts, spans = [], []
        for _, messages, _ in prepared:
            text, turn_spans = render_with_spans(self.processor, messages)
            texts.append(text)
            spans.append(turn_spans)
        bos = self.tokenizer.bos_token
        kwargs = dict(
            padding=True,
            padding_side="right",
            return_tensors="pt",
            return_offsets_mapping=True,
            add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),  # templates that write <bos>
        )
        images = [images for _, _, images in prepared]
        if not self.tokenizer.is_fast:
            raise ValueError(f"{type(self.tokenizer).__name__} is a slow tokenizer: rbvl's labels need a fast one")
        if self.family.kind == "text":
            enc = dict(self.tokenizer(texts, **kwargs))
            replaced = [[] for _ in texts]
        else:
            from transformers import BatchFeature

            image_kwargs = {"images": images, "return_text_replacement_offsets": True} if any(images) else {}
            some_without = self.family.projector_rows == "samples" and any(images) and not all(images)
            # tensors made here, after the offsets (a list of dicts) are out: Idefics3's processor tries to make them
            # a tensor too when every sample has as many images
            if some_without:  # Mllama's processor leaves <|image|> as it is: the tokenizer gives the same ids
                enc = dict(self.tokenizer(texts, **{**kwargs, "return_tensors": None}))
            else:
                enc = dict(self.processor(text=texts, **{**kwargs, "return_tensors": None}, **image_kwargs))
            replaced = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
            if some_without:
                enc.update(mllama_images(self.processor, enc["input_ids"], images))
            enc = dict(BatchFeature(enc, tensor_type="pt"))
        offsets = enc.pop("offset_mapping")  # (B, T, 2) in the expanded text
        mask = enc["attention_mask"].bool()
        labels = torch.full_like(enc["input_ids"], -100)
        last_image = []
        for b in range(len(texts)):
            starts = offsets[b, :, 0]  # (T,)
            real = mask[b] & (offsets[b, :, 1] > starts)
            for start, end in spans[b]:
                start, end = _moved(start, replaced[b]), _moved(end, replaced[b])
                inside = real & (starts >= start) & (starts < end)
                labels[b, inside] = enc["input_ids"][b, inside]
            ends = [r["new_span"][1] for r in replaced[b]]
            if ends:
                last_image.append(int((mask[b] & (starts < max(ends))).nonzero().max()))
            elif images[b]:  # a placeholder the processor keeps as it is (Mllama's <|image|>): its last position
                last_image.append(int((enc["input_ids"][b] == self._image_token_id).nonzero().max()))
            else:
                last_image.append(-1)
        enc["labels"] = labels
        return enc, mask.sum(1).tolist(), last_image

    def _encode_prefix_lm(self, prepared):
        """PaliGemma: [image tokens] <bos> prompt \\n | answer <eos>, token_type_ids 0 | 1, labels on the answer."""
        tok, proc = self.tokenizer, self.processor
        rows, types, last_image = [], [], []
        for _, messages, images in prepared:
            answer_at = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            prompt = "\n".join(_text(m) for m in messages[:answer_at])
            answer = "".join(_text(m) for m in messages[answer_at:])
            n_image = len(images) * proc.image_seq_length
            prefix = [proc.image_token_id] * n_image + tok(f"{tok.bos_token}{prompt}\n", add_special_tokens=False)[
                "input_ids"
            ]
            suffix = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"] if answer else []
            rows.append(prefix + suffix)
            types.append([0] * len(prefix) + [1] * len(suffix))
            last_image.append(n_image - 1)
        width = max(len(r) for r in rows)
        enc = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "token_type_ids": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), width), -100, dtype=torch.long),
        }
        for b, (ids, tt) in enumerate(zip(rows, types)):
            ids, tt = torch.tensor(ids), torch.tensor(tt)
            enc["input_ids"][b, : len(ids)] = ids
            enc["attention_mask"][b, : len(ids)] = 1
            enc["token_type_ids"][b, : len(ids)] = tt
            enc["labels"][b, : len(ids)] = torch.where(tt == 1, ids, -100)
        flat = [image for _, _, images in prepared for image in images]
        if flat:
            enc["pixel_values"] = proc.image_processor(flat, return_tensors="pt")["pixel_values"]
        return enc, [len(r) for r in rows], last_image

    def _truncate(self, enc: dict) -> dict:
        """Cut the per-token tensors (B, T) to max_length: rows are right-padded, so each keeps its first max_length
        tokens. Pixel tensors are left alone (a sample whose image tokens would be cut was dropped)."""
        width = enc["input_ids"].shape[1]
        if width <= self.max_length:
            return enc
        return {k: v[:, : self.max_length] if k in PER_TOKEN and v.shape[1] == width else v for k, v in enc.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------------


def render_with_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat text and the character span of each assistant turn in it (its end-of-turn marker included)."""

    def render(msgs, prompt=False):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            start = _common_prefix(render(messages[:j], True), full) if j else 0
            spans.append((start, _common_prefix(render(messages[: j + 1]), full)))
    return full, spans


def projector_rows(family: Family, batch: dict, n_images: list[int], processor) -> torch.Tensor:
    """(B,) how many rows each sample adds to the projector's input batch, following the model's own code."""
    n = torch.tensor(n_images, dtype=torch.long)
    if family.kind == "text" or "pixel_values" not in batch:
        return torch.zeros_like(n)
    pixels = batch["pixel_values"]
    if family.projector_rows == "patches":  # Qwen2-VL: t·h·w patches per image, merged merge² → 1 before the MLP
        merge = processor.image_processor.merge_size
        per_image = batch["image_grid_thw"].prod(-1) // merge**2  # (n_images,)
        return torch.stack([part.sum() for part in per_image.split(n_images)]) if len(n) else n
    if family.projector_rows == "samples":  # Mllama: the vision output keeps the batch dimension
        return torch.ones_like(n)
    if family.projector_rows == "tokens":  # InternVL: image_seq_length image tokens per tile, tiles flattened
        tiles = (batch["input_ids"] == processor.image_token_id).sum(1) // processor.image_seq_length
        return tiles.long()
    if family.projector_rows == "tiles":  # Idefics3: the model drops all-zero padding tiles; so do we
        real = (pixels != 0).flatten(2).any(-1)  # (B, max tiles)
        return real.sum(1)
    if family.projector_rows == "anyres":  # LLaVA-NeXT / OneVision: tiles of the best any-resolution grid
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        grid = processor.image_processor.image_grid_pinpoints
        single = "batch_num_images" in batch  # OneVision tiles only samples with one image
        sizes = batch["image_sizes"].tolist()
        per_image, k = [], 0
        for count in n_images:
            for _ in range(count):
                tiled = not single or count == 1
                per_image.append(image_size_to_num_patches(sizes[k], grid, pixels.shape[-1]) if tiled else 1)
                k += 1
        per_image = torch.tensor(per_image, dtype=torch.long)
        return torch.stack([part.sum() for part in per_image.split(n_images)])
    return n  # one row per image


def mllama_images(processor, input_ids: list[list[int]], images: list[list]) -> dict:
    """Mllama's image inputs for a batch in which some samples have no image, laid out as its processor would.

    Its image processor (transformers 5.23) fails on a batch whose first sample has no image and drops the aspect
    ratios of trailing ones, so the samples with images are processed alone and their rows placed back; the others
    get zero pixels, aspect ratio id 0 (padding) and no cross-attention."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    have = [b for b, imgs in enumerate(images) if imgs]
    feats = processor.image_processor([images[b] for b in have], return_tensors="pt")
    pixels, ids, mask = feats["pixel_values"], feats["aspect_ratio_ids"], feats["aspect_ratio_mask"]
    out = {
        "pixel_values": pixels.new_zeros((len(images), *pixels.shape[1:])),
        "aspect_ratio_ids": ids.new_zeros((len(images), *ids.shape[1:])),
        "aspect_ratio_mask": mask.new_zeros((len(images), *mask.shape[1:])),
    }
    out["aspect_ratio_mask"][:, :, 0] = 1  # as the processor pads a missing image
    for key, value in (("pixel_values", pixels), ("aspect_ratio_ids", ids), ("aspect_ratio_mask", mask)):
        out[key][have] = value
    tiles = [[] for _ in images]
    for b, n in zip(have, feats["num_tiles"]):
        tiles[b] = n
    sparse = [get_cross_attention_token_mask(ids_b, processor.image_token_id) for ids_b in input_ids]
    max_tiles = processor.image_processor.max_image_tiles
    dense = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, max_tiles, max(map(len, input_ids)))
    out["cross_attention_mask"] = torch.from_numpy(dense)
    return out


def to_messages(conversation: list[dict]) -> list[dict]:
    """rbvl turns (`<image>` in the text) → chat-template messages with typed content parts."""
    messages = []
    for turn in conversation:
        text = turn["content"]
        if MARKER not in text:
            parts = [{"type": "text", "text": text}]
        else:
            parts = []
            for k, piece in enumerate(text.split(MARKER)):
                if k:
                    parts.append({"type": "image"})
                piece = piece.strip("\n") if k else piece
                if piece:
                    parts.append({"type": "text", "text": piece})
        messages.append({"role": turn["role"], "content": parts})
    return messages


def _parts(message: dict) -> list[dict]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _text(message: dict) -> str:
    return "".join(p["text"] for p in _parts(message) if p["type"] == "text")


def _moved(position: int, replacements: list[dict]) -> int:
    """A character position of the unexpanded text, in the text with the image placeholders expanded."""
    shift = 0
    for r in replacements:
        start, end = r["span"]
        if end <= position:
            shift += (r["new_span"][1] - r["new_span"][0]) - (end - start)
    return position + shift


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
