"""The pictures a person looks at after a run: p over time, the domains' gradient cosines and norms over the run,
per-domain eval and train loss. A plot with nothing to show (no eval set, no Balance update) is not written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rbvl.train.metrics import read_metrics


def plot_run(run_dir: str | Path, domain_names: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = len(domain_names)
    colors = plt.get_cmap("tab20" if m > 10 else "tab10")(np.arange(m) % 20)
    written = []
    balance = read_metrics(run_dir, "balance")
    if balance:
        last = max([r["step"] for r in read_metrics(run_dir)] + [balance[-1]["step"]])
        written.append(_proportions(plt, balance, domain_names, colors, last, run_dir / "proportions.png"))
        written.append(_gram(plt, balance, domain_names, run_dir / "gram.png"))
    evals = [r for r in read_metrics(run_dir, "eval") if any(v is not None for v in r["loss_per_domain"])]
    if evals:
        written.append(_losses(plt, evals, domain_names, colors, "eval", run_dir / "eval_loss.png"))
    train = [r for r in read_metrics(run_dir, "train") if r.get("loss") is not None]
    if train:
        written.append(_losses(plt, train, domain_names, colors, "train", run_dir / "train_loss.png"))
    return written


def _proportions(plt, balance, names, colors, last, path):
    # each p holds for the steps its data was drawn with: from the step it applies from to the next one
    applies = [min(r.get("applies_from_step", r["step"] + 1) - 1, last) for r in balance]
    steps = [0] + applies + [last]
    p = np.array([balance[0]["p_before"]] + [r["p"] for r in balance] + [balance[-1]["p"]])  # (updates + 2, m)
    starts, widths = np.array(steps[:-1]), np.diff(steps)  # p[j] holds over [steps[j], steps[j + 1])
    bottom = np.zeros(len(starts))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, name in enumerate(names):
        ax.bar(starts, p[:-1, i], widths, bottom=bottom, align="edge", color=colors[i], label=name, linewidth=0)
        bottom += p[:-1, i]
    changes = np.abs(np.diff(p[:-1], axis=0)).sum(1)  # L1 change of p at each update
    stability = f" (median L1 change per update {np.median(changes):.2f})" if len(changes) else ""
    ax.set(xlabel="optimizer step", ylabel="proportion p", title=f"Domain proportions over training{stability}", ylim=(0, 1))  # fmt: skip
    ax.set_xlim(0, last)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(plt, fig, path)


def _gram(plt, balance, names, path, panels: int = 4):
    """Up to `panels` windows spread over the run: G as cosines G_ij / √(G_ii G_jj) on a fixed [-1, 1] scale (the
    diagonal is 1 and no longer drowns the rest), and each domain's gradient norm √G_ii beside it."""
    picks = sorted({round(j) for j in np.linspace(0, len(balance) - 1, min(panels, len(balance)))})
    fig, axes = plt.subplots(2, len(picks), figsize=(3.2 * len(picks) + 1.2, 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2]})  # fmt: skip
    m = len(names)
    image = None
    for col, j in enumerate(picks):
        G = np.array(balance[j]["gram"], dtype=float)
        diag = np.diag(G).copy()
        norms = np.sqrt(np.clip(diag, 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = G / np.outer(norms, norms)
        cos[~np.isfinite(cos)] = np.nan  # a de-biased diagonal can be <= 0 in a noisy window: no cosine there
        ax = axes[0, col]
        image = ax.imshow(np.clip(cos, -1, 1), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"step {balance[j]['step']}", fontsize=9)
        ax.set_xticks(range(m), names if m <= 16 else [], rotation=90, fontsize=6)
        ax.set_yticks(range(m), names if col == 0 and m <= 16 else [], fontsize=6)
        axes[1, col].bar(range(m), norms, color="grey")
        axes[1, col].set_xticks([])
        axes[1, col].set_ylabel("‖g_i‖" if col == 0 else "", fontsize=8)
    fig.colorbar(image, ax=axes[0, :].tolist(), fraction=0.03, label="cosine of domain gradients")
    fig.suptitle("Domain gradients: cosines (top) and norms (bottom), over the run")
    return _save(plt, fig, path, tight=False)


def _losses(plt, rows, names, colors, kind, path):
    """Per-domain loss over the run, as lines with markers, and the mixture in black; a single eval as bars."""
    steps = [r["step"] for r in rows]
    losses = np.array([[np.nan if v is None else v for v in r.get("loss_per_domain") or [None] * len(names)]
                       for r in rows], dtype=float)  # fmt: skip
    mixture = [r["loss"] if r["loss"] is not None else np.nan for r in rows]
    label = "mixture (q-weighted)" if kind == "eval" else "all samples"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(rows) == 1:
        values = list(losses[0]) + [mixture[0]]
        bars = ax.barh(range(len(values)), values, color=list(colors) + ["black"])
        ax.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)  # the bars start at 0: the numbers tell them apart
        ax.set_yticks(range(len(values)), list(names) + [label], fontsize=8)
        ax.set(xlabel=f"{kind} loss", title=f"Per-domain {kind} loss at step {steps[0]}")
        ax.invert_yaxis()
        return _save(plt, fig, path)
    for i, name in enumerate(names):
        if np.isfinite(losses[:, i]).any():
            ax.plot(steps, losses[:, i], marker="o", markersize=3, color=colors[i], label=name)
    ax.plot(steps, mixture, marker="o", markersize=4, color="black", linewidth=2.5, label=label)
    ax.set(xlabel="optimizer step", ylabel=f"{kind} loss", title=f"Per-domain {kind} loss")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
