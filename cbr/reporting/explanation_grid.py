"""``explanations.png``: a few images x every compared method, each column captioned with its scores."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from cbr.files import atomic_write
from explain.overlay import load_font, render_overlay

__all__ = ["write_explanation_grid", "GRID_IMAGES"]

GRID_IMAGES = 4  # rows of the figure
TILE = 128


def _caption(row: dict) -> list[str]:
    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    name, _, params = row["method"].partition("(")
    lines = [name, f"({params}"[:21] if params else ""]
    if row.get("energy_pointing_game") is not None:
        lines.append(f"PG {f(row['pointing_game'])} EPG {f(row['energy_pointing_game'])}")
    lines.append(f"del {f(row['deletion_auc'])} ins {f(row['insertion_auc'])}")
    lines.append(f"rho {f(row['randomisation_spearman'])} {f(row['seconds_per_map'])} s")
    return lines


def write_explanation_grid(result: dict, path, *, target: str | None = None) -> Path:
    """Draw compare_explanations' maps for one target (the first one by default) into `path` (PNG).

    Rows: up to GRID_IMAGES images (the first column is the image with its label); columns: the
    methods, each map on its own colour scale, headed by the method's scores over all images.
    """
    target = target or result["targets"][0]
    rows = [r for r in result["rows"] if r["target"] == target and r["method"] != "random"]
    n = min(GRID_IMAGES, result["n"])
    font = load_font(11)
    head = 16 * 5 + 6
    label_h = 16
    width = TILE * (len(rows) + 1)
    height = head + n * (TILE + label_h)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"target: {target}", fill="black", font=font)
    for c, row in enumerate(rows, start=1):
        for j, line in enumerate(_caption(row)):
            draw.text((c * TILE + 3, 3 + 16 * j), line, fill="black", font=font)
    for i in range(n):
        y = head + i * (TILE + label_h)
        picture = result["pictures"][i]
        sheet.paste(picture.convert("RGB").resize((TILE, TILE)), (0, y))
        draw.text((3, y + TILE + 1), str(result["labels"][i])[:20], fill="black", font=font)
        for c, row in enumerate(rows, start=1):
            raw = result["maps"][(row["method"], target)][i]
            sheet.paste(render_overlay(picture, raw).resize((TILE, TILE)), (c * TILE, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(path, buf.getvalue(), durable=False)
    return path
