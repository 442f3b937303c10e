"""Patient ids as a case base stores them, and what it records of a pseudonymisation key.

With ``--pseudonymise KEY`` (or ``CBR_PSEUDONYMISE_KEY``) a patient id becomes HMAC-SHA256(KEY,
id): stable across runs with the same key, so grouping and leaving a patient's cases out still
work, while the id itself is never stored. :func:`stored_patient_id` is the one function every
entry point uses (a dataset's patient column or DICOM PatientID, ``cbr query --patient``, a DICOM
query's PatientID, the ``patient`` field of ``cbr serve``), so one patient has one stored form.

A case base records :func:`key_id` of its key, never the key, so that a query without the key or
with another one can be refused instead of silently failing to leave the patient out.

In a pseudonymised case base a DICOM image (a case or a query) is shown under
:func:`neutral_locator`, never its file name, which often holds a name and a birth date
(``Doe^John_19450317.dcm``); any other image (PNG, JPEG, a NIfTI volume's slice) under
:func:`neutral_file_locator`, since an exported file's name or folder can hold them just as well. Its file is still recorded, in a column of its own
(``cases.file_locator``, ``queries.image_file``) that only readers of pixels use: re-reading the
pixels is what reports, maps and retain need, and the stored SOPInstanceUID alone cannot find a
file again. Nothing that displays or exports a case or a query reads those columns.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["pseudonym", "stored_patient_id", "key_id", "neutral_locator", "neutral_file_locator"]


def pseudonym(key: str, patient_id: str) -> str:
    """The keyed hash that replaces a patient id: HMAC-SHA256, 32 hex digits."""
    return hmac.new(key.encode("utf-8"), patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def stored_patient_id(patient_id: str | None, key: str | None) -> str | None:
    """A patient id as a case base stores and compares it: stripped, then HMAC-hashed when a
    pseudonymisation ``key`` is given; None for a missing or blank id.

    Example:
        >>> stored_patient_id(" P017 ", None)
        'P017'
    """
    if patient_id is None or not str(patient_id).strip():
        return None
    patient_id = str(patient_id).strip()
    return pseudonym(key, patient_id) if key else patient_id


def key_id(key: str) -> str:
    """What a case base records of its pseudonymisation key: a keyed hash of a fixed text (16 hex
    digits) that tells a wrong key from the right one and cannot give the key back."""
    return hmac.new(key.encode("utf-8"), b"cbr pseudonymisation key id", hashlib.sha256).hexdigest()[:16]


def neutral_locator(sop_instance_uid: str | None, sha256: str, frame: int | None = None) -> str:
    """How a DICOM image of a pseudonymised case base is shown: ``dicom:`` and its SOPInstanceUID
    hashed (its sha256 when it has none), plus ``#frame=N`` for a frame; nothing of the file name.

    Example:
        >>> neutral_locator("1.2.3", "ab" * 32, 2)
        'dicom:c47f5b18b8a430e698b9fe15#frame=2'
    """
    basis = sop_instance_uid or sha256
    text = "dicom:" + hashlib.sha256(basis.encode("utf-8")).hexdigest()[:24]
    return text if frame is None else f"{text}#frame={frame}"


def neutral_file_locator(kind: str, sha256: str, fragment: str | None = None) -> str:
    """How an image that is not DICOM is shown in a pseudonymised case base: its kind (``image``,
    ``nifti``, ``npz``) and content hash, plus the part of the file it is (a slice, a split's
    index); nothing of its path.

    Example:
        >>> neutral_file_locator("nifti", "ab" * 32, "axis=axial&slice=8")
        'nifti:abababababababababababab#axis=axial&slice=8'
    """
    return f"{kind}:{sha256[:24]}" + (f"#{fragment}" if fragment else "")
