"""Reading a query's upload and its options, shared by the JSON API and the browser form."""

from __future__ import annotations

from cbr.errors import CbrError, UnknownNameError

__all__ = ["read_upload", "query_options", "MAX_K", "BadValue"]

MAX_K = 1000  # as `cbr query -k`


class BadValue(CbrError):
    """A request field has a value cbr cannot use (answered 422, like a validation error)."""


def read_upload(upload, settings) -> bytes:
    """The bytes of an UploadFile, refused (413) beyond ``settings.max_upload_mb``; never more than that read."""
    from fastapi import HTTPException

    if upload is None:
        raise BadValue("no image uploaded: send the file in the multipart field 'image'")
    limit = settings.max_upload_bytes
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload too large: the limit is {settings.max_upload_mb:g} MiB (cbr serve --max-upload-mb)")
    return data


def query_options(k, vote, explain, where=None) -> dict:
    """Validated per-query overrides (None keeps the server's default), with the CLI's choices."""
    from cbr.pipeline.vote import VOTE_RULES
    from explain.methods import METHOD_NAMES

    if k is not None and not 1 <= int(k) <= MAX_K:
        raise BadValue(f"k {k}: ask for 1 to {MAX_K} neighbours")
    if vote is not None and vote not in VOTE_RULES:
        raise UnknownNameError("vote rule", vote, VOTE_RULES)
    if explain is not None and explain != "none" and explain not in METHOD_NAMES:
        raise UnknownNameError("CAM method", explain, (*METHOD_NAMES, "none"))
    from cbr.pipeline.settings import parse_where

    try:
        pairs = parse_where(where)
    except CbrError as e:
        raise BadValue(str(e).replace("--where", "where", 1)) from None
    return {"k": None if k is None else int(k), "vote": vote or None, "explain": explain or None, "where": pairs}
