"""`olmoe plot RUN_DIR`: a run's curves and its expert load, as PNG files (matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from olmoe.errors import DataError
from olmoe.train.trainer import LOG_NAME


def read_log(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a run's log.jsonl."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {LOG_NAME} in {run_dir}: is it a training run directory?")
    steps, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number} is not JSON") from None
        (evals if "val_loss" in record else steps).append(record)
    if not steps:
        raise DataError(f"{path} has no training steps yet")
    return steps, evals


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write curves.png (losses, LB, z-loss, grad norm, lr, tokens/s, load imbalance),
    expert_load.png (each layer's share of routing slots per expert over the whole run,
    relative to uniform) and, for DPO and KTO runs, preference.png (TRL's rewards/* and
    logps/*) into `out_dir` (default: the run directory). Returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OSError("olmoe plot needs matplotlib: pip install 'olmoe[plot]'") from None
    steps, evals = read_log(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = [r["step"] for r in steps]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    ax = axes[0, 0]
    main = "ce" if "ce" in steps[0] else "loss"  # DPO and KTO log their own loss, no CE
    title = "cross-entropy (nats/token)" if main == "ce" else "loss"
    ax.plot(x, [r[main] for r in steps], label=f"train {main}", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="valid")
        unigram = [r.get("unigram_loss") for r in evals if r.get("unigram_loss") is not None]
        if unigram:
            ax.axhline(unigram[-1], color="grey", ls="--", label="unigram baseline")
    ax.set(title=title, xlabel="step")
    ax.legend()
    panels = [
        (axes[0, 1], "lb", "load-balancing loss (1 = balanced)"),
        (axes[0, 2], "z", "router z-loss"),
        (axes[1, 0], "grad_norm", "gradient norm (before clipping)"),
        (axes[1, 1], "lr", "learning rate"),
    ]
    for ax, key, title in panels:
        ax.plot(x, [r[key] for r in steps], lw=1)
        ax.set(title=title, xlabel="step")
    ax = axes[1, 2]
    load_max = np.array([r["load_max"] for r in steps])  # (steps, layers)
    for layer in range(load_max.shape[1]):
        ax.plot(x, load_max[:, layer], lw=1, label=f"layer {layer}")
    ax.set(title="busiest expert / mean load", xlabel="step")
    if load_max.shape[1] <= 8:
        ax.legend(fontsize="small")
    curves = out / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    counts = np.sum([r["expert_counts"] for r in steps], axis=0, dtype=np.float64)  # (L, E)
    relative = counts / counts.mean(axis=1, keepdims=True)
    layers, experts = relative.shape
    fig, ax = plt.subplots(figsize=(max(6, experts * 0.18 + 2), max(3, layers * 0.35 + 1.5)))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title="routing slots per expert / uniform share")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    heatmap = out / "expert_load.png"
    fig.savefig(heatmap, dpi=100)
    plt.close(fig)
    written = [curves, heatmap]
    if any(key.startswith("rewards/") for key in steps[-1]):
        written.append(_plot_preference(plt, steps, out / "preference.png"))
    return written


# TRL's preference metrics, in the panels TRL users read them in.
PREFERENCE_PANELS = (
    (("rewards/chosen", "rewards/rejected"), "rewards: beta (log pi - log ref)"),
    (("rewards/accuracies",), "reward accuracy (chosen > rejected)"),
    (("rewards/margins", "kl"), "reward margin (DPO) / KL estimate (KTO)"),
    (("logps/chosen", "logps/rejected"), "policy log-probabilities (summed)"),
)


def _plot_preference(plt, steps: list[dict], path: Path) -> Path:
    """preference.png: DPO's or KTO's rewards, accuracy, margin or KL, and log-probabilities."""
    fig, axes = plt.subplots(1, len(PREFERENCE_PANELS), figsize=(20, 4), constrained_layout=True)
    for ax, (keys, title) in zip(axes, PREFERENCE_PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in steps if key in r]
            if points:
                ax.plot(*zip(*points), lw=1, label=key)
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
