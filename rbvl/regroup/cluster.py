"""Clustering: k-means on the train embeddings, k chosen by silhouette; eval assigned to the nearest train centroid.

`KMeans` below `minibatch_above` rows, `MiniBatchKMeans` above; both seeded, so the same inputs and seed give the
same clusters. The silhouette is computed on a seeded sample when N is large (it is O(N²)).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score, silhouette_score

from rbvl.regroup.errors import RegroupError


@dataclass
class Clustering:
    k: int
    centroids: np.ndarray  # (k, d)
    labels: np.ndarray  # (N,) cluster per train row
    distances: np.ndarray  # (N,) Euclidean distance to the own centroid
    sweep: list[dict]  # [{"k", "silhouette", "inertia"}, ...]


def parse_k(spec: str | int | list) -> list[int]:
    """`8`, `"8"`, `"4,8,16"` or `[4, 8]` → a sorted list of distinct positive ints."""
    if isinstance(spec, int):
        ks = [spec]
    elif isinstance(spec, str):
        try:
            ks = [int(s) for s in spec.replace(" ", "").split(",") if s]
        except ValueError:
            raise RegroupError(f"--k must be an integer or a comma-separated list of integers, got '{spec}'") from None
    else:
        ks = [int(s) for s in spec]
    if not ks or any(k < 1 for k in ks):
        raise RegroupError(f"--k needs positive integers, got '{spec}'")
    return sorted(set(ks))


def fit_kmeans(x: np.ndarray, k: int, seed: int, minibatch_above: int = 50_000, batch_size: int = 4096):
    """A fitted, seeded KMeans (or MiniBatchKMeans when N > minibatch_above) on x (N, d)."""
    if len(x) > minibatch_above:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3, max_no_improvement=10)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=4)
    return km.fit(x)


def silhouette(x: np.ndarray, labels: np.ndarray, seed: int, sample_above: int = 10_000) -> float | None:
    """Silhouette of `labels` on x (sampled to `sample_above` rows when N is larger); None when undefined."""
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(x) - 1:
        return None
    size = sample_above if len(x) > sample_above else None
    return float(silhouette_score(x, labels, sample_size=size, random_state=seed))


def cluster(
    x: np.ndarray,
    ks: list[int],
    seed: int = 0,
    minibatch_above: int = 50_000,
    silhouette_sample: int = 10_000,
    progress: bool = True,
) -> Clustering:
    """Fit k-means for each k in `ks` on x (N, d); keep the k with the best silhouette (the only k when one is given).

    Raises:
        RegroupError: a k larger than the number of train records or than their distinct embeddings.
    """
    from tqdm.auto import tqdm

    n = len(x)
    too_big = [k for k in ks if k > n]
    if too_big:
        raise RegroupError(
            f"k={too_big[0]} is larger than the number of usable train records ({n}); use {k_that_fits(ks, n)}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_distinct(x, ks)
    sweep, fits = [], {}
    for k in tqdm(ks, desc="cluster (k sweep)", unit="k", disable=not progress or len(ks) == 1):
        km = fit_kmeans(x, k, seed, minibatch_above)
        sil = silhouette(x, km.labels_, seed, silhouette_sample) if len(ks) > 1 or k > 1 else None
        sweep.append({"k": k, "silhouette": _round(sil), "inertia": _round(float(km.inertia_))})
        fits[k] = km
    if len(ks) == 1:
        best = ks[0]
    else:
        scored = [s for s in sweep if s["silhouette"] is not None]
        best = max(scored, key=lambda s: s["silhouette"])["k"] if scored else ks[0]
    centroids = fits[best].cluster_centers_.astype(np.float32)  # (k, d)
    labels, dist = assign(x, centroids)
    sizes = np.bincount(labels, minlength=best)
    if (sizes == 0).any():  # a domain with no samples would stop training later; say it here
        raise RegroupError(
            f"k={best} left {int((sizes == 0).sum())} of its clusters empty (sizes {' '.join(map(str, sizes))}): "
            "the embeddings hold fewer distinct groups than k; use a smaller --k"
        )
    return Clustering(best, centroids, labels, dist, sweep)


def sweep_edge(sweep: list[dict], best: int) -> str | None:
    """A note when the best silhouette of a sweep of 3 or more k lies at its largest (or smallest, above 2) k: the
    peak may lie outside what was tried, so the sweep should be widened."""
    ks = sorted(s["k"] for s in sweep if s["silhouette"] is not None)
    if len(ks) < 3:
        return None
    wider = lambda *k: ",".join(map(str, sorted(set(k))))  # noqa: E731
    if best == ks[-1]:
        return f"the silhouette is highest at the largest k tried ({best}): the best k may be larger; widen the sweep, e.g. --k {wider(*ks[-2:], 2 * best, 4 * best)}"  # fmt: skip
    if best == ks[0] and best > 2:
        return f"the silhouette is highest at the smallest k tried ({best}): the best k may be smaller; widen the sweep, e.g. --k {wider(2, max(2, best // 2), *ks[:2])}"  # fmt: skip
    return None


def count_distinct(x: np.ndarray, stop: int | None = None, decimals: int = 5) -> int:
    """Distinct rows of x (N, d), rounded to `decimals` (the same record embedded in two batches may differ in its
    last bits); counting stops at `stop`, so ordinary data costs a few rows, not a pass."""
    seen: set[bytes] = set()
    for s in range(0, len(x), 4096):
        block = np.round(np.asarray(x[s : s + 4096], dtype=np.float32), decimals) + 0.0  # + 0.0: -0.0 → 0.0
        for row in block:
            seen.add(row.tobytes())
            if stop is not None and len(seen) >= stop:
                return len(seen)
    return len(seen)


def check_distinct(x: np.ndarray, ks: list[int]) -> None:
    """RegroupError naming the distinct points and the k that would work when some k exceeds the distinct rows of x.

    k-means cannot make more clusters than there are distinct points: the rest come out empty (40 identical records,
    k = 3: sizes 40 0 0), and a domain without samples stops training later.
    """
    d = count_distinct(x, stop=max(ks))
    bad = [k for k in ks if k > d]
    if not bad:
        return
    use = k_that_fits(ks, d)
    raise RegroupError(
        f"k={bad[0]} needs at least {bad[0]} distinct embeddings, but the {len(x)} usable train records have only "
        f"{d} (duplicate or near-identical records?); use {use}"
    )


def k_that_fits(ks: list[int], n: int) -> str:
    """The --k to use where only n clusters can be told apart: the asked values that fit, else n or less."""
    valid = [k for k in ks if k <= n]
    return f"--k {','.join(map(str, valid))}" if valid else f"--k {n} or less" if n > 1 else "--k 1 (one domain)"


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (Euclidean) for each row of x (N, d): (labels (N,), distances (N,)), in blocks."""
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    c2 = (centroids**2).sum(1)  # (k,)
    for s in range(0, len(x), block):
        xb = np.asarray(x[s : s + block], dtype=np.float32)  # (b, d)
        d2 = (xb**2).sum(1, keepdims=True) - 2 * xb @ centroids.T + c2  # (b, k)
        labels[s : s + len(xb)] = d2.argmin(1)
        dist[s : s + len(xb)] = np.sqrt(np.maximum(d2.min(1), 0))
    return labels, dist


