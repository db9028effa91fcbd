"""`rbvl bench regroup`: Regroup's embedding throughput against the model's raw encode speed, and k-means times;
or, with --synthetic-records, the memory and speed of reading and writing a LLaVA-665k-sized JSON.

    rbvl bench regroup                                          # tiny open_clip config, 32 px
    rbvl bench regroup --embedder open_clip:ViT-B-32 --n 128    # random-init ViT-B-32 at 224 px: encode dominates
    rbvl bench regroup --kmeans-sizes 10000,100000,1000000
    rbvl bench regroup --synthetic-records 665000               # read + write only: peak RSS vs the JSON's size

Read + write (--synthetic-records N): a generated LLaVA JSON array of N records (multi-turn text, ~1.5 kB each like
llava_v1_5_mix665k.json; `--synthetic-image-share` of them point at tiny PNGs) is read in one streaming pass into
Regroup's spool and written into per-cluster shards in Regroup's shuffled order (clusters drawn at random: embedding
is excluded, its speed is the first benchmark). It runs in a child process whose peak RSS (getrusage) is reported
against the JSON file's size (goal <= 1.5x), with the RSS right after imports (torch comes with webdataset).

Pipeline throughput is the whole path (read LLaVA JSON + decode + preprocess in DataLoader workers + encode + write
the memmap), over a generated folder of real photos (scikit-image / scikit-learn samples, cropped and resized,
written as JPEG and PNG). Raw throughput is `encode_image` on pre-made tensors of the same batch size. The two are
measured alternately in one process, `--repeats` times each; the ratio of the medians is the figure of merit.
With `--combine mean` the raw side also runs `encode_text` on pre-made tokens, so both sides do the same model work.
A third side runs the pipeline with an encoder that returns zeros (the data path alone: read + decode + preprocess +
memmap). The pipeline's rate cannot pass the slower of the data path and the raw encode; where the data path is the
slower (a tiny model encodes thousands of images a second), the ratio measures decoding, not how well the pipeline
keeps the model fed, and the bench says so and prints the pipeline against that bound instead.
K-means: fit + assign on N × d Gaussian blobs (MiniBatchKMeans above `--minibatch-above`, as in Regroup).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rbvl.bench._timing import alternate, medians, ratio_line, set_threads

# The library's modules are imported inside the functions that use them: each part is optional (--skip-embed,
# --kmeans-sizes '', --synthetic-records), and the read/write child imports this module, its RSS after imports
# being one of the figures.


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", default="open_clip:rbvl-tiny", help="open_clip embedder (random init when no tag)")
    p.add_argument("--combine", default="image", choices=["image", "mean", "concat"], help="what the pipeline encodes")
    p.add_argument("--n", type=int, default=0, help="images per measured run (default: 2048 tiny, 128 otherwise)")
    p.add_argument("--batch-size", type=int, default=64, help="encode batch size (both sides)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each side")
    p.add_argument("--image-size", type=int, default=256, help="side of the generated photos (before preprocess)")
    p.add_argument("--kmeans-sizes", default="10000,100000", help="N values for the k-means timing ('' to skip)")
    p.add_argument("--kmeans-dim", type=int, default=512, help="d of the synthetic embeddings")
    p.add_argument("--kmeans-k", type=int, default=32, help="clusters for the k-means timing")
    p.add_argument("--minibatch-above", type=int, default=50_000, help="MiniBatchKMeans above this N")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0 = default)")
    p.add_argument("--skip-embed", action="store_true", help="only time k-means")
    p.add_argument("--synthetic-records", type=int, default=0, help="only read + write N generated LLaVA records")
    p.add_argument("--synthetic-image-share", type=float, default=0.0, help="share of them with a tiny image")
    p.add_argument("--workdir", default=None, help="where the generated JSON and shards go (default: a temp folder)")
    p.add_argument("--clusters", type=int, default=16, help="clusters the records are written into")


# ---------------------------------------------------------------- input


def make_photo_dataset(folder: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """n real-looking images (random crops of shipped sample photos), half JPEG half PNG, plus a LLaVA JSON."""
    from PIL import Image

    photos = _sample_photos()
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        im = Image.fromarray(src[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        name = f"img{i:06d}." + ("jpg" if i % 2 == 0 else "png")
        im.save(folder / "images" / name, **({"quality": 90} if name.endswith("jpg") else {}))
        question = ["Describe the image.", "What is in this picture?", "What colours do you see?"][i % 3]
        rows.append(
            {
                "id": f"b{i:06d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": "A photo."},
                ],
            }
        )
    (folder / "llava.json").write_text(json.dumps(rows))
    return folder / "llava.json"


def _sample_photos() -> list[np.ndarray]:
    """RGB uint8 photos that ship with scikit-image and scikit-learn."""
    photos = []
    try:
        import skimage.data as sd

        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
            try:
                img = getattr(sd, name)()
            except Exception:  # noqa: BLE001 - a missing optional sample is fine
                continue
            if img.ndim == 3 and img.shape[2] == 3:
                photos.append(img)
    except ImportError:
        pass
    from sklearn.datasets import load_sample_images

    photos += list(load_sample_images().images)
    return photos


# ---------------------------------------------------------------- embedding throughput


def _pipeline_run(json_path: Path, embedder, cache: Path, args) -> float:
    """Records per second of read + decode + preprocess + encode + memmap write (`_data_only`: no encode)."""
    from rbvl.records import ReadOptions, Record, read_records
    from rbvl.regroup.embed import embed_records

    t0 = time.perf_counter()
    opts = ReadOptions(image_root=str(json_path.parent / "images"))
    records = [r for r in read_records([str(json_path)], opts) if isinstance(r, Record)]
    _, errors, _ = embed_records(
        records, embedder, cache, args.batch_size, args.num_workers, chunk_size=4096, resume=False, progress=False
    )
    assert not errors, errors
    return len(records) / (time.perf_counter() - t0)


def _data_only(embedder):
    """A copy of `embedder` whose `encode` returns zero rows: its data path without its model's work."""
    data_only = copy.copy(embedder)
    data_only.encode = functools.partial(_zero_rows, embedder.dim)
    return data_only


