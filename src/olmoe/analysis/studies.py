"""The five routing studies as reports: a JSON-ready dict of numbers per study, and the files
(`<study>.json`, a CSV, PNG plots) that `olmoe analyze` writes from it.

A report is computed from `RoutingCounts` only, so it can be rebuilt from saved counts files.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from olmoe.analysis import plots, stats
from olmoe.analysis.collect import VOCABULARY_KINDS, RoutingCounts
from olmoe.errors import InputError
from olmoe.fileio import write_atomic
from olmoe.revisions import parse_revision


def _shape(counts: RoutingCounts) -> dict:
    return {
        "num_layers": counts.num_layers,
        "num_experts": counts.num_experts,
        "top_k": counts.top_k,
        "tokens": counts.tokens,
    }


def _floats(values: np.ndarray) -> list:
    """Plain floats for JSON, NaN as null."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float).ravel()]


def saturation_report(early: RoutingCounts, final: RoutingCounts) -> dict:
    """Per layer, the overlap of the top-1 and top-k expert sets of `early` with `final`'s
    on the same tokens (random routing: k/E)."""
    ks = sorted({1, min(early.top_k, final.top_k)})
    return {
        "study": "saturation",
        **_shape(final),
        "saturation": {str(k): _floats(stats.router_saturation(early, final, k)) for k in ks},
        "random": {str(k): k / final.num_experts for k in ks},
    }


def saturation_series_report(early: Mapping[str, RoutingCounts], final: RoutingCounts) -> dict:
    """The saturation of each revision in `early` (in training order) against `final`, as the
    paper's figure traces routing over training: one `saturation_report` per revision, with
    the step its name gives (step10000-tokens41B: 10000; null for other names)."""
    if not early:
        raise InputError("the saturation series needs at least one revision")
    reports = [saturation_report(counts, final) for counts in early.values()]
    return {
        "study": "saturation_series",
        **_shape(final),
        "revisions": list(early),
        "steps": [parse_revision(name).step for name in early],
        "saturation": {k: [r["saturation"][k] for r in reports] for k in reports[0]["saturation"]},
        "random": reports[0]["random"],
    }


def coactivation_report(
    counts: RoutingCounts, layers: Sequence[int] | None = None, top_experts: int = 32
) -> dict:
    """For the chosen layers (default first, middle, last): the full co-activation matrix
    (all pairs, the paper's definition; and adjacent pairs, the release script's), and the
    most used experts the heatmap shows."""
    all_pairs, adjacent = stats.coactivation(counts), stats.coactivation(counts, adjacent=True)
    report = {"study": "coactivation", **_shape(counts), "layers": {}}
    for layer in plots.layer_choice(counts.num_layers, layers):
        report["layers"][str(layer)] = {
            "most_used_experts": stats.most_used_experts(counts, layer, top_experts).tolist(),
            "coactivation": all_pairs[layer].tolist(),
            "coactivation_adjacent_pairs": adjacent[layer].tolist(),
        }
    return report


def domains_report(counts_by_domain: Mapping[str, RoutingCounts]) -> dict:
    """Per domain and layer, each expert's routing slots per token over the top-k set (rows sum
    to k; uniform k/E) and over the top-1 choice (rows sum to 1; uniform 1/E)."""
    if not counts_by_domain:
        raise InputError("the domain study needs at least one corpus")
    first = next(iter(counts_by_domain.values()))
    return {
        "study": "domains",
        **{key: value for key, value in _shape(first).items() if key != "tokens"},
        "uniform": first.top_k / first.num_experts,
        "uniform_top1": 1 / first.num_experts,
        "domains": {
            name: {
                "tokens": counts.tokens,
                "shares": stats.expert_shares(counts).tolist(),
                "top1_shares": stats.expert_shares(counts, top1=True).tolist(),
            }
            for name, counts in counts_by_domain.items()
        },
    }


def vocabulary_report(
    counts: RoutingCounts,
    tokenizer=None,
    layers: Sequence[int] | None = None,
    min_count: int = 10,
    top: int = 10,
) -> dict:
    """Vocabulary specialisation per layer for each collected attribution kind, top-1 and
    top-k; and for the chosen layers, the input tokens each expert prefers (top-1)."""
    kinds = [kind for kind in VOCABULARY_KINDS if kind in counts.vocabulary]
    report = {
        "study": "vocabulary",
        **_shape(counts),
        "min_count": min_count,
        "specialization": {
            variant: {
                kind: _floats(
                    stats.vocabulary_specialization(counts, kind, variant == "top1", min_count)
                )
                for kind in kinds
            }
            for variant in ("top1", "topk")
        },
        "preferred_tokens": {},
    }
    for layer in plots.layer_choice(counts.num_layers, layers):
        preferred = stats.preferred_tokens(counts, layer, "input", True, min_count, top)
        report["preferred_tokens"][str(layer)] = {
            str(expert): [
                {
                    "id": token,
                    "token": tokenizer.decode([token]) if tokenizer is not None else None,
                    "share": share,
                    "count": count,
                }
                for token, share, count in tokens
            ]
            for expert, tokens in enumerate(preferred)
        }
    return report


