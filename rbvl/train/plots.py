"""The pictures a person looks at after a run: p over time, per-domain eval loss, the last Gram matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rbvl.train.metrics import read_metrics


def plot_run(run_dir: str | Path, domain_names: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    m = len(domain_names)
    colors = plt.get_cmap("tab20" if m > 10 else "tab10")(np.arange(m) % 20)

    balance = read_metrics(run_dir, "balance")
    if balance:
        last = max([r["step"] for r in read_metrics(run_dir)] + [balance[-1]["step"]])
        # each p holds for the steps its data was drawn with: from the step it applies from to the next one
        applies = [min(r.get("applies_from_step", r["step"] + 1) - 1, last) for r in balance]
        steps = [0] + applies + [last]
        p = np.array([balance[0]["p_before"]] + [r["p"] for r in balance] + [balance[-1]["p"]])  # (updates + 2, m)
        starts, widths = np.array(steps[:-1]), np.diff(steps)  # p[j] holds over [steps[j], steps[j + 1])
        bottom = np.zeros(len(starts))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, name in enumerate(domain_names):
            ax.bar(starts, p[:-1, i], widths, bottom=bottom, align="edge", color=colors[i], label=name, linewidth=0)
            bottom += p[:-1, i]
        ax.set(xlabel="optimizer step", ylabel="proportion p", title="Domain proportions over training", ylim=(0, 1))
        ax.set_xlim(0, last)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        written.append(_save(fig, run_dir / "proportions.png"))

        G = np.array(balance[-1]["gram"])
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        vmax = np.abs(G).max() or 1.0
        im = ax.imshow(G, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xticks(range(m), domain_names, rotation=90, fontsize=7)
        ax.set_yticks(range(m), domain_names, fontsize=7)
        ax.set_title(f"Gram matrix of domain gradients (step {balance[-1]['step']})")
        fig.colorbar(im, ax=ax)
        written.append(_save(fig, run_dir / "gram.png"))

    evals = read_metrics(run_dir, "eval")
    if evals:
        steps = [r["step"] for r in evals]
        losses = np.array([[np.nan if v is None else v for v in r["loss_per_domain"]] for r in evals])  # (n_eval, m)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, name in enumerate(domain_names):
            ax.plot(steps, losses[:, i], marker="o", color=colors[i], label=name)
        ax.plot(steps, [r["loss"] for r in evals], color="black", linewidth=2.5, label="mixture (q-weighted)")
        ax.set(xlabel="optimizer step", ylabel="eval loss", title="Per-domain eval loss")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        written.append(_save(fig, run_dir / "eval_loss.png"))

    train = read_metrics(run_dir, "train")
    if train:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="black")
        ax.set(xlabel="optimizer step", ylabel="train loss", title="Training loss", yscale="log")
        written.append(_save(fig, run_dir / "train_loss.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
