"""Synthetic regrouped shard sets for tests, benchmarks and smoke runs: what `rbvl-regroup` writes, without running it.

from rbvl.data.synthetic import write_tiny_manifest
manifest = write_tiny_manifest("tmp/shards", n_domains=3, n_train=64)   # → tmp/shards/manifest.json
"""

from __future__ import annotations


def write_tiny_manifest(root, n_domains: int = 3, n_train: int = 24, n_eval: int = 6, seed: int = 0):
    """Regrouped shards + manifest.json as `rbvl-regroup` writes them (docs/formats.md), without running it.

    Domain d asks a question whose answer depends on the image's colour (d = 0), on arithmetic (d = 1, text only) or
    on a fixed phrase (d ≥ 2), so the domains differ in difficulty and in gradient direction.
    """
    import io
    import json
    import random
    from pathlib import Path

    import webdataset as wds
    from PIL import Image

    from rbvl import manifest as manifest_file

    root = Path(root)
    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

    def sample(d: int, i: int, split: str):
        key = f"{split}-d{d}-{i:04d}"
        if d == 0:
            name = rng.choice(sorted(colours))
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colours[name]).save(buf, format="PNG")
            conv = [
                {"role": "user", "content": "<image>\nWhat colour is this?"},
                {"role": "assistant", "content": name},
            ]
            out = {"__key__": key, "png": buf.getvalue()}
        elif d == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            conv = [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
            out = {"__key__": key}
        else:
            conv = [
                {"role": "user", "content": f"Say the word number {d}."},
                {"role": "assistant", "content": "yes" * d},
            ]
            out = {"__key__": key}
        out["json"] = json.dumps(
            {
                "id": key,
                "conversation": conv,
                "label": f"label{d}",
                "cluster": d,
                "distance": 0.0,
                "text": conv[0]["content"],
            }
        ).encode()
        return out

    clusters = []
    for d in range(n_domains):
        shards, sizes = {}, {}
        for split, n in (("train", n_train), ("eval", n_eval)):
            folder = root / split / f"cluster_{d:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            per_shard = max(1, n // 2)
            with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
                for i in range(n):
                    sink.write(sample(d, i, split))
            shards[split] = sorted(p.relative_to(root).as_posix() for p in folder.glob("*.tar"))
            sizes[split] = [min(per_shard, n - k * per_shard) for k in range(len(shards[split]))]
        clusters.append(
            manifest_file.domain_entry(
                d,
                f"cluster_{d:03d}",
                shards["train"],
                sizes["train"],
                shards["eval"],
                sizes["eval"],
                top_labels=[[f"label{d}", n_train]],
                examples=[],
            )  # fmt: skip
        )
    uniform = [1.0 / n_domains] * n_domains
    manifest = manifest_file.build(
        clusters,
        eval_distribution=uniform,
        embedder={"name": "none"},
        sweep=[],
        train_distribution=uniform,
        counts={"train": {"in": n_train * n_domains, "written": n_train * n_domains, "rejected": 0}},
    )
    return manifest_file.write(root, manifest)
