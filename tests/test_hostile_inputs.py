"""The reliability contract: every mistake a user can make through the CLIs gets one clear line or works.

Each case runs `rbvl` or `rbvl-regroup` in a subprocess (with a timeout: no hang) and asserts the exit code, exactly
one error line naming the problem, no traceback, counts that add up, and that no file outside the outputs was
touched. The table of cases (input → outcome), as this run saw them, is printed at the end of the module and
written to $RBVL_CASE_TABLE when that is set:

    RBVL_CASE_TABLE=cases.md pytest -q tests/test_hostile_inputs.py -s

Classes: config values (train and validate agree), regroup options, output folders (one run per folder, nothing
deleted that the tool did not write), input files and images (what regroup accepts, training reads), messages,
metrics.jsonl with a torn last line.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_manifest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "demo_tiny_rnb.yaml")
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TINY_REGROUP = ["--embedder", "open_clip:rbvl-tiny", "--no-progress", "--no-plots", "--num-workers", "0"]
TINY_TRAIN = [
    "max_steps=3",
    "train.batch_size=4",
    "train.log_every=1",
    "balance.update_every=2",
    "balance.warmup_steps=0",
    "data.num_workers=0",
    "logging.progress=false",
    "logging.plots=false",
    "logging.tensorboard=false",
]
CASES: list[tuple[str, str, str]] = []  # (class, input, outcome): the table of the closing note


@pytest.fixture(scope="module", autouse=True)
def case_table():
    yield
    lines = ["| class | input | outcome |", "| --- | --- | --- |"]
    lines += [f"| {c} | `{i}` | {o.replace('|', '/')} |" for c, i, o in CASES]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if os.environ.get("RBVL_CASE_TABLE"):
        Path(os.environ["RBVL_CASE_TABLE"]).write_text(text)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def rbvl(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return _run("rbvl.cli", args, timeout)


def regroup(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    return _run("data_tools.regroup", args, timeout)


def _run(module: str, args, timeout: int) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ENV,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} {' '.join(map(str, args))} hung (no exit in {timeout} s)")


def error_line(r: subprocess.CompletedProcess, cls: str, case: str, text: str, code: int | None = None) -> str:
    """Assert a failure with exactly one error line containing `text`, no traceback; record the case."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, r.stderr[-3000:]
    assert text in errors[0], errors[0]
    assert r.returncode != 0 if code is None else r.returncode == code, (r.returncode, r.stderr[-2000:])
    CASES.append((cls, case, f"exit {r.returncode}: {errors[0]}"))
    return errors[0]


def succeeded(r: subprocess.CompletedProcess, cls: str, case: str, outcome: str) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    CASES.append((cls, case, f"exit 0: {outcome}"))


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under root → (size, mtime_ns, first bytes): compared before and after a command."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, p.read_bytes()[:64])
    return out


def png(size=(24, 24), colour=(200, 40, 40), fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **kw)
    return buf.getvalue()


def llava_rows(n: int, image_names: list[str] | None = None, prefix: str = "r") -> list[dict]:
    rows = []
    for i in range(n):
        image = image_names[i] if image_names and i < len(image_names) else None
        q = ("<image>\n" if image else "") + f"Question {i}: what is {i} + 1?"
        row = {
            "id": f"{prefix}{i}",
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": str(i + 1)}],
        }
        if image:
            row["image"] = image
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small LLaVA dataset (text rows + PNG/JPEG images), its eval file, and an input snapshot."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    names = []
    for i in range(8):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        (images / name).write_bytes(png(colour=(30 * i, 100, 200 - 20 * i), fmt="PNG" if i % 2 else "JPEG"))
        names.append(f"images/{name}")  # relative to the JSON file's folder (the default image root)
    (root / "train.json").write_text(json.dumps(llava_rows(24, names)))
    (root / "eval.json").write_text(json.dumps(llava_rows(6, prefix="e")))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_manifest(tmp_path_factory.mktemp("shards"))


# ---------------------------------------------------------------------------------------------------------------------
# Config values: one line naming key, value and what is allowed; `rbvl validate` and `rbvl train` agree
# ---------------------------------------------------------------------------------------------------------------------

