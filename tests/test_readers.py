"""Readers: each input format becomes Records, every bad record a Reject with its reason and source."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from rbvl.records import (
    ReadOptions,
    Record,
    RecordsError,
    RecordSpool,
    Reject,
    Rejects,
    read_records,
    sanitize_key,
)


def png(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def turns(q, a, image=False):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def split(items):
    items = list(items)
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Reject)]


def test_llava_json_and_every_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    rows = [
        {"id": "ok.1", "image": "a.png", "conversations": turns("What?", "A", True), "domain": "d1"},
        {"id": "text", "conversations": turns("Hi?", "yo"), "domain": "d2"},
        {"id": "missing", "image": "nope.png", "conversations": turns("Q?", "A", True)},
        {"id": "empty", "conversations": []},
        {"id": "blank", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": ""}]},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "Q?"}]},
        {"id": "badrole", "conversations": [{"from": "robot", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
        {"id": "twoplaceholders", "image": "a.png", "conversations": turns("<image> twice?", "A", True)},
        {"id": "placeholder_no_image", "conversations": turns("Q?", "A", True)},
        {"id": "two", "images": ["a.png", "a.png"], "conversations": turns("Q?", "A", True)},
        {"id": "text", "conversations": turns("again", "b")},
        {"conversations": turns("no id", "b")},  # named after the file and its row
        "not an object",
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    records, rejects = split(read_records([str(path)]))
    assert [r.id for r in records] == ["ok.1", "text", "train-11"]
    ok = records[0]
    assert ok.conversation[0] == {"role": "user", "content": "<image>\nWhat?"} and ok.label == "d1"
    assert ok.text == "What?" and ok.image is None and ok.load_image() == (png(), "png")
    assert records[1].load_image() is None
    reasons = {r.id: r.reason for r in rejects}
    assert reasons == {
        "missing": "missing_image",
        "empty": "empty_conversation",
        "blank": "empty_conversation",
        "noanswer": "malformed_conversation",
        "badrole": "malformed_conversation",
        "twoplaceholders": "image_placeholder_mismatch",
        "placeholder_no_image": "image_placeholder_mismatch",
        "two": "image_placeholder_mismatch",  # two images, one <image>
        "text": "duplicate_id",
        None: "malformed_conversation",
    }
    assert all(r.source.startswith(str(path) + "[") for r in rejects)
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]", f"{path}[11]"]
    assert len(records) + len(rejects) == len(rows)


def test_jsonl_bad_line_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png())
    lines = [
        json.dumps({"id": "a", "image": "x.png", "conversations": turns("Q", "A", True)}),
        "{oops",
        json.dumps({"id": "b", "conversations": turns("Q", "A")}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, rejects = split(read_records(str(path), ReadOptions(image_root=str(tmp_path / "imgs"))))
    assert [r.id for r in records] == ["a", "b"]
    assert [(r.reason, r.source) for r in rejects] == [("bad_json", f"{path}:2")]
    path.write_text('{"id": "a", "q": \n{"id": "b", "q": "x\ty"}\n')  # the position is within the line
    assert [r.detail for r in read_records(str(path))] == [
        "Expecting value at the end of the line",
        "Invalid control character at column 20",
    ]


def test_reject_details_say_what_the_row_lacks(tmp_path):
    """A line that is JSON but no object says what it is; a column that is there but empty is named as empty."""
    lines = [json.dumps({"id": "v", "question": "What?", "answer": None}), "[1, 2, 3]", '"a string line"', "7"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, rejects = split(read_records(str(path)))
    assert not records
    assert [r.detail for r in rejects] == [
        "looked for a conversation (conversations|conversation|messages) or a prompt (prompt|question|instruction|"
        "query|input) with a response (response|answer|output|completion|solution); the row has: id, question, "
        "answer (empty)",
        "expected an object (a record), got an array",
        "expected an object (a record), got a string",
        "expected an object (a record), got a number",
    ]


def test_file_tags_tell_files_of_one_stem_apart():
    from rbvl.records.readers import file_tags

    files = ["hf/train/data-0.arrow", "hf/test/data-0.arrow", "solo.jsonl", "a/b/x.parquet", "c/b/x.parquet",
             "d/q.json", "d/q.jsonl", "../up.json", "/top.json", "/k/top.json"]  # fmt: skip
    assert file_tags(files) == {
        "hf/train/data-0.arrow": "train-data-0", "hf/test/data-0.arrow": "test-data-0", "solo.jsonl": "solo",
        "a/b/x.parquet": "a-b-x", "c/b/x.parquet": "c-b-x", "d/q.json": "q-json", "d/q.jsonl": "q-jsonl",
        "../up.json": "up", "/top.json": "top", "/k/top.json": "k-top",
    }  # fmt: skip
    many = [f"g{i % 7}/s{i}/part.tar" for i in range(3000)]  # LAION-like shard folders: linear, not quadratic
    tags = file_tags(many)
    assert len(set(tags.values())) == 3000 and tags["g3/s10/part.tar"] == "s10-part"


def test_webdataset_shards(tmp_path):
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        sink.write({"__key__": "k0", "png": png(), "txt": "a red square"})
        sink.write(
            {
                "__key__": "k1",
                "json": {
                    "id": "r1",
                    "conversation": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
                    "label": "greet",
                },
            }
        )
        sink.write({"__key__": "k2", "png": png()})
        sink.write({"__key__": "img.v2", "png": png(), "txt": "a dotted id"})  # stored as img.v2.png, img.v2.txt
        sink.write({"__key__": "k3", "png": png(), "txt": "  "})
        sink.write({"__key__": "k0", "txt": "k0 again, apart from its first files"})
    records, rejects = split(read_records(str(tmp_path)))
    assert [r.id for r in records] == ["k0", "r1", "img.v2"]
    assert records[2].image == png() and records[2].conversation[1]["content"] == "a dotted id"
    assert records[0].image == png() and records[0].conversation[1]["content"] == "a red square"
    assert [r.text for r in records] == ["a red square", "Say hi", "a dotted id"], "a caption is what gets embedded"
    assert records[1].label == "greet"
    assert [(r.id, r.reason, r.detail) for r in rejects] == [
        ("k2", "missing_field", "no conversation, caption or .txt, nor a prompt with a response"),
        ("k3", "missing_field", "the .txt caption is empty"),
        ("k0", "duplicate_id", "key seen earlier in this shard (its files not together?)"),
    ]


def test_s1_preset_jsonl_and_parquet(tmp_path):
    rows = [
        {
            "question": f"What is {i}+1?",
            "solution": str(i + 1),
            "thinking_trajectories": ["Add one.", "Done."],
            "attempt": f"**{i + 1}**",
            "cot_type": "math",
            "source_type": f"src/{i % 2}",
            "metadata": "{}",
        }
        for i in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s1.parquet")
    (tmp_path / "s1.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("s1.parquet", "s1.jsonl"):
        records, rejects = split(read_records(str(tmp_path / name), ReadOptions(preset="s1")))
        assert not rejects and len(records) == 4
        r = records[1]
        assert r.label == "src/1" and r.text == "What is 1+1?" and r.image is None
        assert r.conversation[1]["content"] == "Add one.\nDone.\n\n**2**"
        assert r.id == f"{name.split('.')[0]}-1"
    records, _ = split(read_records(str(tmp_path / "s1.jsonl"), ReadOptions(preset="s1", with_trajectory=True)))
    assert records[0].text == "What is 0+1?\nAdd one.\nDone."


def test_s1_columns_can_be_named_and_the_banner_says_what_the_rows_have(tmp_path):
    """--prompt-field / --response-field name an S1 file's question and answer columns; a trajectory column that is
    not there (a typo) is said in the reading banner, as is `solution` standing in for a missing `attempt`."""
    rows = [{"problem": "What is 2+2?", "thinking_trajectories": ["Two and two."], "final": "4", "solution": "four"}]
    (tmp_path / "s1.jsonl").write_text(json.dumps(rows[0]) + "\n")
    said = []
    opts = ReadOptions(preset="s1", prompt_field="problem", response_field="final", announce=said.append)
    records, rejects = split(read_records(str(tmp_path / "s1.jsonl"), opts))
    assert not rejects and records[0].conversation == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Two and two.\n\n4"},
    ]
    assert "(`problem` → `thinking_trajectories` + `final`)" in said[0]
    _, rejects = split(read_records(str(tmp_path / "s1.jsonl"), ReadOptions(preset="s1")))
    assert rejects[0].detail.startswith("looked for question + thinking_trajectories and/or attempt|solution")

    typo = {"question": "What is 2+2?", "thinking_trajectory": ["Two and two."], "solution": "4"}
    (tmp_path / "typo.jsonl").write_text(json.dumps(typo) + "\n")
    said.clear()
    records, _ = split(read_records(str(tmp_path / "typo.jsonl"), ReadOptions(preset="s1", announce=said.append)))
    assert records[0].conversation[1]["content"] == "4"
    assert "its first row has no `thinking_trajectories`; no `attempt`" in said[0]


def test_fatal_inputs_are_one_line(tmp_path):
    with pytest.raises(RecordsError, match="no input matches"):
        list(read_records(str(tmp_path / "nothing*.json")))
    (tmp_path / "broken.json").write_text('[{"id": 1,\n oops]')
    with pytest.raises(RecordsError, match=r"broken.json: not valid JSON after 0 records: lexical error"):
        list(read_records(str(tmp_path / "broken.json")))
    (tmp_path / "cut.json").write_text(
        json.dumps([{"id": i, "conversations": turns("Q", "A")} for i in range(3)])[:-30]
    )
    items = []
    with pytest.raises(RecordsError, match=r"cut.json: not valid JSON after 2 records: parse error: premature EOF"):
        for item in read_records(str(tmp_path / "cut.json")):
            items.append(item)
    assert [r.id for r in items] == ["0", "1"]  # streamed: what came before the fault was already handed out
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 200)
    with pytest.raises(RecordsError, match="bad.tar: not a readable tar shard after 0 samples"):
        list(read_records(str(tmp_path / "bad.tar")))


def test_keys():
    keys = {sanitize_key(x) for x in ("a.b", "a_b", "a/b", "a b", "ab")}
    assert len(keys) == 5 and all("." not in k and "/" not in k for k in keys)
    assert sanitize_key("plain-id_1") == "plain-id_1"


def test_json_array_is_streamed_with_a_bom(tmp_path):
    rows = [{"id": f"r{i}", "conversations": turns(f"Q{i}?", "A"), "domain": "d", "score": 0.5} for i in range(5)]
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())
    records, rejects = split(read_records(str(path)))
    assert [r.id for r in records] == [f"r{i}" for i in range(5)] and not rejects
    assert records[3].text == "Q3?" and records[3].meta == {"format": "llava"}


def test_spool_round_trips_records_and_rows(tmp_path):
    recs = [
        Record("a", [{"role": "user", "content": "<image>\nQ"}], image=png(), image_ext="png", label="x", source="s:1"),
        Record("b", [{"role": "user", "content": "Q"}], label=None, text="Q", meta={"format": "text"}, source="s:2"),
        Record("c", [], image_path="/data/c.jpg", label="x"),
    ]
    spool = RecordSpool(tmp_path / "spool.bin")
    for r in recs:
        spool.append(r)
    spool.finish()
    assert len(spool) == 3 and list(spool) == recs and spool[1] == recs[1]
    assert spool.labels == ["x", None, "x"] and spool.labels[0] is spool.labels[2]
    assert list(spool.rows([2, 0])) == [recs[2], recs[0]] and list(spool[1:]) == recs[1:]
    spool.close()
    assert not (tmp_path / "spool.bin").exists()


def test_rejects_collector_counts_and_writes(tmp_path):
    rejects = Rejects()
    rejects.add("train", Reject("a", "f.json[0]", "bad_json", "oops"))
    rejects.add("eval", Record("b", [], source="f.json[1]"), "unreadable_image", "broken")
    rejects.add("train", Record("c", []), "missing_image", "gone")
    with pytest.raises(ValueError, match="unknown reject reason"):
        rejects.add("train", Record("d", []), "typo")
    assert rejects.count("train") == 2 and rejects.by_reason("train") == {"bad_json": 1, "missing_image": 1}
    assert rejects.write(tmp_path / "rejects.jsonl") == 3
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert lines[1] == {
        "split": "eval",
        "id": "b",
        "source": "f.json[1]",
        "reason": "unreadable_image",
        "detail": "broken",
    }
    assert lines[2]["source"] == "train"  # a record with no source is named by its split


def test_records_never_import_torch_or_training_code():
    """Regroup and data tools read records without torch: the records package (images included) imports none of it."""
    code = (
        "import sys, rbvl.records, rbvl.records.images; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('rbvl.data', 'rbvl.train', 'rbvl.mix'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_webdataset_json_may_hold_a_prompt_response_row_and_placeholders_need_images(tmp_path):
    """A tar sample's .json in any row shape: a VQA-style question/answer beside its image reads as one record with
    `<image>` before the question; a pair row whose text holds `<image>` with no image is rejected (as a
    conversation's is), in a tar and in a JSON file alike; a row with no usable columns names what it has."""
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        sink.write(
            {"__key__": "q0", "png": png(), "json": {"question": "What colour?", "answer": "blue", "domain": "c"}}
        )
        sink.write({"__key__": "q1", "json": {"question": "Two <image>\n<image> here?", "answer": "no"}})
        sink.write({"__key__": "q2", "json": {"foo": 1}})
    records, rejects = split(read_records(str(tmp_path / "s-000000.tar")))
    assert [r.id for r in records] == ["q0"] and records[0].label == "c" and records[0].image_ext == "png"
    assert records[0].conversation[0] == {"role": "user", "content": "<image>\nWhat colour?"}
    assert [(r.id, r.reason) for r in rejects] == [("q1", "image_placeholder_mismatch"), ("q2", "missing_field")]
    assert rejects[0].detail == "2 '<image>' for 0 image(s)" and rejects[1].detail.endswith("the .json has: foo")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "p", "prompt": "<image> What?", "response": "x"}) + "\n")
    _, rejects = split(read_records(str(tmp_path / "pairs.jsonl")))
    assert [(r.id, r.reason) for r in rejects] == [("p", "image_placeholder_mismatch")]


