"""``cbr db check``: is a case base whole? SQLite's own check, then ours.

SQLite's ``integrity_check`` finds damaged pages, wrong free lists and broken indexes. Ours find
what SQLite cannot know about: an index file that is missing, altered or holds other cases than the
case base; cases without their embeddings or maps; explanation rows of cases or queries that do not
exist; a model without its calibration. Nothing is repaired here: each finding says what to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError

from cbr.errors import DamagedRowError
from cbr.store.damage import find_damage
from cbr.store.generation import written_elsewhere
from cbr.store.location import db_args
from cbr.store.member import active_embeddings, db_active_ids, model_label
from cbr.store.sidecar import open_checked
from cbr.store.schema import (Calibration, Case, Embedding, Explanation, FindingIndex, IndexManifest, Model, Query,
                              TypicalityScores)
import index as ix

__all__ = ["Health", "check_casebase"]

_MAX_SQLITE_MESSAGES = 20


@dataclass
class Health:
    """What ``check_casebase`` found: ``errors`` make the case base unusable as it is; ``warnings``
    are repaired by cbr itself at the next query or index run."""

    casebase: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"casebase": self.casebase, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "counts": self.counts}


def _sqlite_check(cb, health: Health) -> bool:
    """SQLite's integrity and foreign-key checks; False when the file is too damaged to go on."""
    try:
        with cb.engine.connect() as conn:
            rows = [r[0] for r in conn.exec_driver_sql(f"PRAGMA integrity_check({_MAX_SQLITE_MESSAGES})")]
            fk = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    except DatabaseError as e:
        health.errors.append(f"SQLite cannot read the file: {getattr(e, 'orig', e)}; restore it from a backup")
        return False
    if rows != ["ok"]:
        health.errors.extend(f"SQLite integrity_check: {r}" for r in rows)
        health.errors.append("the file is damaged: restore it from a backup (or salvage it with `sqlite3 "
                             f"{cb.display} .recover`); cbr refuses to write into it")
        return False
    for table, rowid, parent, _ in fk[:_MAX_SQLITE_MESSAGES]:
        health.errors.append(f"{table} row {rowid} points to a missing {parent} row")
    return True


def _open_index(cb, who: str, rel_path: str, checksum: str, health: Health, elsewhere: str):
    """The index file ``rel_path`` loaded after its checksum is verified, or None with the problem
    recorded (a file another machine's --index-dir wrote is a warning, ending in ``elsewhere``)."""
    hint = f"run `cbr index --rebuild {db_args(cb)}`"
    path = cb.index_dir / rel_path
    if not path.is_file():
        if written_elsewhere(rel_path, cb.index_dir):
            health.warnings.append(f"{who}: {rel_path} was written in another index folder; {elsewhere}")
        else:
            health.errors.append(f"{who}: file {path} is missing; {hint}")
        return None
    try:
        if ix.checksum(path) != checksum:
            health.errors.append(f"{who}: file {path} does not match its checksum (damaged or altered); {hint}")
            return None
        return ix.open_index(path)  # an id-mapped index, or the sharded form with its .ivfdata lists beside it
    except (OSError, ValueError, RuntimeError) as e:
        health.errors.append(f"{who}: file {path} cannot be read ({e}); {hint}")
        return None


def _index_check(cb, s, health: Health) -> None:
    """Each model's index file against its manifest and the active cases' embeddings."""
    hint = f"run `cbr index --rebuild {db_args(cb)}`"
    for man, model in s.execute(select(IndexManifest, Model).join(Model, Model.id == IndexManifest.model_id)):
        who = f"index of model {model.id} ({model_label(model)})"
        index = _open_index(cb, who, man.path, man.checksum, health,
                            f"the next command here builds it in {cb.index_dir} from the stored embeddings")
        if index is None:
            continue
        stored = np.asarray(ix.ids(index), dtype=np.int64)
        active = db_active_ids(cb, model.id)
        missing, extra = np.setdiff1d(active, stored), np.setdiff1d(stored, active)
        if index.ntotal != man.ntotal:
            health.errors.append(f"{who}: holds {index.ntotal} vectors but its manifest says {man.ntotal}; {hint}")
        elif len(missing) or len(extra):
            health.warnings.append(f"{who}: lacks {len(missing)} active case(s) and holds {len(extra)} removed or "
                                   "unknown one(s) (an interrupted run); repaired from the stored embeddings at "
                                   f"the next index run, or now with {hint}")
        health.counts[f"index_vectors_model_{model.id}"] = int(index.ntotal)
        if ix.lossy(index):
            _sidecar_check(cb, model.id, who, cb.index_dir / man.path, stored, health)