BAD_CONFIG = [
    ("train.batch_size=0", "train.batch_size: got 0, expected an int >= 1"),
    ("train.grad_accum=0", "train.grad_accum: got 0, expected an int >= 1"),
    ("data.overlong=typo", "data.overlong: 'typo' is not one of truncate, drop"),
    ("balance.lam=-1", "balance.lam: got -1.0, expected a number >= 0"),
    ("train.log_every=0", "train.log_every: got 0, expected an int >= 1"),
    ("optim.lr=-0.001", "optim.lr: got -0.001, expected a number > 0"),
    ("data.max_length=0", "data.max_length: got 0, expected an int >= 2"),
    ("data.num_workers=-1", "data.num_workers: got -1, expected an int >= 0"),
    ("max_steps=-5", "max_steps: got -5, expected an int >= 1"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("mixing.strategy=stratifed", "did you mean 'stratified'"),
    ("train.batchsize=4", "unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    ("lora.target_modules=(q_proj", "lora.target_modules: got '(q_proj', not a valid regex"),
    ("train.device=gpu0", "train.device: got 'gpu0'"),
    ("train=3", "train: expected a section"),
    ("mixing.weights={cluster_0:1}", "mixing.weights: got the key 'cluster_0:1' with no value; YAML needs a space"),
]


@pytest.mark.parametrize("override, message", BAD_CONFIG, ids=[b[0] for b in BAD_CONFIG])
def test_bad_config_value_train_and_validate_agree(tmp_path, shards, override, message):
    out = tmp_path / "run"
    v = rbvl("validate", RECIPE, override)
    line_v = error_line(v, "config (validate)", f"rbvl validate demo_tiny_rnb.yaml {override}", message, code=2)
    t = rbvl("train", RECIPE, override, f"manifest={shards}", f"output_dir={out}")
    line_t = error_line(t, "config (train)", f"rbvl train demo_tiny_rnb.yaml {override}", message, code=2)
    assert line_v == line_t, "validate and train say the same"
    assert not out.exists(), "a refused config touches nothing"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mixing.strategy=manual", "mixing.weights={cluster_009: 1}"], "mixing.weights names unknown domain 'cluster_009'"),
        (["mixing.strategy=manual", "mixing.weights={7: 1}"], "mixing.weights names unknown domain '7'"),
        (["lora.enabled=false"], "balance.params: got lora with lora.enabled=false, expected head or regexes"),
    ],
)  # fmt: skip
def test_what_train_refuses_validate_refuses(tmp_path, shards, overrides, message):
    """`rbvl validate` passed these, then `rbvl train` stopped on them (a domain the manifest lacks; R&B tracking
    LoRA adapters that lora.enabled=false never makes)."""
    v = rbvl("validate", RECIPE, *overrides, f"manifest={shards}", f"output_dir={tmp_path / 'run'}")
    error_line(v, "config (validate)", f"rbvl validate demo_tiny_rnb.yaml {' '.join(overrides)}", message, code=2)
    t = rbvl("train", RECIPE, *overrides, f"manifest={shards}", f"output_dir={tmp_path / 'run'}", *TINY_TRAIN)
    error_line(t, "config (train)", f"rbvl train demo_tiny_rnb.yaml {' '.join(overrides)}", message)


def test_every_numeric_notation_validates():
    notations = ["optim.lr=1e-3", "optim.lr=1E-3", "balance.lam=.5", "max_steps=1_000", "resume=yes", "eval.every=0"]
    r = rbvl("validate", "--config-only", RECIPE, *notations)
    succeeded(r, "config", "rbvl validate ... " + " ".join(notations), r.stdout.strip())
    assert "max_steps=1000" in r.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is not a file"),  # a folder given as the recipe
        ("- a\n- b\n", "a recipe is a mapping of keys, got list"),
        ("train: {batch_size: 4\n", "not valid YAML"),
        (b"\xff\xfe\x00garbage", "not a text file"),
    ],
    ids=["folder", "yaml-list", "broken-yaml", "binary"],
)
def test_bad_recipe_files(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    r = rbvl("validate", path)
    error_line(r, "config", f"rbvl validate <{'folder' if content is None else repr(content)[:30]}>", message)


# ---------------------------------------------------------------------------------------------------------------------
# Regroup options: the same validation layer, every old flag name still works
# ---------------------------------------------------------------------------------------------------------------------

BAD_REGROUP = [
    (["--k", "0"], "k: got '0', expected a positive int"),
    (["--k", "4,x"], "k: got '4,x'"),
    (["--batch-size", "0"], "batch_size: got 0, expected an int >= 1"),
    (["--num-workers", "-1"], "num_workers: got -1, expected an int >= 0"),
    (["--seed", "abc"], "seed: expected int, got 'abc'"),
    (["--combine", "avg"], "combine: 'avg' is not one of mean, concat, image, text"),
    (["--format", "xml"], "format: 'xml' is not one of null, llava, webdataset, jsonl, parquet, arrow"),
    (["--maxcount", "0"], "maxcount: got 0"),
    (["--resume", "maybe"], "resume: expected bool"),
    (["chunk_size=0"], "chunk_size: got 0"),
    (["--kk", "3"], "unrecognized arguments: --kk"),
    (["--config", "missing.yaml"], "config not found: missing.yaml"),
]


@pytest.mark.parametrize("args, message", BAD_REGROUP, ids=[" ".join(a) for a, _ in BAD_REGROUP])
def test_bad_regroup_option(tmp_path, inputs, args, message):
    out = tmp_path / "out"
    r = regroup("--input", inputs / "train.json", "--out", out, *args, timeout=60)
    error_line(r, "regroup options", "rbvl-regroup " + " ".join(args), message)
    assert not out.exists(), "a refused option touches nothing"


def test_regroup_help_lists_every_option():
    from rbvl.regroup.options import RegroupOptions

    r = regroup("--help", timeout=60)
    assert r.returncode == 0
    import dataclasses

    for name in (f.name for f in dataclasses.fields(RegroupOptions)):
        assert "--" + name.replace("_", "-") in r.stdout, name
    for old in ("--no-resume", "--no-plots", "--no-progress", "--overwrite", "--with-trajectory", "--text-fields"):
        assert old in r.stdout, old
    CASES.append(("regroup options", "rbvl-regroup --help", "exit 0: every field as a flag (old names kept)"))


# ---------------------------------------------------------------------------------------------------------------------
# Input files: what is wrong is named
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps({"data": llava_rows(3)}), "expected a list of records (a JSON array), got one JSON object"),
        (
            json.dumps({"data": llava_rows(3)}, indent=2),
            "expected a list of records (a JSON array), got one JSON object",
        ),
        ("[]", "no usable train records"),
    ],
    ids=["object-one-line", "object-indented", "empty-list"],
)
def test_input_json_shape(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    r = regroup("--input", path, "--out", tmp_path / "out", "--k", "2", *TINY_REGROUP)
    line = error_line(r, "input files", f"--input <{content[:25]!r}...>", message)
    assert str(path) in line
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_empty_eval_set_is_said(tmp_path, inputs):
    bad_eval = tmp_path / "eval.json"
    bad_eval.write_text(json.dumps([{"id": "x", "conversations": []}, {"id": "y"}]))
    out = tmp_path / "out"
    r = regroup("--input", inputs / "train.json", "--eval", bad_eval, "--out", out, "--k", "2", *TINY_REGROUP)
    warn = [line for line in r.stderr.splitlines() if "warning: the eval set is empty" in line]
    assert len(warn) == 1 and "all 2 eval records were rejected" in warn[0]
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]["eval"]
    assert c == {"in": 2, "written": 0, "rejected": 2}
    succeeded(r, "messages", "--eval FILE whose records are all unusable", warn[0])


