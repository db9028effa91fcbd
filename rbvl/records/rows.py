"""One row of any JSON, JSONL, Parquet or Arrow source → a Record or a Reject, whatever shape the row has.

    item = row_record(row, "train.parquet[3]", opts, root=Path("data/images"), default_id="train-3")

Row shapes, detected by column name (or named by `ReadOptions.conversation_field` / `image_field` / `id_field` /
`prompt_field` / `response_field`); docs/formats.md shows one example of each:

  conversation  `conversations` / `conversation` / `messages`: LLaVA and ShareGPT `from/value` (human/gpt or
                user/assistant), OpenAI and TRL `role/content`, content a string or parts ({"type": "image"} /
                {"type": "text", "text": ...}); images in `images` or `image`: a path, a list of paths, Hugging Face
                `Image` values ({"bytes", "path"}) or raw bytes. Several images make a multi-image record: the k-th
                image fills the k-th `<image>` placeholder.
  pair          prompt / question / instruction (+ input) → response / answer / output / completion / solution
                (Alpaca and prompt/response JSONL, text-only Parquet); with an image column (VQA-style: image,
                question, answer) one `<image>` per image goes before the prompt
  s1            S1-59k reasoning traces: question → thinking_trajectories + attempt (`prompt_field` and
                `response_field` name other question and answer columns; without `attempt`, `solution`)

A row with none of these is a `missing_field` reject whose detail lists the columns looked for and those the row has,
so a person sees at once which flag to pass.
"""

from __future__ import annotations

from pathlib import Path

from rbvl.records.record import IMAGE_TOKEN, Record, Reject, normalise_conversation

CONVERSATION_FIELDS = ("conversations", "conversation", "messages")
IMAGE_FIELDS = ("images", "image")
PROMPT_FIELDS = ("prompt", "question", "instruction", "query", "input")
RESPONSE_FIELDS = ("response", "answer", "output", "completion", "solution")
TRAJECTORY_FIELD = "thinking_trajectories"  # S1: the reasoning before the attempt

# What each preset embeds and which column is the original label.
PRESETS = {
    "llava": {"text_fields": None, "label_field": "domain"},  # text = the user turns
    "s1": {"text_fields": ["question"], "label_field": "source_type"},
    "text": {"text_fields": None, "label_field": "domain"},  # prompt/question/instruction → response/answer/output
}


def row_record(row, source: str, opts, root: Path | None, default_id: str, images=None) -> Record | Reject:
    """`row` (a dict) → Record or Reject. `default_id` names a row without an `id` (FILESTEM-ROW, a tar key); only a
    column named by `opts.id_field` is required. `images` = [(bytes, ext), ...] when the images came beside the row (a
    tar shard); otherwise they are read from the row's image column."""
    if not isinstance(row, dict):
        got = _JSON_TYPES.get(type(row), type(row).__name__)
        return Reject(None, source, "malformed_conversation", f"expected an object (a record), got {got}")
    id_field = opts.id_field or "id"
    if opts.id_field and row.get(id_field) is None:
        return Reject(None, source, "missing_field", f"no '{id_field}'; the row has: {row_keys(row)}")
    rid = str(row[id_field]) if row.get(id_field) is not None else default_id
    field = conversation_field(row, opts)
    if field is not None:
        return _chat_record(row, field, rid, source, opts, root, images)
    if opts.conversation_field:
        return Reject(rid, source, "missing_field", f"no '{opts.conversation_field}'; the row has: {row_keys(row)}")
    return _pair_record(row, rid, source, opts, root, images)


def pair_row(row: dict, opts) -> bool:
    """Whether `row` reads as a prompt/response pair or an S1 trace (no conversation column needed)."""
    return _is_s1(row, opts) or all(_pair_fields(row, opts))


def conversation_field(row: dict, opts) -> str | None:
    names = [opts.conversation_field] if opts.conversation_field else CONVERSATION_FIELDS
    return next((name for name in names if row.get(name) is not None), None)