def _zero_rows(dim: int, batch: dict) -> torch.Tensor:
    return torch.zeros(len(batch["index"]), dim)


@torch.inference_mode()
def _raw_run(embedder, n: int, batch_size: int, images: torch.Tensor, tokens: torch.Tensor | None) -> float:
    """Images per second of `encode_image` (+ `encode_text` when the pipeline encodes text) on ready tensors."""
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        embedder.model.encode_image(images[:b])
        if tokens is not None:
            embedder.model.encode_text(tokens[:b])
        done += b
    return n / (time.perf_counter() - t0)


def bench_embedding(args) -> dict:
    from rbvl.regroup.embed import load_embedder

    embedder = load_embedder(args.embedder, args.combine, seed=0)
    n = args.n or (2048 if "rbvl-tiny" in args.embedder else 128)
    size = embedder.image_size
    images = torch.randn(args.batch_size, 3, size, size)  # (B, 3, S, S)
    tokens = embedder.tokenizer(["What is in this picture?"] * args.batch_size) if args.combine != "image" else None
    with tempfile.TemporaryDirectory() as tmp:
        json_path = make_photo_dataset(Path(tmp) / "data", n, args.image_size)
        _pipeline_run(json_path, embedder, Path(tmp) / "cache", args)  # warm-up: page cache, lazy init
        _raw_run(embedder, args.batch_size, args.batch_size, images, tokens)
        data_only = _data_only(embedder)
        runs = {
            "pipeline": lambda: _pipeline_run(json_path, embedder, Path(tmp) / "cache", args),
            "data": lambda: _pipeline_run(json_path, data_only, Path(tmp) / "cache-data", args),
            "raw": lambda: _raw_run(embedder, n, args.batch_size, images, tokens),
        }
        rates = medians(alternate(tuple(runs), args.repeats, lambda side, _round: runs[side]()))
    result = {
        "embedder": args.embedder,
        "combine": args.combine,
        "image_size": size,
        "n": n,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "pipeline_rec_s": rates["pipeline"],
        "raw_rec_s": rates["raw"],
        "data_rec_s": rates["data"],
    }
    result["ratio"] = result["pipeline_rec_s"] / result["raw_rec_s"]
    result["decode_bound"] = result["data_rec_s"] < result["raw_rec_s"]
    bound = min(result["data_rec_s"], result["raw_rec_s"])
    result["ratio_to_bound"] = result["pipeline_rec_s"] / bound
    print(
        f"embedding  {args.embedder} (combine {args.combine}, {size}px, batch {args.batch_size}, "
        f"{args.num_workers} workers, n={n}, median of {args.repeats})\n"
        f"  pipeline (read+decode+preprocess+encode+memmap) {result['pipeline_rec_s']:9.1f} rec/s\n"
        f"  raw encode on ready tensors                     {result['raw_rec_s']:9.1f} rec/s\n"
        f"  data path alone (the pipeline, no encode)       {result['data_rec_s']:9.1f} rec/s\n"
        + ratio_line(result["ratio"], goal=0.9)
    )
    if result["decode_bound"]:
        print(
            f"  decode-bound: the data path alone is slower than the raw encode, so no pipeline reaches the goal with "
            f"this model.\n  Against that bound: pipeline / data path alone = {result['ratio_to_bound']:.3f} (1: "
            f"encoding costs the data path nothing).\n  The goal is for a model whose encode is the slower side, e.g. "
            f"--embedder open_clip:ViT-B-32 --n 128"
        )
    return result