# ---------------------------------------------------------------------------------------------------------------------
# Output folders: one run per folder; nothing deleted that the tool did not write
# ---------------------------------------------------------------------------------------------------------------------


def test_regroup_out_is_a_file(tmp_path, inputs):
    target = tmp_path / "shards"
    target.write_text("my notes")
    r = regroup("--input", inputs / "train.json", "--out", target, *TINY_REGROUP)
    error_line(r, "output folders", "rbvl-regroup --out EXISTING_FILE", "is a file, not a folder")
    assert target.read_text() == "my notes"


def test_train_output_dir_is_a_file(tmp_path, shards):
    target = tmp_path / "run"
    target.write_text("my notes")
    r = rbvl("train", RECIPE, f"manifest={shards}", f"output_dir={target}", *TINY_TRAIN)
    error_line(r, "output folders", "rbvl train output_dir=EXISTING_FILE", "is a file, not a folder", code=2)
    assert target.read_text() == "my notes"


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_regroup_never_touches_a_folder_it_did_not_write(tmp_path, inputs, overwrite):
    out = tmp_path / "mine"
    for rel in ("train/cluster_000/keep.tar", "summary.md", "rejects.jsonl", "photo.png", "eval/cluster_001/x.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"user data " + rel.encode())
    before = snapshot(out)
    flags = ["--overwrite"] if overwrite else []
    r = regroup("--input", inputs / "train.json", "--out", out, "--k", "2", *flags, *TINY_REGROUP)
    error_line(
        r, "output folders", f"rbvl-regroup --out FOLDER_WITH_USER_FILES {' '.join(flags)}", "is not a regroup output"
    )
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before


@pytest.mark.slow
def test_overwrite_replaces_only_the_previous_regroup_output(tmp_path, inputs):
    out = tmp_path / "shards"
    base = ["--input", inputs / "train.json", "--eval", inputs / "eval.json", "--out", out, *TINY_REGROUP]
    assert regroup(*base, "--k", "3").returncode == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "my_notes.txt").write_text("mine")
    (out / "train" / "cluster_000" / "README").write_text("mine too")
    input_before = snapshot(inputs)
    r = regroup(*base, "--k", "2")
    error_line(r, "output folders", "rbvl-regroup --out PREVIOUS_OUTPUT (no --overwrite)", "--overwrite")
    assert json.loads((out / "manifest.json").read_text()) == first
    r = regroup(*base, "--k", "2", "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["k"] == 2
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "train/cluster_000/README").read_text() == "mine too"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["cluster_000", "cluster_001"]
    assert not (out / ".staging").exists()
    listed = set(manifest["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    extra = on_disk - listed - {"manifest.json", "my_notes.txt", "train/cluster_000/README"}
    assert all(e.startswith((".cache/", "gallery/")) for e in extra), extra  # the gallery is written after the manifest
    assert snapshot(inputs) == input_before, "inputs untouched"
    for split in ("train", "eval"):
        c = manifest["counts"][split]
        assert c["in"] == c["written"] + c["rejected"]
    succeeded(
        r, "output folders", "rbvl-regroup --out PREVIOUS_OUTPUT --overwrite (+ user files inside)", "user files kept"
    )


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another live process holding FOLDER's lock (as a running regroup or training would)."""
    code = "import sys, time; from rbvl.runtime import runlock; runlock.acquire(sys.argv[1], 'test holder'); print('held', flush=True); time.sleep(300)"
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow
def test_one_run_per_folder_and_stale_locks(tmp_path, inputs, shards):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        r = rbvl("train", RECIPE, f"manifest={shards}", f"output_dir={run}", *TINY_TRAIN)
        line = error_line(
            r, "output folders", "rbvl train while another run holds output_dir", "is in use by another run"
        )
        assert f"PID {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == [".rbvl.lock"], "the refused run wrote nothing"
        out = tmp_path / "shards"
        holder2 = _hold_lock(out)
        r = regroup("--input", inputs / "train.json", "--out", out, "--k", "2", *TINY_REGROUP)
        error_line(r, "output folders", "rbvl-regroup while another regroup holds --out", "is in use by another run")
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: its lock file stays behind, stale
        holder.wait()
        holder2.send_signal(signal.SIGKILL)
        holder2.wait()
    assert (out / ".rbvl.lock").exists()
    r = regroup("--input", inputs / "train.json", "--out", out, "--k", "2", *TINY_REGROUP)
    assert "taking over a stale lock" in r.stderr
    succeeded(
        r, "output folders", "rbvl-regroup --out FOLDER with a stale lock (holder SIGKILLed)", "stale lock taken over"
    )
    assert not (out / ".rbvl.lock").exists(), "released at the end"


@pytest.mark.slow
def test_two_trainings_into_one_output_dir(tmp_path, shards):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rbvl.cli", "train", RECIPE, f"manifest={shards}", f"output_dir={run}", *TINY_TRAIN]
    first = subprocess.Popen([*args, "max_steps=400"], env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".rbvl.lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        r = rbvl("train", RECIPE, f"manifest={shards}", f"output_dir={run}", *TINY_TRAIN)
        error_line(
            r, "output folders", "two rbvl train into one output_dir, a second apart", "is in use by another run"
        )
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    rows = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl holds one run"


# ---------------------------------------------------------------------------------------------------------------------
# What regroup accepts, training reads (images); metrics.jsonl torn on a kill
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_images_of_every_kind_train_and_a_torn_metrics_line_resumes(tmp_path):
    root = tmp_path / "data"
    images = root / "images"
    images.mkdir(parents=True)
    files = {
        "a.gif": png(fmt="GIF"),
        "b.bmp": png(fmt="BMP"),
        "c.tiff": png(fmt="TIFF"),
        "d.webp": png(fmt="WEBP"),
        "e.png": png(),
        "f.jpg": png(fmt="JPEG"),
        "g.tga": png(fmt="TGA"),
        "h.ppm": png(fmt="PPM"),
        "i.ico": png(fmt="ICO"),
        "named_wrong.jpg": png(),  # a PNG with a .jpg name
        "corrupt.png": b"\x89PNG\r\n\x1a\nnot really",
        "truncated.jpg": png(size=(64, 64), fmt="JPEG")[:200],
    }
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)).save(buf, format="PNG")
    files["deep16.png"] = buf.getvalue()
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    files["anim.gif"] = buf.getvalue()
    for name, data in files.items():
        (images / name).write_bytes(data)
    names = sorted(files)
    paths = [f"images/{n}" for n in names]  # relative to the JSON file's folder (the default image root)
    rows = llava_rows(len(names) + 8, paths)
    (root / "train.json").write_text(json.dumps(rows))
    (root / "eval.json").write_text(json.dumps(llava_rows(6, paths[:6], prefix="e")))
    before = snapshot(root)
    out = tmp_path / "shards"
    r = regroup("--input", root / "train.json", "--eval", root / "eval.json", "--out", out, "--k", "2", *TINY_REGROUP)
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]["train"]
    assert c["in"] == len(rows) == c["written"] + c["rejected"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    bad = {r_["id"] for r_ in rejects if r_["split"] == "train"}
    assert bad == {f"r{names.index('corrupt.png')}", f"r{names.index('truncated.jpg')}"}
    assert all(r_["reason"] == "unreadable_image" for r_ in rejects), rejects
    n_bad_eval = sum(n in ("corrupt.png", "truncated.jpg") for n in names[:6])
    assert manifest["counts"]["eval"] == {"in": 6, "written": 6 - n_bad_eval, "rejected": n_bad_eval}
    notes = (out / "image_notes.jsonl").read_text()
    assert "16-bit" in notes and "3 frames: the first kept" in notes
    import webdataset as wds

    for tar in out.glob("*/cluster_*/*.tar"):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            assert set(s) - {"__key__", "__url__", "__local_path__", "json"} <= {"png", "jpg", "webp"}
    assert snapshot(root) == before, "inputs untouched"
    succeeded(r, "images", "GIF BMP TIFF WebP TGA PPM ICO 16-bit animated corrupt truncated → regroup", f"counts {c}")

    run = tmp_path / "run"
    t = rbvl("train", RECIPE, f"manifest={out / 'manifest.json'}", f"output_dir={run}", *TINY_TRAIN, "eval.every=1")
    succeeded(t, "images", "rbvl train on those shards (eval set with GIF/BMP/TIFF images)", "3 steps + eval each step")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and all(e["loss"] is not None for e in evals)

    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 4, "loss": 1.2')  # a kill in the middle of a write
    t = rbvl(
        "train",
        RECIPE,
        f"manifest={out / 'manifest.json'}",
        f"output_dir={run}",
        *TINY_TRAIN,
        "max_steps=5",
        "resume=true",
    )
    assert "metrics.jsonl: dropping its torn last line" in t.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows if r_["kind"] == "train"] == [1, 2, 3, 4, 5]
    succeeded(
        t, "metrics", "resume after a torn last line in metrics.jsonl", "line dropped with a warning, run resumed"
    )