def describe_row(row, opts) -> str:
    """How `row` is read, in a few words (what `--format auto` chose), e.g. "chat turns in `messages`, images in
    `images`"."""
    if not isinstance(row, dict):
        return "rows that are not objects"
    _, image_field = _image_values(row, opts)
    looked = "`, `".join([opts.image_field] if opts.image_field else IMAGE_FIELDS)
    images = (
        f"images in `{image_field}`"
        if image_field
        else f"no image in its first row (later rows with `{looked}` bring theirs)"
    )
    if not image_field:
        like = [k for k, v in row.items() if _image_like(v)]
        images += f"; `{like[0]}` holds images: pass --image-field {like[0]}" if like else ""
    field = conversation_field(row, opts)
    if field is not None:
        return f"chat turns in `{field}`, {images}"
    if _is_s1(row, opts):
        question, trajectory, answer = _s1_fields(row, opts)
        parts = " + ".join(f"`{f}`" for f in (trajectory, answer) if f) or "no answer column"
        missing = [f"no `{TRAJECTORY_FIELD}`" if not trajectory else "", "no `attempt`" if answer == "solution" else ""]
        missing = "; ".join(m for m in missing if m)
        return f"S1 reasoning traces (`{question}` → {parts})" + (f"; its first row has {missing}" if missing else "")
    prompt, response = _pair_fields(row, opts)
    if prompt and response:
        return f"prompt/response pairs (`{prompt}` → `{response}`), {images}"
    return f"rows with none of the known columns (they have: {row_keys(row)})"


# ---------------------------------------------------------------------------------------------------------------------
# Conversations with images
# ---------------------------------------------------------------------------------------------------------------------


def _chat_record(row: dict, field: str, rid: str, source: str, opts, root: Path | None, images) -> Record | Reject:
    conversation, problem = normalise_conversation(row[field])
    if problem:
        return Reject(rid, source, *problem)
    values = list(images) if images is not None else _image_values(row, opts)[0]
    return _with_images(
        row,
        conversation,
        values,
        rid,
        source,
        opts,
        root,
        "llava" if field in ("conversations", "conversation") else "chat",
    )


def _with_images(row, conversation, values, rid, source, opts, root, fmt) -> Record | Reject:
    """A Record of `conversation` with the images `values` (checked against its `<image>` placeholders), or a Reject."""
    n_tokens = sum(t["content"].count(IMAGE_TOKEN) for t in conversation)
    if n_tokens != len(values):
        return Reject(rid, source, "image_placeholder_mismatch", f"{n_tokens} '<image>' for {len(values)} image(s)")
    refs = []
    for value in values:
        ref = _image_ref(value, root, opts)
        if isinstance(ref, tuple):
            return Reject(rid, source, *ref)
        refs.append(ref)
    record = Record(rid, conversation, label=_label(row, opts, "domain"), meta={"format": fmt}, source=source)
    if refs:
        first, *record.more_images = refs
        if "data" in first:
            record.image, record.image_ext = first["data"], first["ext"]
        else:
            record.image_path = first["path"]
    record.text = _text(row, conversation, opts)
    return record


def _image_values(row: dict, opts) -> tuple[list, str | None]:
    """The row's images (paths, {"bytes", "path"} dicts or bytes), in order, and the column they came from."""
    names = [opts.image_field] if opts.image_field else IMAGE_FIELDS
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        return [x for x in items if not _empty(x)], name
    return [], None


def _image_like(value) -> bool:
    """Whether a column's value looks like images: image bytes, a Hugging Face `Image` value ({"bytes", "path"})
    holding them, or a list of those."""
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        return False
    head = bytes(value[:12])
    return head.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM")) or (head[:4] == b"RIFF" and head[8:] == b"WEBP")


def _empty(value) -> bool:
    if isinstance(value, dict):
        return value.get("bytes") is None and not value.get("path")
    return value is None or value == "" or value == b""


