"""The cluster gallery (OUT/gallery/index.html): what it shows is checked against the shards, and a real headless
Chromium renders it (skipped with its reason when no chromium is installed; CI installs Debian's).

    pytest tests/test_gallery.py
    RBVL_GALLERY_SCREENSHOT=docs/gallery.png pytest tests/test_gallery.py -k browser   # refresh the README picture
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.regroup import main as regroup_main
from rbvl.cli import main as rbvl_main
from rbvl.regroup.gallery import Card, ClusterView, _keep, cluster_silhouettes, write_gallery
from rbvl.regroup.tar_index import tar_members

HOSTILE = '<script>alert("x")</script> & <b>not bold</b>'


def make_mixed(root: Path, n: int = 60, split: str = "train") -> tuple[Path, Path]:
    """LLaVA JSON: digit scans, colour patches and text-only sums (one caption full of HTML), with a `category`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        turn = {"from": "gpt", "value": str(i)}
        if i % 3 == 0:
            Image.fromarray((digits.images[i] * 15).astype("uint8")).save(images / f"{split}d{i}.png")
            q = "<image>\nWhich digit is written here?"
            rows.append({"id": f"digit.{i}", "image": f"{split}d{i}.png", "category": "digit", "conversations": []})
        elif i % 3 == 1:
            Image.new("RGB", (48, 32), ((i * 37) % 255, 120, 200 - i)).save(images / f"{split}c{i}.jpg", quality=90)
            q = "<image>\nWhat colour is this patch?"
            rows.append({"id": f"colour{i}", "image": f"{split}c{i}.jpg", "category": "colour", "conversations": []})
        else:
            q = HOSTILE if i == 2 else f"What is {i} + {i}? Show the sum."
            rows.append({"id": f"math{i}", "category": "math", "conversations": []})
        rows[-1]["conversations"] = [{"from": "human", "value": q}, turn]
        rows[-1]["id"] = f"{split}-{rows[-1]['id']}"
    path = root / f"{split}.json"
    path.write_text(json.dumps(rows))
    return path, images


@pytest.fixture(scope="module")
def regrouped(tmp_path_factory) -> Path:
    """One regroup output (k swept over 2,3,4, gallery written at the end), shared by the tests of this file."""
    root = tmp_path_factory.mktemp("gallery")
    train, images = make_mixed(root / "data")
    evals, _ = make_mixed(root / "data", 15, "eval")
    out = root / "out"
    args = ["--input", str(train), "--eval", str(evals), "--image-root", str(images), "--label-field", "category"]
    args += ["--k", "2,3,4"]
    args += ["--out", str(out), "--embedder", "open_clip:rbvl-tiny", "--no-progress", "--num-workers", "0"]
    assert regroup_main(args) == 0
    return out


