"""The map sweep (cbr.evaluation.sweep) as a text table, a CSV and a figure (``map_sweep.png``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cbr.files import atomic_open
from cbr.reporting.plots import new_figure, save_png
from cbr.store.reliability import NO_BETTER

__all__ = ["format_sweep", "write_sweep"]

COLUMNS = ("target", "method", "layer", "localised", "pointing_game", "energy_pointing_game", "iou_top",
           "deletion_auc", "seconds_per_map")


def _f(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def format_sweep(result: dict) -> str:
    """The sweep as one text table, best pointing game first within each target."""
    top = int(round(100 * result["top"]))
    lines = [f"maps on {result['n']} images ({result['masks']} with a lesion mask"
             + (f", {result['folds']} folds" if result.get("folds") else "") + f"); IoU of the top {top}% of each "
             "map; deletion: lower is better; seconds per map after the shared trunk pass", "",
             f"{'target':<20}{'method':<16}{'layer':<30}{'pointing':>9}{'energy':>8}{'IoU@' + str(top):>8}"
             f"{'deletion':>10}{'s/map':>9}"]
    order = sorted(result["rows"], key=lambda r: (r["target"], -(r["pointing_game"] or -1)))
    for r in order:
        lines.append(f"{r['target']:<20}{r['method'][:15]:<16}{r['layer'][:29]:<30}{_f(r['pointing_game'], 2):>9}"
                     f"{_f(r['energy_pointing_game'], 2):>8}{_f(r['iou_top'], 2):>8}{_f(r['deletion_auc']):>10}"
                     f"{_f(r['seconds_per_map'], 4):>9}" + (f"  {NO_BETTER}" if r.get("no_better_than_a_guess") else ""))
    return "\n".join(lines)


def write_sweep(result: dict, out_dir) -> dict:
    """Write ``map_sweep.csv`` and ``map_sweep.png`` (pointing game per layer, one panel per target)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "map_sweep.csv"
    with atomic_open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in result["rows"]:
            w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    targets = sorted({r["target"] for r in result["rows"]})
    # a fused method's rows carry its own stages as their layer: one more group on the axis
    layers = list(dict.fromkeys([*result["layers"], *(r["layer"] for r in result["rows"])]))
    fig = new_figure(max(5.0, 1.2 * len(layers) + 2), 2.6 * len(targets))
    for i, target in enumerate(targets):
        ax = fig.add_subplot(len(targets), 1, i + 1)
        rows = [r for r in result["rows"] if r["target"] == target]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / max(1, len(methods))
        for j, method in enumerate(methods):
            values = [next((r["pointing_game"] for r in rows if r["method"] == method and r["layer"] == layer), None)
                      for layer in layers]
            ax.bar(np.arange(len(layers)) + j * width, [np.nan if v is None else v for v in values], width,
                   label=method)
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
        ax.set_xticklabels(layers, fontsize=7, rotation=12, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("pointing game")
        ax.set_title(f"{target} maps", fontsize=9)
        ax.legend(fontsize=7, ncol=min(4, len(methods)))
    figure = save_png(fig, out / "map_sweep.png")
    return {"table": str(table), "figure": str(figure)}