def _image_ref(value, root: Path | None, opts) -> dict | tuple[str, str]:
    """{"data", "ext"} for image bytes, {"path"} for a file checked to exist inside the image root, or (reason,
    detail) for an image that cannot be used. `value` is a path, bytes, a {"bytes", "path"} dict or (bytes, ext)."""
    if isinstance(value, tuple):  # from a tar shard: the extension is the member's
        return {"data": value[0], "ext": value[1]}
    if isinstance(value, dict) and value.get("bytes") is not None:  # a Hugging Face `Image` value with its bytes
        data = bytes(value["bytes"])
        return {"data": data, "ext": _sniff(data, value.get("path"))}
    if isinstance(value, (bytes, bytearray)):
        return {"data": bytes(value), "ext": _sniff(bytes(value), None)}
    name = value.get("path") if isinstance(value, dict) else value
    if not isinstance(name, str):
        got = _JSON_TYPES.get(type(name), type(name).__name__)
        return "unreadable_image", f"the image entry is {got}, {name!r:.40}; expected a path or bytes"
    root = root or Path(".")
    file = Path(name) if Path(name).is_absolute() else root / name
    if not file.is_file():
        what = "is a folder, not an image file" if file.is_dir() else "no such file"
        return "missing_image", f"{str(file)!r}: {what}" if name != name.strip() else f"{file}: {what}"
    resolved = file.resolve()
    if not opts.allow_outside_root and not resolved.is_relative_to(root.resolve()):
        return "image_outside_root", f"{name} resolves to {resolved}, outside {root}"
    return {"path": str(resolved)}


def _sniff(data: bytes, name: str | None) -> str:
    """The extension of image bytes: from their magic number, else the file name they came with (a hint: the shard
    writer follows the content)."""
    for magic, ext in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp")):
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = Path(name).suffix.lower().lstrip(".") if name else ""
    return {"jpeg": "jpg"}.get(suffix, suffix) or "png"


# ---------------------------------------------------------------------------------------------------------------------
# Text-only rows: prompt / response pairs and S1 traces
# ---------------------------------------------------------------------------------------------------------------------


def _is_s1(row: dict, opts) -> bool:
    return (opts.preset or ("s1" if TRAJECTORY_FIELD in row else "text")) == "s1"


def _s1_fields(row: dict, opts) -> tuple[str, str | None, str | None]:
    """An S1 row's question column (`--prompt-field`, default `question`), its trajectory column if it has one, and
    its final-answer column (`--response-field`; default `attempt`, else `solution`) if it has one."""
    question = opts.prompt_field or "question"
    trajectory = TRAJECTORY_FIELD if row.get(TRAJECTORY_FIELD) else None
    answers = [opts.response_field] if opts.response_field else ["attempt", "solution"]
    return question, trajectory, next((f for f in answers if row.get(f)), None)


def _s1_looked_for(opts) -> str:
    answers = opts.response_field or "attempt|solution"
    return f"{opts.prompt_field or 'question'} + {TRAJECTORY_FIELD} and/or {answers}"


def _pair_fields(row: dict, opts) -> tuple[str | None, str | None]:
    prompts = [opts.prompt_field] if opts.prompt_field else PROMPT_FIELDS
    responses = [opts.response_field] if opts.response_field else RESPONSE_FIELDS
    return next((f for f in prompts if row.get(f)), None), next((f for f in responses if row.get(f)), None)


