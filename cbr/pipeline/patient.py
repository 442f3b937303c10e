"""Patient ids at query time: the key a case base was pseudonymised with, and a query's patient.

A case base indexed with ``--pseudonymise KEY`` holds keyed hashes as patient groups, and records
the key's id (:func:`cbr.data.pseudonyms.key_id`) with each dataset, never the key. Every query and
index run checks its key against that record first (:func:`check_key`): without the key a raw
patient id would silently match nothing (the patient's own cases would be retrieved) and be
stored raw; with another key the same. Both are refused in one line naming the option.

Leaving the query's patient out of the neighbours is what ``--patient`` does by hand and what a
manifest's patient column does in evaluation; a DICOM file carries its PatientID, so the same
protection applies by default (:func:`query_patient`). The id itself never appears in a note.
"""

from __future__ import annotations

from sqlalchemy import select

from cbr.data.pseudonyms import key_id, stored_patient_id
from cbr.data.sources import dicom_patient_id
from cbr.errors import PseudonymKeyError
from cbr.store.schema import Case, Dataset

__all__ = ["check_key", "pseudonymisation", "query_patient", "FROM_TAG"]

FROM_TAG = "patient from the query's DICOM PatientID: that patient's cases are left out of the neighbours"
KEY_OPTION = "--pseudonymise KEY (or set CBR_PSEUDONYMISE_KEY)"


def pseudonymisation(cb) -> tuple[bool, set[str]]:
    """(whether any dataset of the case base was indexed with a pseudonymisation key, the key ids
    recorded); a case base from before key ids were recorded has none, and any key is accepted."""
    with cb.read() as s:
        options = s.scalars(select(Dataset.options)).all()
    keyed = [src for src in (((o or {}).get("sources") or {}) for o in options) if src.get("pseudonymised")]
    return bool(keyed), {src["key_id"] for src in keyed if src.get("key_id")}


def check_key(cb, key: str | None, what: str = "query") -> None:
    """Refuse to use ``cb`` with a missing or wrong pseudonymisation key.

    Args:
        cb: the open case base.
        key: the key given (``--pseudonymise`` or ``CBR_PSEUDONYMISE_KEY``), or None.
        what: the command, for the message ("query", "index").

    Raises:
        PseudonymKeyError: the case base is pseudonymised and ``key`` is missing or not its key; or
            ``key`` is given for a case base that holds raw patient ids (a hash would match none).
    """
    pseudonymised, ids = pseudonymisation(cb)
    if pseudonymised and not key:
        raise PseudonymKeyError(f"this case base holds pseudonymised patient ids; give its key with {KEY_OPTION} "
                                f"to {what} it")
    if pseudonymised and ids and key_id(key) not in ids:
        raise PseudonymKeyError(f"--pseudonymise: wrong key; this case base was pseudonymised with another one "
                                f"(key id {', '.join(sorted(ids))}); give the key it was indexed with, as "
                                f"{KEY_OPTION}")
    if not pseudonymised and key:
        with cb.read() as s:
            raw = s.scalar(select(Case.id).where(Case.group_id.isnot(None)).limit(1)) is not None
        if raw:
            raise PseudonymKeyError(f"--pseudonymise: this case base holds patient ids that are not pseudonymised, "
                                    f"so a hashed id would match none of them; {what} it without --pseudonymise "
                                    "(unset CBR_PSEUDONYMISE_KEY)")


def query_patient(source, key: str | None = None) -> tuple[str | None, list[str]]:
    """(patient id to leave out, in its stored form; notes) for a query decoded from ``source`` with
    no ``--patient``. The key must have passed :func:`check_key`.

    Args:
        source: the resolved :class:`cbr.data.sources.Source` of the query.
        key: the pseudonymisation key, when the case base has one.

    Returns ``(None, [])`` for a query that is not DICOM or has no PatientID.
    """
    pid = stored_patient_id(dicom_patient_id(source), key)
    return (pid, [FROM_TAG]) if pid is not None else (None, [])