# ---------------------------------------------------------------- k-means


def blobs(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 Gaussian blobs around `centers` random unit centres, built in chunks (1M × 512 is 2 GB)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)  # (centers, d)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s : s + m] = c[rng.integers(0, centers, m)] + 0.05 * rng.standard_normal((m, d), dtype=np.float32)
    return x


def bench_kmeans(args) -> list[dict]:
    from rbvl.regroup.cluster import assign, fit_kmeans, silhouette

    rows = []
    sizes = [int(s) for s in str(args.kmeans_sizes).split(",") if s.strip()]
    for n in sizes:
        x = blobs(n, args.kmeans_dim, args.kmeans_k)
        t0 = time.perf_counter()
        km = fit_kmeans(x, args.kmeans_k, seed=0, minibatch_above=args.minibatch_above)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels, _ = assign(x, km.cluster_centers_.astype(np.float32))
        t_assign = time.perf_counter() - t0
        t0 = time.perf_counter()
        sil = silhouette(x, labels, seed=0)
        t_sil = time.perf_counter() - t0
        algo = "MiniBatchKMeans" if n > args.minibatch_above else "KMeans"
        rows.append(
            {
                "n": n,
                "d": args.kmeans_dim,
                "k": args.kmeans_k,
                "algorithm": algo,
                "fit_s": t_fit,
                "assign_s": t_assign,
                "silhouette_s": t_sil,
                "silhouette": sil,
            }
        )
        del x
    print(f"k-means  (d={args.kmeans_dim}, k={args.kmeans_k})")
    print(f"  {'N':>9}  {'algorithm':16} {'fit s':>8} {'assign s':>9} {'silhouette s':>13} {'silhouette':>10}")
    for r in rows:
        print(
            f"  {r['n']:>9}  {r['algorithm']:16} {r['fit_s']:8.2f} {r['assign_s']:9.2f} {r['silhouette_s']:13.2f} "
            f"{r['silhouette'] or float('nan'):10.3f}"
        )
    return rows


# ---------------------------------------------------------------- read + write at scale