def test_an_image_column_of_another_name_is_pointed_out(tmp_path):
    rows = [{"img": {"bytes": png(), "path": None}, "question": "What?", "answer": "red"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vqa.parquet")
    said = []
    records, _ = split(read_records(str(tmp_path / "vqa.parquet"), ReadOptions(announce=said.append)))
    assert records[0].image is None and "`img` holds images: pass --image-field img" in said[0]
    records, _ = split(read_records(str(tmp_path / "vqa.parquet"), ReadOptions(image_field="img")))
    assert records[0].image is not None


def test_answers_are_text_numbers_read_as_text_and_empty_answers_are_rejected(tmp_path):
    """One rule in every shape: a number is its text (S1 attempt 42, a LLaVA gpt value 7, answer 7); a list or object
    where text goes is rejected, not trained on as its Python repr (an S1 trajectory holding one crashed the run);
    an answer that is empty or blank is rejected, as `"response": ""` was, whatever the shape."""
    s1 = {"question": "Q?", "thinking_trajectories": ["Think.", 3], "attempt": 42, "source_type": "s"}
    lines = [
        {"id": "s1-num", **s1},
        {"id": "s1-obj", **s1, "thinking_trajectories": ["Think.", {"x": 1}]},
        {"id": "llava-num", "conversations": turns("How many?", 7)},
        {"id": "llava-blank", "conversations": turns("How many?", "  ")},
        {"id": "msg-empty", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"id": "pair-num", "question": "2+5?", "answer": 7},
        {"id": "pair-list", "question": "Letters?", "answer": ["a", "b"]},
        {"id": "pair-obj", "question": "Map?", "response": {"x": 1}},
        {"id": "pair-blank", "prompt": "Say it", "response": "   "},
        {"id": "pair-bool", "question": "Is it red?", "answer": True},
        {
            "id": "llava-lines",
            "conversations": [{"from": "human", "value": "Two lines?"}, {"from": "gpt", "value": ["a", "b"]}],
        },
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records, rejects = split(read_records(str(path)))
    answers = {r.id: r.conversation[-1]["content"] for r in records}
    assert answers == {
        "s1-num": "Think.\n3\n\n42", "llava-num": "7", "pair-num": "7", "pair-bool": "true", "llava-lines": "a\nb",
    }  # fmt: skip
    reasons = {r.id: (r.reason, r.detail) for r in rejects}
    assert reasons["s1-obj"] == ("malformed_conversation", "S1 text is an object, not text: {'x': 1}")
    assert reasons["pair-list"] == ("malformed_conversation", "'answer' is an array, not text: ['a', 'b']")
    assert reasons["pair-obj"][1].startswith("'response' is an object, not text")
    assert reasons["llava-blank"][0] == reasons["msg-empty"][0] == "empty_conversation"
    assert reasons["pair-blank"][0] == "missing_field"
    assert len(records) + len(rejects) == len(lines)


def test_a_duplicate_id_says_where_the_first_one_was(tmp_path):
    """Shards whose keys restart at 000000 lost every later shard's samples as 'id seen earlier', with no word of
    where; a repeat within one file says so too."""
    for n in range(2):
        with wds.TarWriter(str(tmp_path / f"rk-{n:03d}.tar")) as sink:
            for i in range(2):
                sink.write({"__key__": f"{i:06d}", "png": png(), "txt": f"shard {n} sample {i}"})
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"id": "a", "question": "Q", "answer": "A"}) + "\n" * 1 for _ in range(2))
    )
    records, rejects = split(read_records([str(tmp_path / "rk-000.tar"), str(tmp_path / "rk-001.tar")]))
    assert [r.id for r in records] == ["000000", "000001"]
    assert {r.detail for r in rejects} == {
        f"id seen earlier in {tmp_path / 'rk-000.tar'} (tar keys must be unique across shards)"
    }
    records, rejects = split(read_records(str(tmp_path / "d.jsonl")))
    assert [r.detail for r in rejects] == ["id seen earlier in this file"]


def test_image_rejects_say_what_the_path_is(tmp_path):
    """A folder, a path with a trailing space (invisible when printed plain), a number where a path goes."""
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "a.png").write_bytes(png())
    rows = [
        {"id": "folder", "image": "sub dir", "conversations": turns("What?", "A", True)},
        {"id": "space", "image": "a.png ", "conversations": turns("What?", "A", True)},
        {"id": "number", "image": 12, "conversations": turns("What?", "A", True)},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    _, rejects = split(read_records(str(path)))
    assert [(r.reason, r.detail) for r in rejects] == [
        ("missing_image", f"{tmp_path / 'sub dir'}: is a folder, not an image file"),
        ("missing_image", f"{str(tmp_path / 'a.png ')!r}: no such file"),
        ("unreadable_image", "the image entry is a number, 12; expected a path or bytes"),
    ]
