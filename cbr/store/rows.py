"""Row encoding: the one way each value goes into the case base's rows and comes back out.

Times are stored in UTC; maps are stored as float16 with their raw magnitude (explain.rawmap's
encoding); a query id named by a user is looked up with the same actionable message everywhere.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select

from cbr.errors import DamagedRowError, NotFoundError
from cbr.store.chunks import rows_in
from cbr.store.schema import Case, Explanation, Query
from explain.rawmap import decode_map, encode_map

__all__ = ["as_utc", "iso", "explanation_row", "explanation_values", "map_fields", "get_query", "case_locators", "query_image_locator"]


def as_utc(dt: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands them back naive, in UTC)."""
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def iso(dt: datetime | None) -> str | None:
    """UTC times as ``YYYY-MM-DDTHH:MM:SS+00:00``, the same on every backend."""
    dt = as_utc(dt)
    return None if dt is None else dt.replace(microsecond=0).isoformat()


def explanation_row(raw, *, model_id: int, method: str, target: str, role: str, case_id: int | None = None,
                    query_id: int | None = None) -> Explanation:
    """An ``Explanation`` row holding a raw low-resolution map (float16, scaled to [0, 1]).

    Args:
        raw: the 2-D raw map.
        model_id: the model whose activations it explains.
        method: the CAM method; target: what it explains (``class:X``, ``similarity:query``, ...).
        role: ``case`` (stored at index time), ``query`` or ``neighbour`` (query time).
        case_id, query_id: the case and/or query it belongs to.
    """
    return Explanation(**explanation_values(raw, model_id=model_id, method=method, target=target, role=role,
                                            case_id=case_id, query_id=query_id))


def explanation_values(raw, *, model_id: int, method: str, target: str, role: str, case_id: int | None = None,
                       query_id: int | None = None) -> dict:
    """The columns of :func:`explanation_row` as a dict, for many rows in one ``insert`` (executemany)."""
    data, shape, scale = encode_map(raw)
    return dict(model_id=model_id, case_id=case_id, query_id=query_id, role=role, method=method, target=target,
                height=shape[0], width=shape[1], dtype="float16", scale=float(scale), data=data)


def map_fields(row: Explanation, *, decode: bool = True) -> dict:
    """An ``Explanation`` row as {"method", "target", "shape", "scale", "map"} (the raw map decoded);
    without "map" when not ``decode`` (``cbr show`` prints no pixels and need not import numpy)."""
    fields = {"method": row.method, "target": row.target, "shape": [row.height, row.width], "scale": row.scale}
    if decode:
        try:
            fields["map"] = decode_map(row.data, (row.height, row.width), row.scale)
        except (TypeError, ValueError) as e:
            raise DamagedRowError(f"explanations row {row.id} (a {row.role} map of model {row.model_id}) is damaged "
                                  f"({e}); `cbr db check` lists every such row, and `cbr index --rebuild` drops "
                                  "them") from None
    return fields


def get_query(s, cb, query_id: int) -> Query:
    """The ``Query`` row ``query_id`` in session ``s``, or NotFoundError saying how to list them."""
    q = s.get(Query, int(query_id))
    if q is None:
        raise NotFoundError(f"no query {query_id} in {cb.display}; list them with `cbr history --db {cb.display}`")
    return q


def case_locators(cb, case_ids) -> dict[int, str]:
    """Where each case's pixels are read from (its file, frame or slice), by case id.

    A case shown under a neutral locator (a DICOM case of a pseudonymised case base) is read from
    its file, which this is the only way to get: it is for reading pixels, never for display.
    """
    ids = sorted({int(i) for i in case_ids})
    if not ids:
        return {}
    with cb.read() as s:
        rows = rows_in(s, select(Case.id, Case.path, Case.file_locator), Case.id, ids)
    return {case_id: file or path for case_id, path, file in rows}


def query_image_locator(cb, query_id: int) -> str:
    """Where a recorded query's image is read from (see :func:`case_locators`); NotFoundError if none."""
    with cb.read() as s:
        return get_query(s, cb, query_id).readable_image
