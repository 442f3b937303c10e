"""``failures.html``: the evaluation's worst misclassified queries, each beside its neighbours.

A confident error teaches more than a hesitant one, so the wrong answers are shown most confident
first (then abstentions, which are wrong too). Each row: the query (with its map when the
evaluation made maps), the true and predicted labels, and its k neighbours with their labels and
similarities, the wrong ones marked. Self-contained (images inline as JPEG data URIs), every text
escaped, no script: it opens from a mail attachment as safely as from disk.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from cbr.data.crop import model_view
from cbr.data.sources import read_source
from cbr.errors import CbrError
from cbr.files import atomic_write
from explain.overlay import render_overlay

__all__ = ["FAILURES_SHOWN", "worst_failures", "write_failures"]

FAILURES_SHOWN = 24  # queries in the page
TILE = 128  # pixels per thumbnail

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}
figure{display:inline-block;margin:0 4px;text-align:center;font-size:12px}
figure.wrong figcaption{color:#b00020;font-weight:600}img{display:block;width:128px;height:128px}
.missing{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}"""


def worst_failures(outcomes, limit: int = FAILURES_SHOWN) -> list:
    """The misclassified outcomes (abstentions included), most confident wrong answers first."""
    wrong = [o for o in outcomes if o.predicted != o.record.label]
    return sorted(wrong, key=lambda o: (o.predicted is None, -float(o.prediction.get("confidence") or 0.0),
                                        o.record.path))[:limit]


def _jpeg(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(path, raw=None, model=None) -> str | None:
    """A JPEG data URI of the image at ``path`` in the ``model``'s view (its crop and window, so that
    its map lines up; None: letterboxed), its map blended in; None if unreadable."""
    try:
        img = model_view(read_source(path, window=getattr(model, "window", "auto"))[0], TILE,
                         getattr(model, "crop", "none"))
    except (CbrError, OSError, ValueError):
        return None
    if raw is not None:
        img = render_overlay(img, raw)
    return _jpeg(img)


def _figure(uri, caption: str, wrong: bool = False) -> str:
    e = html.escape
    picture = f'<img src="{uri}" alt="">' if uri else '<div class="missing">unreadable</div>'
    return f'<figure class="{"wrong" if wrong else ""}">{picture}<figcaption>{e(caption)}</figcaption></figure>'


def _row(o, model=None) -> str:
    e = html.escape
    raw = next(iter(o.maps.values()), None) if o.maps else None
    cells = [_figure(_thumbnail(o.record.path, raw, model), f"query: {o.record.label}")]
    for rank, n in enumerate(getattr(o, "hits", None) or [], 1):
        sim = n.get("similarity")
        caption = f"#{rank} {n.get('label')}" + ("" if sim is None else f" ({sim:.3f})")
        cells.append(_figure(_thumbnail(n["path"], model=model) if n.get("path") else None, caption, n.get("label") != o.record.label))
    said = "abstained" if o.predicted is None else f"predicted {o.predicted}"
    fold = "" if o.fold is None else f", fold {o.fold}"
    head = (f"<b>{e(str(o.record.path))}</b><br>true {e(str(o.record.label))}, {e(said)} "
            f"(confidence {float(o.prediction.get('confidence') or 0):.3f}){e(fold)}")
    return f"<tr><td>{head}<br>{''.join(cells)}</td></tr>"


def write_failures(outcomes, out_dir, *, limit: int = FAILURES_SHOWN, model=None) -> Path:
    """Write ``failures.html`` into ``out_dir`` (atomically); returns its path.

    Args:
        outcomes: the evaluated queries (``cbr.evaluation.outcome.Outcome``).
        out_dir: the report folder.
        limit: how many failures the page shows.
        model: the ``ModelConfig`` of the maps (its crop and window); None: letterbox only.
    """
    shown = worst_failures(outcomes, limit)
    n_wrong = sum(o.predicted != o.record.label for o in outcomes)
    rows = "".join(_row(o, model) for o in shown) or "<tr><td>No misclassified query.</td></tr>"
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>cbr evaluate: failures</title>'
            f"<style>{_CSS}</style></head><body><h1>Misclassified queries</h1>"
            f"<p>{n_wrong} of {len(outcomes)} queries wrong (abstentions included); the {len(shown)} most "
            f"confident shown first, each beside its neighbours (wrong labels in red).</p>"
            f"<table>{rows}</table></body></html>\n")
    path = Path(out_dir) / "failures.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page)
    return path
