"""Lookups by a collection of keys (sha256s, case ids, paths), a bounded number of bound parameters
per statement.

A database caps the parameters of one statement: SQLite at ``SQLITE_LIMIT_VARIABLE_NUMBER`` (999
before 3.32, 32766 since, lower where a build or a host sets it), PostgreSQL's protocol at 65535.
One ``IN`` list with a parameter per dataset item therefore stops a run at that many items, whatever
the index can hold; so every lookup by a collection goes through here, ``CHUNK`` keys at a time.
"""

from __future__ import annotations

from itertools import islice

__all__ = ["CHUNK", "MAX_PARAMETERS", "chunked", "rows_in", "scalars_in"]

# The lowest per-statement limit any SQLite build has shipped with: multi-row INSERTs are paged
# under it too (casebase.py sets it on the engine), so no statement of cbr's binds more.
MAX_PARAMETERS = 999
# Keys per IN list: well under MAX_PARAMETERS, which leaves room for the statement's other parameters.
CHUNK = 500


def chunked(values, size: int = CHUNK):
    """Lists of at most ``size`` items of ``values`` (any iterable), in order."""
    it = iter(values)
    while chunk := list(islice(it, size)):
        yield chunk


def rows_in(s, stmt, column, values, size: int = CHUNK) -> list:
    """The rows of ``stmt`` whose ``column`` is in ``values``, one statement per ``size`` keys.

    Args:
        s: an open session; stmt: a ``select``; column: the column the keys match; values: the keys
            (duplicates are looked up once).
    """
    out = []
    for chunk in chunked(dict.fromkeys(values), size):
        out.extend(s.execute(stmt.where(column.in_(chunk))).all())
    return out


def scalars_in(s, stmt, column, values, size: int = CHUNK) -> list:
    """As :func:`rows_in`, the first column of each row (``session.scalars``)."""
    out = []
    for chunk in chunked(dict.fromkeys(values), size):
        out.extend(s.scalars(stmt.where(column.in_(chunk))).all())
    return out
