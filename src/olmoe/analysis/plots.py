"""PNG figures of the routing studies, drawn with matplotlib's object API (no pyplot, no
display needed). Every figure has a fixed size in pixels: `WIDTH` x the height each function
states, at `DPI`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from olmoe.errors import InputError
from olmoe.fileio import atomic_path

DPI = 100
WIDTH = 10.0  # inches


def _figure(height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'olmoe[plot]' (or matplotlib)"
        ) from None
    return Figure(figsize=(WIDTH, height), dpi=DPI)


def _save(figure, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    return Path(path)


def plot_saturation(
    saturation: Mapping[int, np.ndarray], num_experts: int, path, title: str = ""
) -> Path:
    """Lines of saturation per layer, one per k, with the random-routing level k/E dashed.
    Height 4.5 in."""
    figure = _figure(4.5)
    axes = figure.add_subplot()
    for k, values in sorted(saturation.items()):
        line = axes.plot(np.arange(len(values)), 100 * values, marker="o", label=f"top-{k}")[0]
        axes.axhline(100 * k / num_experts, color=line.get_color(), linestyle="--", linewidth=1)
    axes.set(xlabel="layer", ylabel="router saturation (%)", ylim=(0, 105), title=title)
    axes.legend(title="dashed: random routing", loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_saturation_series(
    saturation: Mapping[int, np.ndarray],
    revisions: Sequence[str],
    steps: Sequence[int | None],
    num_experts: int,
    path,
    layers: Sequence[int] | None = None,
) -> Path:
    """Saturation against the final model over training, one panel per k: a line for each
    chosen layer (default first, middle, last) and for the mean over layers, the random level
    k/E dashed. `saturation[k]` is (revisions, layers). The x axis is the step when every
    revision's name gives one (step10000-tokens41B), else the revisions in order. Height 4.5 in."""
    figure = _figure(4.5)
    panels = figure.subplots(1, len(saturation), squeeze=False)[0]
    by_step = all(step is not None for step in steps)
    x = np.asarray(steps if by_step else range(len(revisions)))
    for axes, (k, values) in zip(panels, sorted(saturation.items())):
        for layer in layer_choice(values.shape[1], layers):
            axes.plot(x, 100 * values[:, layer], marker="o", label=f"layer {layer}")
        axes.plot(x, 100 * values.mean(axis=1), color="black", marker="s", label="mean")
        axes.axhline(100 * k / num_experts, color="gray", linestyle="--", linewidth=1)
        axes.set(ylabel=f"top-{k} saturation (%)", ylim=(0, 105), title=f"top-{k}")
        if by_step:
            axes.set_xlabel("step")
        else:
            axes.set_xticks(x, revisions, rotation=30, ha="right", fontsize=7)
        axes.legend(title="dashed: random routing", fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_coactivation(
    matrices: Mapping[int, np.ndarray], experts: Mapping[int, np.ndarray], path
) -> Path:
    """Heatmaps of co-activation N(Ei, Ej) / N(Ei) between each chosen layer's most used
    experts (rows i, columns j). Height 4.5 in."""
    from matplotlib import colormaps

    figure = _figure(4.5)
    grid = figure.subplots(1, len(matrices), squeeze=False)[0]
    image = None
    for axes, (layer, matrix) in zip(grid, sorted(matrices.items())):
        ids = experts[layer]
        image = axes.imshow(
            100 * matrix[np.ix_(ids, ids)], vmin=0, vmax=100, cmap=colormaps["viridis"]
        )
        ticks = np.arange(len(ids))
        step = max(1, len(ids) // 8)
        axes.set_xticks(ticks[::step], [str(i) for i in ids[::step]], fontsize=7)
        axes.set_yticks(ticks[::step], [str(i) for i in ids[::step]], fontsize=7)
        axes.set(title=f"layer {layer}", xlabel="expert j", ylabel="expert i")
    figure.colorbar(image, ax=list(grid), label="co-activation (%)", shrink=0.8)
    return _save(figure, path)


def plot_expert_shares(
    shares: Mapping[str, np.ndarray], uniform: float, layer: int, path, top1: bool = False
) -> Path:
    """Bars of each expert's share of a domain's routing slots, per domain, with the uniform
    level (k/E, or 1/E for the top-1 variant). Height 4 in."""
    figure = _figure(4.0)
    axes = figure.add_subplot()
    num_experts = len(next(iter(shares.values())))
    width = 0.8 / len(shares)
    for index, (domain, values) in enumerate(shares.items()):
        x = np.arange(num_experts) + (index - (len(shares) - 1) / 2) * width
        axes.bar(x, values, width=width, label=domain)
    axes.axhline(uniform, color="black", linestyle="--", linewidth=1, label="uniform")
    which = "top-1 expert" if top1 else "top-k experts"
    axes.set(
        xlabel="expert",
        ylabel="routing share per token",
        title=f"layer {layer}: share of tokens routed to each expert ({which})",
        xlim=(-1, num_experts),
    )
    axes.legend(fontsize=8, ncol=min(4, len(shares) + 1))
    figure.tight_layout()
    return _save(figure, path)


def plot_vocabulary(specialization: Mapping[str, np.ndarray], path, top1: bool = True) -> Path:
    """Lines of vocabulary specialisation per layer, one per attribution kind. Height 4.5 in."""
    figure = _figure(4.5)
    axes = figure.add_subplot()
    for kind, values in specialization.items():
        axes.plot(np.arange(len(values)), 100 * values, marker="o", label=f"{kind} token")
    which = "top-1 expert" if top1 else "top-k experts"
    axes.set(
        xlabel="layer",
        ylabel="vocabulary specialisation (%)",
        ylim=(0, 105),
        title=f"share of a token id's occurrences routed to its most frequent expert ({which})",
    )
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_load(statistics: Mapping[str, np.ndarray], num_experts: int, path) -> Path:
    """Two panels over layers: max/mean and min/mean expert load; load and router entropy as a
    share of the uniform entropy log E. Height 4 in."""
    figure = _figure(4.0)
    left, right = figure.subplots(1, 2)
    layers = np.arange(len(statistics["max_over_mean"]))
    left.plot(layers, statistics["max_over_mean"], marker="o", label="max / mean")
    left.plot(layers, statistics["min_over_mean"], marker="o", label="min / mean")
    left.axhline(1, color="black", linestyle="--", linewidth=1)
    left.set(xlabel="layer", ylabel="tokens per expert / mean", title="expert load")
    left.legend()
    uniform = np.log(num_experts)
    right.plot(layers, statistics["load_entropy"] / uniform, marker="o", label="load")
    right.plot(layers, statistics["router_entropy"] / uniform, marker="o", label="router softmax")
    right.set(xlabel="layer", ylabel="entropy / log E", ylim=(0, 1.05), title="routing entropy")
    right.legend()
    for axes in (left, right):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def layer_choice(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """The layers to draw: the given ones, else the first, middle and last (the paper's 0, 7,
    15 for 16 layers)."""
    if layers is None:
        return sorted({0, (num_layers - 1) // 2, num_layers - 1})
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist; the model has layers 0-{num_layers - 1}")
    return sorted(set(layers))