def load_report(counts: RoutingCounts) -> dict:
    """Per layer: tokens per expert, max/mean and min/mean load, load and router entropy."""
    values = stats.load_statistics(counts)
    return {
        "study": "load",
        **_shape(counts),
        "uniform_entropy": float(np.log(counts.num_experts)),
        **{name: np.asarray(value).tolist() for name, value in values.items()},
    }


def summary(report: dict) -> str:
    """A few lines of the report's headline numbers, for a terminal."""
    study = report["study"]
    if study == "saturation":
        ks = list(report["saturation"])
        lines = ["layer  " + "  ".join(f"top-{k:<3}" for k in ks)]
        for layer, values in enumerate(zip(*(report["saturation"][k] for k in ks))):
            lines.append(f"{layer:5d}  " + "  ".join(f"{100 * v:5.1f}%" for v in values))
        lines.append("random " + "  ".join(f"{100 * report['random'][k]:5.1f}%" for k in ks))
    elif study == "saturation_series":
        ks = list(report["saturation"])
        width = max(len(name) for name in report["revisions"])
        header = "  ".join(f"top-{k:<3}" for k in ks)
        lines = [f"{'revision':<{width}}  {header}   (mean over layers)"]
        for index, name in enumerate(report["revisions"]):
            means = (np.mean(report["saturation"][k][index]) for k in ks)
            lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * v:5.1f}%" for v in means))
    elif study == "coactivation":
        lines = ["layer  strongest pair (i -> j)  co-activation"]
        for layer, entry in report["layers"].items():
            matrix = np.asarray(entry["coactivation"])
            i, j = np.unravel_index(np.argmax(matrix), matrix.shape)
            lines.append(f"{layer:>5}  {i:>6} -> {j:<14}  {100 * matrix[i, j]:5.1f}%")
    elif study == "domains":
        lines = ["domain            tokens  most specialised expert (share / uniform), per layer"]
        for name, domain in report["domains"].items():
            ratios = np.asarray(domain["shares"]).max(axis=1) / report["uniform"]
            text = " ".join(f"{r:.1f}x" for r in ratios)
            lines.append(f"{name:<14} {domain['tokens']:>9,}  {text}")
    elif study == "vocabulary":
        top1 = report["specialization"]["top1"]
        lines = ["layer  " + "  ".join(f"{kind:>9}" for kind in top1) + "   (top-1 expert)"]
        for layer, values in enumerate(zip(*top1.values())):
            cells = ("      n/a" if v is None else f"{100 * v:8.1f}%" for v in values)
            lines.append(f"{layer:5d}  " + "  ".join(cells))
    else:
        lines = ["layer  max/mean  min/mean  load entropy  router entropy  (of log E)"]
        for layer in range(report["num_layers"]):
            lines.append(
                f"{layer:5d}  {report['max_over_mean'][layer]:8.2f}  "
                f"{report['min_over_mean'][layer]:8.2f}  "
                f"{report['load_entropy'][layer] / report['uniform_entropy']:12.3f}  "
                f"{report['router_entropy'][layer] / report['uniform_entropy']:14.3f}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files
def write_report(report: dict, out_dir: str | Path, layers: Sequence[int] | None = None) -> list:
    """Write `<study>.json`, `<study>.csv` and the study's PNG plots into `out_dir`; return the
    paths. Each file is written under a temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = report["study"]
    written = [write_atomic(out / f"{study}.json", json.dumps(report, indent=1) + "\n")]
    header, rows = _TABLES[study](report)
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([header, *rows])
    written.append(write_atomic(out / f"{study}.csv", table.getvalue()))
    written += _PLOTS[study](report, out, layers)
    return written


def _saturation_table(report):
    ks = list(report["saturation"])
    rows = zip(*(report["saturation"][k] for k in ks))
    return ["layer", *(f"top{k}" for k in ks)], [[i, *row] for i, row in enumerate(rows)]


def _saturation_series_table(report):
    ks = list(report["saturation"])
    rows = [
        [name, step, layer, *(report["saturation"][k][index][layer] for k in ks)]
        for index, (name, step) in enumerate(zip(report["revisions"], report["steps"]))
        for layer in range(report["num_layers"])
    ]
    return ["revision", "step", "layer", *(f"top{k}" for k in ks)], rows


def _coactivation_table(report):
    rows = []
    for layer, entry in report["layers"].items():
        for i, (row, adjacent) in enumerate(
            zip(entry["coactivation"], entry["coactivation_adjacent_pairs"])
        ):
            rows += [[layer, i, j, value, adjacent[j]] for j, value in enumerate(row) if i != j]
    return ["layer", "expert_i", "expert_j", "coactivation", "coactivation_adjacent_pairs"], rows


def _domains_table(report):
    rows = []
    for name, domain in report["domains"].items():
        for layer, (shares, top1) in enumerate(zip(domain["shares"], domain["top1_shares"])):
            rows += [[name, layer, e, s, t] for e, (s, t) in enumerate(zip(shares, top1))]
    return ["domain", "layer", "expert", "share", "top1_share"], rows


def _vocabulary_table(report):
    columns = [(v, k) for v, kinds in report["specialization"].items() for k in kinds]
    rows = zip(*(report["specialization"][v][k] for v, k in columns))
    header = ["layer", *(f"{kind}_{variant}" for variant, kind in columns)]
    return header, [[i, *row] for i, row in enumerate(rows)]


def _load_table(report):
    rows = [
        [layer, e, n] for layer, load in enumerate(report["tokens_per_expert"])
        for e, n in enumerate(load)
    ]  # fmt: skip
    return ["layer", "expert", "routing_slots"], rows


def _saturation_plots(report, out, layers):
    saturation = {int(k): np.asarray(v) for k, v in report["saturation"].items()}
    title = f"router saturation over {report['tokens']:,} tokens"
    return [plots.plot_saturation(saturation, report["num_experts"], out / "saturation.png", title)]


def _saturation_series_plots(report, out, layers):
    saturation = {int(k): np.asarray(v, dtype=float) for k, v in report["saturation"].items()}
    path = out / "saturation_series.png"
    revisions, steps = report["revisions"], report["steps"]
    return [
        plots.plot_saturation_series(
            saturation, revisions, steps, report["num_experts"], path, layers
        )
    ]


def _coactivation_plots(report, out, layers):
    chosen = {int(layer): entry for layer, entry in report["layers"].items()}
    matrices = {layer: np.asarray(entry["coactivation"]) for layer, entry in chosen.items()}
    experts = {layer: np.asarray(entry["most_used_experts"]) for layer, entry in chosen.items()}
    return [plots.plot_coactivation(matrices, experts, out / "coactivation.png")]


def _domains_plots(report, out, layers):
    written = []
    for layer in plots.layer_choice(report["num_layers"], layers):
        for top1, key, uniform, suffix in (
            (False, "shares", report["uniform"], ""),
            (True, "top1_shares", report["uniform_top1"], "-top1"),
        ):
            shares = {name: np.asarray(d[key][layer]) for name, d in report["domains"].items()}
            path = out / f"domains-layer{layer}{suffix}.png"
            written.append(plots.plot_expert_shares(shares, uniform, layer, path, top1=top1))
    return written


def _vocabulary_plots(report, out, layers):
    written = []
    for variant, kinds in report["specialization"].items():
        values = {kind: np.asarray(v, dtype=float) for kind, v in kinds.items()}
        path = out / f"vocabulary-{variant}.png"
        written.append(plots.plot_vocabulary(values, path, top1=variant == "top1"))
    return written


def _load_plots(report, out, layers):
    values = {name: np.asarray(report[name]) for name in (
        "max_over_mean", "min_over_mean", "load_entropy", "router_entropy")}  # fmt: skip
    return [plots.plot_load(values, report["num_experts"], out / "load.png")]


_TABLES = {
    "saturation": _saturation_table,
    "saturation_series": _saturation_series_table,
    "coactivation": _coactivation_table,
    "domains": _domains_table,
    "vocabulary": _vocabulary_table,
    "load": _load_table,
}
_PLOTS = {
    "saturation": _saturation_plots,
    "saturation_series": _saturation_series_plots,
    "coactivation": _coactivation_plots,
    "domains": _domains_plots,
    "vocabulary": _vocabulary_plots,
    "load": _load_plots,
}