class Page(HTMLParser):
    """The page's structure: cluster sections, and per section the cards of each grid (in order)."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, list[list[dict]]] = {}
        self.imgs: list[str] = []
        self.scripts = 0
        self._section = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "script" or tag == "link":
            self.scripts += 1
        if tag == "section" and "cluster" in classes:
            self._section = self.sections.setdefault(a["id"], [])
        elif tag == "div" and "grid" in classes:
            self._section.append([])
        elif tag == "div" and "card" in classes:
            self._section[-1].append({"id": a["data-id"], "text": "text" in classes, "img": None})
        elif tag == "img":
            self.imgs.append(a["src"])
            if self._section and self._section[-1]:
                self._section[-1][-1]["img"] = a["src"]


def shard_samples(out: Path) -> dict[str, dict]:
    """Every train sample by id, read with plain webdataset: its cluster, stored distance, has-image."""
    samples = {}
    for tar in sorted((out / "train").glob("cluster_*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(s["json"])
            samples[meta["id"]] = {
                "cluster": meta["cluster"],
                "distance": meta["distance"],
                "image": "png" in s or "jpg" in s,
            }
    return samples


def check_page(out: Path, n_nearest: int = 12, n_random: int = 12) -> Page:
    """The assertions every gallery must pass, against the shards themselves."""
    manifest = json.loads((out / "manifest.json").read_text())
    text = (out / "gallery" / "index.html").read_text()
    page = Page(text)
    samples = shard_samples(out)
    assert page.scripts == 0 and "http://" not in text and "https://" not in text  # static, nothing external
    assert list(page.sections) == [c["name"] for c in manifest["clusters"]]  # every cluster, in order
    for c in manifest["clusters"]:
        members = {rid: s for rid, s in samples.items() if s["cluster"] == c["id"]}
        nearest, rand = page.sections[c["name"]]
        assert len(nearest) == min(n_nearest, len(members))
        assert len(rand) == min(n_random, len(members) - len(nearest))
        shown = [card["id"] for card in nearest]
        assert len(set(shown + [card["id"] for card in rand])) == len(nearest) + len(rand)
        assert set(shown + [card["id"] for card in rand]) <= set(members)
        # nearest means: nothing left out is nearer than what is shown (ties allowed), shown nearest first
        d_shown = [members[i]["distance"] for i in shown]
        d_rest = [s["distance"] for rid, s in members.items() if rid not in shown]
        assert d_shown == sorted(d_shown) and (not d_rest or max(d_shown) <= min(d_rest))
        for card in nearest + rand:
            assert card["text"] == (not members[card["id"]]["image"])  # text-only records as text cards
            assert (card["img"] is not None) == members[card["id"]]["image"]
    for src in page.imgs:  # relative files inside gallery/
        assert not src.startswith("/") and ".." not in src and (out / "gallery" / src).is_file()
    return page


def test_regroup_writes_gallery(regrouped):
    out = regrouped
    page = check_page(out)
    text = (out / "gallery" / "index.html").read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;not bold&lt;/b&gt;" in text
    assert "Silhouettes not available" not in text
    assert {"sweep.png", "projection.png"} <= {p.name for p in (out / "gallery").iterdir()}
    assert len(list((out / "gallery" / "thumbs").iterdir())) == sum(
        card["img"] is not None for grids in page.sections.values() for grid in grids for card in grid
    )
    # per-cluster silhouettes on the page = a slow one from the definition, on the cached embeddings
    ids = json.loads((out / ".cache" / "ids.json").read_text())  # train then eval
    samples = shard_samples(out)
    rows = [r for r, i in enumerate(ids) if i in samples]
    assert len(rows) == len(samples) < len(ids)
    x = np.load(out / ".cache" / "embeddings.npy")[rows]
    labels = np.array([samples[ids[r]]["cluster"] for r in rows])
    for c, value in enumerate(_slow_silhouettes(x, labels)):
        assert f"<b>{value:.3f}</b> mean silhouette" in text.split(f'id="cluster_{c:03d}"')[1].split("</section>")[0]


def _slow_silhouettes(x: np.ndarray, labels: np.ndarray) -> list[float]:
    """Mean silhouette per cluster, one point at a time, from the definition (a: own cluster, b: nearest other)."""
    k = labels.max() + 1
    s = np.zeros(len(x))
    for i in range(len(x)):
        d = np.sqrt(((x - x[i]) ** 2).sum(1))
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = d[own].sum() / (own.sum() - 1)
        b = min(d[labels == c].mean() for c in range(k) if c != labels[i] and (labels == c).any())
        s[i] = (b - a) / max(a, b)
    return [float(s[labels == c].mean()) for c in range(k)]


def test_random_sample_is_uniform():
    """Each of 40 samples enters a 4-card reservoir with probability 4/40 (2,000 seeds; 5 standard deviations)."""
    import random

    counts = np.zeros(40)
    for seed in range(2000):
        view, rng = ClusterView(0), random.Random(seed)
        for i in range(40):
            _keep(view, Card(key=str(i), id=str(i), label=None, distance=float(i), meta={}), i, 3, 4, rng)
        counts[[int(card.key) for card in view.pool]] += 1
        assert [card.key for _, _, card in sorted(view.nearest, reverse=True)] == ["0", "1", "2"]
    expected, sd = 2000 * 4 / 40, np.sqrt(2000 * 0.1 * 0.9)
    assert np.abs(counts - expected).max() < 5 * sd, counts


def test_cluster_silhouettes_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=40)
    got = [v for v, _ in cluster_silhouettes(x, labels, 4)]
    assert got[3] is None  # a cluster with no rows
    assert np.allclose(got[:3], _slow_silhouettes(x, labels), atol=1e-5)
    assert cluster_silhouettes(x, np.zeros(40, int), 1) == [(None, 40)]  # one cluster: undefined


def test_rebuild_with_and_without_cached_embeddings(regrouped, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(regrouped, out)
    before = (out / "gallery" / "index.html").read_text()
    shutil.rmtree(out / "gallery")
    assert rbvl_main(["gallery", str(out)]) == 0
    assert "gallery written to" in capsys.readouterr().out
    check_page(out)
    assert Page((out / "gallery" / "index.html").read_text()).sections == Page(before).sections  # same cards
    assert "Silhouettes not available" not in (out / "gallery" / "index.html").read_text()

    # torchrun's cache: one part per rank, read as one
    cache = out / ".cache"
    ids, x = json.loads((cache / "ids.json").read_text()), np.load(cache / "embeddings.npy")
    for r, (lo, hi) in enumerate([(0, 30), (30, len(ids))]):
        part = cache / f"part-{r:03d}-of-002"
        part.mkdir()
        (part / "ids.json").write_text(json.dumps(ids[lo:hi]))
        np.save(part / "embeddings.npy", x[lo:hi])
        (part / "progress.json").write_text(json.dumps({"done": hi - lo}))
        (part / "meta.json").write_text((cache / "meta.json").read_text())
    for name in ("ids.json", "embeddings.npy", "progress.json", "meta.json"):
        (cache / name).unlink()
    assert rbvl_main(["gallery", str(out)]) == 0
    assert (out / "gallery" / "index.html").read_text().split("</nav>")[0] == before.split("</nav>")[0]  # silhouettes

    shutil.rmtree(out / ".cache")  # only the shards and manifest left: still a full page, from stored distances
    assert rbvl_main(["gallery", str(out), "--nearest", "3", "--random", "2"]) == 0
    page = check_page(out, 3, 2)
    text = (out / "gallery" / "index.html").read_text()
    assert "Silhouettes not available: the embeddings are not on disk" in text
    assert len(page.sections) == json.loads((out / "manifest.json").read_text())["k"]
    assert (out / "gallery" / "projection.png").is_file()  # the centroids' projection


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_match_tarfile(tmp_path, fmt):
    path = tmp_path / "a.tar"
    names = ["k1.json", "k1.png", "dir/" + "x" * 120 + ".json", "é-ü.txt", "d" * 90 + "/" + "e" * 90 + ".jpg", "empty"]
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long names, only a 155-byte folder prefix
        names[2] = "dir/short.json"
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, name in enumerate(names):
            data = bytes(range(256)) * i + b"z" * (i * 97)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            if i == 2:  # a folder member is not a file
                folder = tarfile.TarInfo("a-folder")
                folder.type = tarfile.DIRTYPE
                tf.addfile(folder)
    with tarfile.open(path) as tf:
        want = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    with open(path, "rb") as f:
        assert list(tar_members(f)) == want
    broken = bytearray(path.read_bytes())
    broken[600] ^= 0xFF  # a byte of the second header: its checksum no longer matches
    (tmp_path / "b.tar").write_bytes(bytes(broken))
    with open(tmp_path / "b.tar", "rb") as f, pytest.raises(tarfile.ReadError, match="bad tar header"):
        list(tar_members(f))


def test_text_only_and_minimal_manifest(tmp_path):
    """conftest's hand-made output: no centroids, no sweep, no seed, no embeddings; a text-only cluster."""
    from conftest import write_tiny_manifest

    out = tmp_path / "shards"
    write_tiny_manifest(out)
    write_gallery(out)
    page = check_page(out)
    assert all(card["text"] for grid in page.sections["cluster_001"] for card in grid)
    assert not any(card["text"] for grid in page.sections["cluster_000"] for card in grid)


