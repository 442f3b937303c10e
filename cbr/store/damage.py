"""Stored values that do not decode, each named by its row with the repair.

SQLite's own check sees pages, not values: a map blob of the wrong size, a calibration that is
not JSON, an embedding of 4 bytes or of NaNs, a malformed sha256 all pass it. ``find_damage``
decodes every blob and JSON value for ``cbr db check``; the readers refuse such a row with
``DamagedRowError`` (one line: the row and the repair) instead of a traceback or a silently
missing case; ``drop_damaged`` is the repair that ``cbr index --rebuild`` runs first: it deletes
the rows cbr can re-create (maps, calibrations) or re-embed from the image (embeddings).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
from sqlalchemy import JSON, Text, cast, delete, func, select

from cbr.errors import DamagedRowError
from cbr.store.location import db_args
from cbr.store.schema import Base, Case, Embedding, Explanation, IndexManifest, Model, Query

__all__ = ["Damage", "find_damage", "drop_damaged", "vector_problem", "map_problem", "decoded", "rebuild_hint",
           "SHA256", "EMBEDDING_REPAIR"]

SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_FINDINGS = 50  # per kind, in `cbr db check`

# JSON values whose shape cbr relies on beyond being JSON; the others are shown as they are.
_SHAPES = {("calibrations", "rows"): list, ("typicality_calibrations", "scores"): list,
           ("models", "config"): dict, ("queries", "probabilities"): dict, ("votes", "probabilities"): dict}
# Derived rows that `cbr index --rebuild` recomputes after dropping them.
_RECOMPUTED = {"calibrations", "typicality_calibrations"}


@dataclass(frozen=True)
class Damage:
    """One damaged row: where it is, what is wrong, and what repairs it."""

    table: str
    key: tuple  # primary key values, for drop_damaged
    row: str  # how a user finds it ("embedding of case 3 under model 1")
    problem: str
    repair: str
    droppable: bool  # --rebuild deletes it (cbr re-creates or re-embeds it)

    def __str__(self) -> str:
        return f"{self.row}: {self.problem}; {self.repair}"


def vector_problem(blob, dim: int | None) -> str | None:
    """Why a stored embedding cannot be used (None when it can): its size, or a value not finite."""
    blob = bytes(blob or b"")
    if dim and len(blob) == 4 * dim:
        v = np.frombuffer(blob, dtype=np.float32)
    elif dim and len(blob) == 2 * dim:
        v = np.frombuffer(blob, dtype=np.float16)
    else:
        return f"holds {len(blob)} bytes, neither float32 nor float16 at d={dim}"
    if not np.isfinite(v).all():
        return "holds NaN or infinite values"
    return None


def map_problem(data, height, width, dtype, scale) -> str | None:
    """Why a stored map cannot be drawn (None when it can)."""
    data = bytes(data or b"")
    if dtype != "float16" or not (isinstance(height, int) and isinstance(width, int)) or height < 1 or width < 1:
        return f"has dtype {dtype!r} and shape {height}x{width}, not a float16 map"
    if len(data) != 2 * height * width:
        return f"holds {len(data)} bytes, not a {height}x{width} float16 map ({2 * height * width} bytes)"
    if scale is None or not math.isfinite(scale) or not np.isfinite(np.frombuffer(data, dtype="<f2")).all():
        return "holds NaN or infinite values"
    return None


# For readers that hold a session, not the case base: the repair of a damaged embedding.
EMBEDDING_REPAIR = ("`cbr db check` lists every such row; `cbr index DATA --rebuild` drops them and embeds their "
                    "images again")


def rebuild_hint(cb, data: bool = False) -> str:
    what = "DATA " if data else ""
    return f"run `cbr index {what}--rebuild {db_args(cb)}`"


def decoded(load, what: str, hint: str):
    """``load()`` (an ORM read), with a row whose JSON does not decode refused in one line."""
    try:
        return load()
    except ValueError as e:  # json.JSONDecodeError from the column type
        raise DamagedRowError(f"{what} is damaged ({str(e).splitlines()[0]}); {hint}") from None


def _embeddings(s, cb) -> list[Damage]:
    dims = _dims(s)
    found = []
    rows = s.execute(select(Embedding.case_id, Embedding.model_id, Embedding.vector, Case.path)
                     .join(Case, Case.id == Embedding.case_id).execution_options(yield_per=1000))
    for case_id, model_id, blob, path in rows:
        if not dims.get(model_id):  # the model row itself is damaged: _json_values names it
            continue
        problem = vector_problem(blob, dims.get(model_id))
        if problem:
            found.append(Damage("embeddings", (case_id, model_id), f"embedding of case {case_id} under model {model_id}",
                                problem, f"{rebuild_hint(cb, data=True)} with the folder holding {path}: it drops "
                                "the row and embeds the image again", True))
    return found


def _dims(s) -> dict:
    """Each model's embedding dimension, read as text so that a damaged config cannot stop the scan."""
    dims = {}
    for model_id, text in s.execute(select(Model.id, cast(Model.config, Text))):
        try:
            dims[model_id] = json.loads(text).get("embedding_dim")
        except (TypeError, ValueError, AttributeError):
            dims[model_id] = None
    return dims