def _pair_record(row: dict, rid: str, source: str, opts, root: Path | None, images=None) -> Record | Reject:
    """A prompt/response or S1 row → Record. An image column beside the prompt (VQA-style: image, question,
    answer), or images beside the row (a tar shard), put one `<image>` per image before the prompt, as LLaVA writes
    it. Text that holds `<image>` itself must hold one per image: a row with placeholders and no image is rejected,
    as a conversation's is."""
    preset = "s1" if _is_s1(row, opts) else "text"
    trajectory = ""
    if preset == "s1":
        question_field, trajectory_field, answer_field = _s1_fields(row, opts)
        question = row.get(question_field)
        trajectory = row.get(trajectory_field) if trajectory_field else []
        steps = trajectory if isinstance(trajectory, list) else [trajectory]
        values = [*steps, question, row.get(answer_field) if answer_field else ""]
        texts = [_text_of(x) for x in values]
        if any(t is None for t in texts):
            bad = next(x for x, t in zip(values, texts, strict=True) if t is None)
            return Reject(rid, source, "malformed_conversation", f"S1 text is {_json_type(bad)}, not text: {bad!r:.60}")
        trajectory = "\n".join(t for t in texts[: len(steps)] if t)
        question = texts[len(steps)]
        answer = "\n\n".join(x for x in (trajectory, texts[-1]) if x)
    else:
        prompt, response = _pair_fields(row, opts)
        question, answer = row.get(prompt) if prompt else None, row.get(response) if response else None
        for field, value in ((prompt, question), (response, answer)):
            if value is not None and _text_of(value) is None:
                why = f"'{field}' is {_json_type(value)}, not text: {value!r:.60}"
                return Reject(rid, source, "malformed_conversation", why)
        question, answer = _text_of(question), _text_of(answer)
        if question and prompt == "instruction" and row.get("input"):  # Alpaca: the input goes under the instruction
            question = f"{question}\n\n{row['input']}"
    if not question or not answer or not answer.strip():
        looked = _s1_looked_for(opts) if preset == "s1" else _looked_for(opts)
        return Reject(rid, source, "missing_field", f"looked for {looked}; the row has: {row_keys(row)}")
    conversation = [{"role": "user", "content": str(question)}, {"role": "assistant", "content": str(answer)}]
    values = list(images) if images is not None else _image_values(row, opts)[0]
    if not values and any(IMAGE_TOKEN in turn["content"] for turn in conversation):
        n = sum(turn["content"].count(IMAGE_TOKEN) for turn in conversation)
        return Reject(rid, source, "image_placeholder_mismatch", f"{n} '<image>' for 0 image(s)")
    if values and IMAGE_TOKEN not in conversation[0]["content"]:
        conversation[0]["content"] = f"{IMAGE_TOKEN}\n" * len(values) + conversation[0]["content"]
    if values:
        return _with_images(row, conversation, values, rid, source, opts, root, "vqa")
    text = _text(row, conversation, opts, preset=preset)
    if preset == "s1" and opts.with_trajectory and trajectory:
        text = f"{text}\n{trajectory}"
    label = _label(row, opts, PRESETS[preset]["label_field"], preset)
    return Record(rid, conversation, label=label, text=text, meta={"format": preset}, source=source)


def _text_of(value) -> str | None:
    """A prompt's or answer's text: a string as it is, a number or true / false as JSON writes it; None for a list or
    an object, which the caller rejects rather than embed and train on its Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # true / false, as JSON writes them (a yes/no answer)
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None if value is not None else ""


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), "an object")


def _looked_for(opts) -> str:
    if opts.conversation_field:
        return f"'{opts.conversation_field}'"
    prompts = opts.prompt_field or "|".join(PROMPT_FIELDS)
    responses = opts.response_field or "|".join(RESPONSE_FIELDS)
    return f"a conversation ({'|'.join(CONVERSATION_FIELDS)}) or a prompt ({prompts}) with a response ({responses})"


def row_keys(row: dict) -> str:
    """The row's columns, each empty one (null, "", []) marked: a column that is there but empty is no help either."""
    keys = [
        f"{k} (empty)" if v is None or (isinstance(v, (str, list, dict)) and not v) else str(k) for k, v in row.items()
    ]
    return ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "") if keys else "no fields"


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Label and embedded text
# ---------------------------------------------------------------------------------------------------------------------


def _label(row: dict, opts, default: str, preset: str | None = None) -> str | None:
    preset = opts.preset or preset
    name = opts.label_field or PRESETS.get(preset or "", {}).get("label_field") or default
    value = row.get(name)
    return None if value is None else str(value)


def _text(row: dict, conversation: list[dict], opts, preset: str | None = None) -> str:
    fields = opts.text_fields or PRESETS.get(opts.preset or preset or "", {}).get("text_fields")
    if fields:
        return "\n".join(str(row[f]) for f in fields if row.get(f))
    users = [t["content"].replace(IMAGE_TOKEN, "").strip() for t in conversation if t["role"] == "user"]
    return "\n".join(u for u in users if u)