def test_bad_inputs_are_one_line_or_shown(tmp_path, capsys):
    assert rbvl_main(["gallery", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no manifest.json" in err[0]

    from conftest import write_tiny_manifest

    out = tmp_path / "shards"
    write_tiny_manifest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    # a shard whose first image no longer decodes, and a shard that is gone
    tar = out / manifest["clusters"][0]["train_shards"][0]
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name.endswith(".png") and m.name.startswith("train-d0-0000."):
                data = b"not a png at all"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    (out / manifest["clusters"][2]["train_shards"][0]).unlink()
    write_gallery(out, n_nearest=30)
    text = (out / "gallery" / "index.html").read_text()
    assert "image does not decode" in text
    assert "cannot be read" in text and "manifest says 24 train records, shards hold 12" in text
    assert "cannot be read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------------------------------------

CHECK = """<script>
window.addEventListener("load", () => {
  for (const img of document.images)
    if (!img.complete || img.naturalWidth === 0) console.error("broken image " + img.getAttribute("src"));
  console.log("rbvl-check images=" + document.images.length + " sections=" +
              document.querySelectorAll("section.cluster").length);
});
</script>"""


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _render(browser: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *extra, page.as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_gallery_in_browser(regrouped, tmp_path):
    browser = _chromium()
    gallery = regrouped / "gallery"
    html_text = (gallery / "index.html").read_text()
    manifest = json.loads((regrouped / "manifest.json").read_text())

    # the page as written: its DOM has every cluster's section, and the console stays silent
    run = _render(browser, gallery / "index.html", tmp_path / "p1", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console(run.stderr) == []
    dom = Page(run.stdout)
    assert list(dom.sections) == [c["name"] for c in manifest["clusters"]]

    # the same page plus a probe that reports broken images after load; screenshot it
    probe = gallery / "_probe.html"
    shot = tmp_path / "gallery.png"
    try:
        probe.write_text(html_text.replace("</body>", CHECK + "</body>"))
        run = _render(browser, probe, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,2200")
        broken = gallery / "_broken.html"  # the probe itself must be able to fail
        first = Page(html_text).imgs[0]
        broken.write_text(html_text.replace(f'src="{first}"', 'src="thumbs/missing.jpg"', 1).replace("</body>", CHECK))
        bad = _render(browser, broken, tmp_path / "p3", "--dump-dom")
    finally:
        probe.unlink(missing_ok=True)
        (gallery / "_broken.html").unlink(missing_ok=True)
    lines = _console(run.stderr)
    n_img = len(Page(html_text).imgs)
    assert len(lines) == 1 and f'"rbvl-check images={n_img} sections={manifest["k"]}"' in lines[0], lines
    assert any("broken image thumbs/missing.jpg" in line for line in _console(bad.stderr))
    with Image.open(shot) as im:
        assert im.size == (1280, 2200)
        assert len(set(im.convert("RGB").resize((64, 64)).getdata())) > 50  # a rendered page, not a blank one
    if os.environ.get("RBVL_GALLERY_SCREENSHOT"):  # the README's picture: the top of the page, < 300 KB
        with Image.open(shot) as im:
            im.convert("RGB").crop((0, 0, 1280, 1800)).save(os.environ["RBVL_GALLERY_SCREENSHOT"], optimize=True)