def _maps(s, cb) -> list[Damage]:
    found = []
    rows = s.execute(select(Explanation.id, Explanation.role, Explanation.case_id, Explanation.query_id,
                            Explanation.model_id, Explanation.height, Explanation.width, Explanation.dtype,
                            Explanation.scale, Explanation.data).execution_options(yield_per=1000))
    for eid, role, case_id, query_id, model_id, h, w, dtype, scale, data in rows:
        problem = map_problem(data, h, w, dtype, scale)
        if problem:
            whose = f"case map of case {case_id}" if role == "case" else f"{role} map of query {query_id}"
            found.append(Damage("explanations", (eid,), f"explanations row {eid} ({whose}, model {model_id})", problem,
                                f"{rebuild_hint(cb)} drops it (its report then shows no map there)", True))
    return found


def _json_values(s, cb) -> list[Damage]:
    """Every JSON column of every table, read as text and parsed here."""
    found = []
    for table in Base.metadata.sorted_tables:
        keys = list(table.primary_key.columns)
        for col in (c for c in table.columns if isinstance(c.type, JSON)):
            shape = _SHAPES.get((table.name, col.name))
            for row in s.execute(select(*keys, cast(col, Text)).where(col.is_not(None))
                                 .execution_options(yield_per=1000)):
                *key, text = row
                try:
                    value = json.loads(text)
                    problem = None if shape is None or isinstance(value, shape) else \
                        f"is JSON {type(value).__name__}, not {shape.__name__}"
                except (TypeError, ValueError) as e:
                    problem = f"is not valid JSON ({str(e).splitlines()[0]})"
                if problem is None:
                    continue
                derived = table.name in _RECOMPUTED
                repair = (f"{rebuild_hint(cb)} drops and recomputes it" if derived else
                          "cbr cannot re-create it: restore the case base from a backup")
                found.append(Damage(table.name, tuple(key), f"{table.name} row {', '.join(map(str, key))}",
                                    f"{col.name} {problem}", repair, derived))
    return found


def _hashes(s, cb) -> list[Damage]:
    found = []
    for case_id, sha in s.execute(select(Case.id, Case.sha256).execution_options(yield_per=1000)):
        if not SHA256.fullmatch(sha or ""):
            found.append(Damage("cases", (case_id,), f"case {case_id}", f"sha256 {sha!r} is not 64 hex digits",
                                f"take it out with `cbr remove {case_id} --db {cb.display}` and index its image "
                                "again (a case is found by its sha256)", False))
    for query_id, sha in s.execute(select(Query.id, Query.sha256)):
        if not SHA256.fullmatch(sha or ""):
            found.append(Damage("queries", (query_id,), f"query {query_id}", f"sha256 {sha!r} is not 64 hex digits",
                                "its record no longer names its image: restore the case base from a backup", False))
    for model_id, checksum in s.execute(select(IndexManifest.model_id, IndexManifest.checksum)):
        if not SHA256.fullmatch(checksum or ""):
            found.append(Damage("index_manifests", (model_id,), f"index manifest of model {model_id}",
                                f"checksum {checksum!r} is not 64 hex digits", rebuild_hint(cb), False))
    return found


def _manifests(s, cb) -> list[Damage]:
    """Models with stored embeddings but no index manifest (the row deleted, the file left)."""
    lost = s.execute(select(Embedding.model_id, func.count()).where(
        ~Embedding.model_id.in_(select(IndexManifest.model_id))).group_by(Embedding.model_id)).all()
    return [Damage("index_manifests", (model_id,), f"model {model_id}",
                   f"has {n} stored embedding(s) but no index manifest (its row was lost, or an index run of it "
                   "is under way)", f"{rebuild_hint(cb)} builds its index again", False) for model_id, n in lost]


def find_damage(s, cb, limit: int | None = _MAX_FINDINGS) -> list[Damage]:
    """Decode every blob and JSON value of the case base in session ``s``; the rows that fail
    (at most ``limit`` of each kind: a wholly damaged table should not print a million lines)."""
    found = []
    for scan in (_embeddings, _maps, _json_values, _hashes, _manifests):
        found.extend(scan(s, cb)[:limit])
    return found


def drop_damaged(cb) -> list[str]:
    """Delete the damaged rows that cbr re-creates (maps, calibrations) or re-embeds (embeddings);
    one note per row, and one per damaged row it leaves (with its own repair). Run by
    ``cbr index --rebuild`` before it rebuilds."""
    with cb.read() as s:
        damage = find_damage(s, cb, limit=None)
    found = [d for d in damage if d.droppable]
    left = [f"not repaired by --rebuild: {d}" for d in damage if not d.droppable and d.table != "index_manifests"]
    if not found:
        return left
    tables = {t.name: t for t in Base.metadata.sorted_tables}
    with cb.write() as s:
        for d in found:
            table = tables[d.table]
            s.execute(delete(table).where(*(c == v for c, v in zip(table.primary_key.columns, d.key))))
    return [f"dropped {d.row} ({d.problem})" for d in found] + left