def _sidecar_check(cb, model_id: int, who: str, base, stored, health: Health) -> None:
    """A lossy index's re-rank sidecar: queries fall back on the case base without a usable one."""
    side, problem = open_checked(base, lambda ids: active_embeddings(cb, model_id, ids))
    hint = f"`cbr index --rebuild {db_args(cb)}` writes it"
    if problem is not None:
        health.warnings.append(f"{who}: {problem}; queries re-rank from the case base until {hint}")
    elif side is None:
        health.warnings.append(f"{who}: no re-rank sidecar (an index built by an older cbr); queries re-rank from "
                               f"the case base until {hint}")
    else:
        health.counts[f"sidecar_rows_model_{model_id}"] = int(side.contains(stored).sum())


def _finding_index_check(cb, s, health: Health) -> None:
    """Each model's findings index file against its row. A query rebuilds a damaged one in memory
    every time, so only this check and `cbr index --rebuild` bring it back to the file."""
    hint = f"run `cbr index --rebuild {db_args(cb)}`"
    for row in s.scalars(select(FindingIndex).order_by(FindingIndex.model_id)):
        who = f"findings index of model {row.model_id}"
        index = _open_index(cb, who, row.path, row.checksum, health, f"queries here rebuild it in memory until {hint}")
        if index is None:
            continue
        if index.ntotal != row.ntotal:
            health.errors.append(f"{who}: holds {index.ntotal} vectors but its row says {row.ntotal}; {hint}")
        health.counts[f"finding_vectors_model_{row.model_id}"] = int(index.ntotal)


def _row_checks(cb, s, health: Health) -> None:
    """Cases against embeddings and maps; explanation rows against cases and queries; calibrations."""
    active = select(Case.id).where(Case.removed_at.is_(None))
    health.counts["cases"] = s.scalar(select(func.count(Case.id))) or 0
    health.counts["active_cases"] = s.scalar(select(func.count()).select_from(active.subquery())) or 0
    health.counts["queries"] = s.scalar(select(func.count(Query.id))) or 0
    health.counts["explanations"] = s.scalar(select(func.count(Explanation.id))) or 0
    for kind, column, table in (("case", Explanation.case_id, Case), ("query", Explanation.query_id, Query)):
        orphans = s.scalar(select(func.count(Explanation.id)).where(
            column.is_not(None), ~column.in_(select(table.id)))) or 0
        if orphans:
            health.errors.append(f"{orphans} explanation row(s) belong to a {kind} that does not exist")
    for model_id in s.scalars(select(IndexManifest.model_id)):
        lacking = s.scalar(select(func.count()).select_from(active.where(
            ~Case.id.in_(select(Embedding.case_id).where(Embedding.model_id == model_id))).subquery())) or 0
        if lacking:
            health.errors.append(f"{lacking} active case(s) have no embedding under model {model_id}; index the "
                                 "data again with that model to add them")
        has_maps = s.scalar(select(func.count(Explanation.id)).where(
            Explanation.role == "case", Explanation.model_id == model_id)) or 0
        if has_maps:
            unmapped = s.scalar(select(func.count()).select_from(active.where(~Case.id.in_(
                select(Explanation.case_id).where(Explanation.role == "case", Explanation.model_id == model_id)))
                .subquery())) or 0
            if unmapped:
                health.warnings.append(f"{unmapped} active case(s) have no stored map under model {model_id}; "
                                       "their reports show no map")
        for table, what in ((Calibration, "vote calibration"), (TypicalityScores, "typicality calibration")):
            if s.scalar(select(func.count(table.id)).where(table.model_id == model_id)) == 0:
                health.warnings.append(f"model {model_id} has no {what}; the next writable query computes it")


def check_casebase(cb) -> Health:
    """Check an open case base: SQLite's integrity, the index files and the rows that belong together.

    Args:
        cb: an open ``CaseBase`` (read-only is enough).

    Returns:
        a :class:`Health`; ``ok`` is False when something needs a rebuild or a restore.

    Example:
        >>> health = check_casebase(open_casebase("cases.db", create=False, readonly=None))
        >>> health.ok, health.errors
    """
    health = Health(cb.display)
    if make_url(cb.url).get_backend_name() == "sqlite" and not _sqlite_check(cb, health):
        return health
    try:
        with cb.read() as s:
            health.errors.extend(str(d) for d in find_damage(s, cb))  # first: a bad value stops the reads below
            _row_checks(cb, s, health)
            _index_check(cb, s, health)
            _finding_index_check(cb, s, health)
    except DatabaseError as e:
        health.errors.append(f"reading the case base failed: {getattr(e, 'orig', e)}; restore it from a backup")
    except (ValueError, DamagedRowError) as e:  # a value find_damage named already; say why the check stopped
        health.errors.append(f"the check stopped at a damaged value ({str(e).splitlines()[0]}); repair the rows "
                             "above first")
    return health