@pytest.mark.slow
def test_no_eval_set_is_noted_at_train(tmp_path, inputs):
    out = tmp_path / "shards"
    r = regroup("--input", inputs / "train.json", "--out", out, "--k", "2", *TINY_REGROUP)
    assert "no --eval input was given" in r.stderr
    t = rbvl(
        "train",
        RECIPE,
        f"manifest={out / 'manifest.json'}",
        f"output_dir={tmp_path / 'run'}",
        *TINY_TRAIN,
        "max_steps=1",
        "balance.update_every=1",
    )
    note = [line for line in t.stderr.splitlines() if "has no eval records" in line]
    assert len(note) == 1
    succeeded(t, "messages", "rbvl train on a manifest without eval records", note[0])


# ---------------------------------------------------------------------------------------------------------------------
# Resume edges
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_between_log_lines_keeps_the_windows_loss_stats(tmp_path, shards):
    """save_every=3, log_every=5: a run stopped after checkpoint-3 and resumed writes the same step-5 row (steps 1-5)
    as the run that never stopped."""
    common = [f"manifest={shards}", *TINY_TRAIN, "train.log_every=5", "train.save_every=3", "max_steps=10"]
    full = rbvl("train", RECIPE, *common, f"output_dir={tmp_path / 'a'}", timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = rbvl("train", RECIPE, *common, f"output_dir={tmp_path / 'b'}", "resume=true", timeout=300)

    def row5(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["kind"] == "train" and r["step"] == 5)

    a, b = row5(tmp_path / "a"), row5(tmp_path / "b")
    assert sum(b["samples_per_domain"]) == 5 * 4, "the step-5 row counts all five steps' samples"
    assert (b["loss"], b["loss_per_domain"]) == (a["loss"], a["loss_per_domain"])
    succeeded(
        resumed,
        "resume",
        "save_every=3, log_every=5: checkpoint-3 resumed to 10",
        f"the step-5 row covers {int(sum(b['samples_per_domain']))} samples (5 steps × 4), loss equal to the "
        "uninterrupted run's",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt or truncated shards: train skips and counts (one warning naming the shard), eval stops with one line
# ---------------------------------------------------------------------------------------------------------------------


def _damaged_copy(tmp_path, shards, split: str, how: str) -> tuple[Path, Path]:
    """A copy of the tiny shards with one `split` shard of cluster_000 damaged `how`; returns (manifest, shard)."""
    root = tmp_path / "damaged"
    shutil.copytree(Path(shards).parent, root)
    shard = sorted((root / split / "cluster_000").glob("*.tar"))[0]
    data = shard.read_bytes()
    if how == "random bytes":
        shard.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # cut in half
        shard.write_bytes(data[: len(data) // 2])
    return root / "manifest.json", shard


@pytest.mark.slow
@pytest.mark.parametrize("how", ["random bytes", "cut in half"])
def test_damaged_train_shard_is_skipped_counted_and_named(tmp_path, shards, how):
    manifest, shard = _damaged_copy(tmp_path, shards, "train", how)
    run = tmp_path / "run"
    r = rbvl("train", RECIPE, f"manifest={manifest}", f"output_dir={run}", *TINY_TRAIN, "max_steps=8", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and shard.name in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dropped = sum(row.get("dropped", 0) for row in rows if row["kind"] == "train")
    assert dropped > 0, "the unreadable samples are counted"
    succeeded(r, "data faults", f"a train shard of {how}", f"trained 8 steps; a warning names {shard.name}; "
              f"{dropped} samples counted as dropped")  # fmt: skip


@pytest.mark.parametrize("how", ["random bytes", "cut in half"])
def test_damaged_eval_shard_stops_with_one_line(tmp_path, shards, how):
    manifest, shard = _damaged_copy(tmp_path, shards, "eval", how)
    r = rbvl("train", RECIPE, f"manifest={manifest}", f"output_dir={tmp_path / 'run'}", *TINY_TRAIN, timeout=300)
    line = error_line(r, "data faults", f"an eval shard of {how}", shard.name)
    assert "eval shard" in line
