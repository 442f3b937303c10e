"""The patient of a query when the user names none: a DICOM query's own PatientID.

Leaving the query's patient out of the neighbours is what ``--patient`` does by hand and what a
manifest's patient column does in evaluation; a DICOM file carries its PatientID, so the same
protection applies by default. A case base indexed with ``--pseudonymise`` holds keyed hashes as
patient groups: there the raw id is used only hashed with the same key (``--pseudonymise`` or
``CBR_PSEUDONYMISE_KEY`` at query time); without the key it is neither used nor recorded, and a
note says so. The id itself never appears in a note.
"""

from __future__ import annotations

from sqlalchemy import select

__all__ = ["query_patient"]

NO_KEY = ("the query's DICOM PatientID was not used to leave its patient's cases out: this case base holds "
          "pseudonymised patient ids; give --pseudonymise KEY (or set CBR_PSEUDONYMISE_KEY) or --patient")
FROM_TAG = "patient from the query's DICOM PatientID: that patient's cases are left out of the neighbours"


def _pseudonymised(cb) -> bool:
    from cbr.store.schema import Dataset

    with cb.read() as s:
        options = s.scalars(select(Dataset.options)).all()
    return any(((o or {}).get("sources") or {}).get("pseudonymised") for o in options)


def query_patient(cb, source, key: str | None = None) -> tuple[str | None, list[str]]:
    """(patient id to leave out, notes) for a query decoded from ``source`` with no ``--patient``.

    Args:
        cb: the open case base (its datasets say whether patient ids were pseudonymised).
        source: the resolved :class:`cbr.data.sources.Source` of the query.
        key: the pseudonymisation key, when the user gave one.

    Returns ``(None, [])`` for a query that is not DICOM or has no PatientID.
    """
    from cbr.data.identity import pseudonym
    from cbr.data.sources import dicom_patient_id

    pid = dicom_patient_id(source)
    if pid is None:
        return None, []
    if key:
        return pseudonym(key, pid), [FROM_TAG]
    if _pseudonymised(cb):
        return None, [NO_KEY]
    return pid, [FROM_TAG]