def distribution(labels: np.ndarray, k: int) -> list[float]:
    """Fraction of rows per cluster (sums to 1; empty list for no rows)."""
    if len(labels) == 0:
        return []
    counts = np.bincount(labels, minlength=k)
    return [float(c) / len(labels) for c in counts]


def label_metrics(x: np.ndarray, clusters: np.ndarray, labels: list, seed: int, sample_above: int = 10_000) -> dict:
    """How the clusters relate to the source's own labels: silhouettes in the same space, and NMI.

    Only rows with a label count; returns {} when fewer than two distinct labels exist.
    """
    keep = np.array([lab is not None for lab in labels])
    names = [lab for lab in labels if lab is not None]
    if len(set(names)) < 2:
        return {}
    codes = np.unique(np.array(names, dtype=object).astype(str), return_inverse=True)[1]
    xs, cs = x[keep], clusters[keep]
    return {
        "nmi": _round(float(normalized_mutual_info_score(codes, cs))),
        "silhouette_labels": _round(silhouette(xs, codes, seed, sample_above)),
        "silhouette_clusters": _round(silhouette(xs, cs, seed, sample_above)),
        "n_labels": len(set(names)),
        "n_labelled": int(keep.sum()),
    }


def top_labels(clusters: np.ndarray, labels: list, k: int, n: int = 5) -> list[list]:
    """Per cluster, the `n` most common source labels as [[label, count], ...]."""
    per = [Counter() for _ in range(k)]
    for c, lab in zip(clusters.tolist(), labels):
        if lab is not None:
            per[c][str(lab)] += 1
    return [[[lab, cnt] for lab, cnt in sorted(p.items(), key=lambda t: (-t[1], t[0]))[:n]] for p in per]


def _round(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(float(v), digits)