def make_synthetic_llava(path: Path, n: int, image_share: float = 0.0, seed: int = 0) -> int:
    """A LLaVA JSON array of n records written as a stream; returns its size in bytes.

    Text-only records get 1-6 rounds of question/answer (LLaVA-665k's are ~1.5 kB on average); a share of them
    point at one of 16 tiny PNGs in `images/` beside the JSON.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = "the a of image shows what is in this picture colour red green blue left right object person two".split()
    if image_share > 0:
        (path.parent / "images").mkdir(parents=True, exist_ok=True)
        for i in range(16):
            Image.new("RGB", (8, 8), (i * 16, 255 - i * 16, 90)).save(path.parent / "images" / f"t{i:02d}.png")
    with path.open("w") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for _ in range(int(rng.integers(1, 7))):
                q = " ".join(rng.choice(words, int(rng.integers(5, 30))))
                a = " ".join(rng.choice(words, int(rng.integers(10, 110))))
                turns += [{"from": "human", "value": q + "?"}, {"from": "gpt", "value": a + "."}]
            row = {"id": f"syn{i:07d}", "model": "", "conversations": turns}
            if rng.random() < image_share:
                row["image"] = f"images/t{i % 16:02d}.png"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(("" if i == 0 else ",\n") + json.dumps(row))
        f.write("\n]\n")
    return path.stat().st_size


def _read_write_child(json_path: str, out: str, clusters: int) -> dict:
    """In a fresh process: read the JSON into a spool, write shards in Regroup's order; times and peak RSS."""
    import resource

    from rbvl.records import ReadOptions, RecordSpool, Rejects
    from rbvl.regroup.pipeline import read_split
    from rbvl.regroup.write import write_shards

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports kB)
    out_path = Path(out)
    spool, rejects = RecordSpool(out_path / ".cache" / "records.bin"), Rejects()
    t0 = time.perf_counter()
    n_in, _ = read_split([json_path], ReadOptions(), spool, rejects, "train")
    spool.finish()
    t_read = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    labels = np.random.default_rng(0).integers(0, clusters, len(spool))
    t0 = time.perf_counter()
    writer = write_shards(
        out_path,
        "train",
        spool.rows(range(len(spool))),
        labels,
        np.zeros(len(spool)),
        10_000,
        0,
        rejects,
        progress=False,
    )
    t_write = time.perf_counter() - t0
    spool.close()
    written = sum(sum(sizes.values()) for sizes in writer.shard_sizes.values())
    assert n_in == written + rejects.count("train"), (n_in, written, rejects.count("train"))
    return {
        "records": n_in,
        "written": written,
        "rejected": rejects.count("train"),
        "read_s": t_read,
        "write_s": t_write,
        "rss_imports": rss_imports,
        "rss_after_read": rss_read,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def bench_read_write(args) -> dict:
    import shutil
    import subprocess
    import sys

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rbvl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    json_path, out = work / "synthetic.json", work / "out"
    try:
        t0 = time.perf_counter()
        size = make_synthetic_llava(json_path, args.synthetic_records, args.synthetic_image_share)
        t_gen = time.perf_counter() - t0
        code = (
            "import json, sys; from rbvl.bench.regroup import _read_write_child; "
            "print(json.dumps(_read_write_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(json_path), str(out), str(args.clusters)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"read/write child failed: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    r.update(json_bytes=size, generate_s=t_gen, image_share=args.synthetic_image_share)
    r["read_rec_s"] = r["records"] / r["read_s"]
    r["write_rec_s"] = r["written"] / r["write_s"]
    r["read_write_rec_s"] = r["records"] / (r["read_s"] + r["write_s"])
    r["rss_ratio"] = r["rss_peak"] / size
    r["rss_added_ratio"] = (r["rss_peak"] - r["rss_imports"]) / size  # what reading and writing took
    mb = 1 / 2**20
    print(
        f"read + write  {r['records']} synthetic LLaVA records ({args.synthetic_image_share:.0%} with a tiny image), "
        f"JSON {size * mb:.0f} MiB\n"
        f"  read (streaming JSON -> spool)   {r['read_s']:7.1f} s  {r['read_rec_s']:9.0f} rec/s\n"
        f"  write (shuffled shards, k={args.clusters})  {r['write_s']:7.1f} s  {r['write_rec_s']:9.0f} rec/s\n"
        f"  read + write                     {r['read_s'] + r['write_s']:7.1f} s  {r['read_write_rec_s']:9.0f} rec/s\n"
        f"  peak RSS {r['rss_peak'] * mb:.0f} MiB = {r['rss_ratio']:.2f}x the JSON (goal <= 1.5x); "
        f"after imports {r['rss_imports'] * mb:.0f} MiB, after reading {r['rss_after_read'] * mb:.0f} MiB\n"
        f"  beyond the imports: {(r['rss_peak'] - r['rss_imports']) * mb:.0f} MiB = {r['rss_added_ratio']:.2f}x the JSON "
        f"(for a JSON far smaller than the imports, this is the figure to read)"
    )
    return r


def run(args) -> dict:
    if args.synthetic_records:
        return {"read_write": bench_read_write(args)}
    set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict = {}
    if not args.skip_embed:
        result["embedding"] = bench_embedding(args)
    if args.kmeans_sizes:
        result["kmeans"] = bench_kmeans(args)
    return result
