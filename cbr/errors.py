"""Library exceptions. Each says what went wrong and what to do; the CLI shows them as one line."""

__all__ = [
    "CbrError",
    "UnknownNameError",
    "ImageError",
    "DatasetError",
    "CaseBaseError",
    "SchemaError",
    "ModelMismatchError",
    "IndexCorruptError",
    "WeightsNotFoundError",
    "NotFoundError",
    "PseudonymKeyError",
    "OutputError",
    "DamagedRowError",
]


class CbrError(Exception):
    """Base class of every error cbr reports to a user."""


class UnknownNameError(CbrError, KeyError):
    """A registry lookup failed: the message lists the valid choices."""

    def __init__(self, kind: str, name: str, choices):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose from {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class ImageError(CbrError):
    """A file cannot be used as an image."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(CbrError):
    """A dataset (folder or manifest) cannot be read at all."""


class CaseBaseError(CbrError):
    """The case base cannot be opened or is in a state we refuse to use."""


class SchemaError(CaseBaseError):
    """The case base's schema is newer than this version of cbr, or cannot be migrated."""


class ModelMismatchError(CaseBaseError):
    """A model differs from the one that built an index."""


class IndexCorruptError(CaseBaseError):
    """An index file is missing or disagrees with its manifest."""


class WeightsNotFoundError(CbrError):
    """Pretrained weights are not available offline."""


class NotFoundError(CbrError):
    """A query, case or file named by the user does not exist."""


class PseudonymKeyError(CaseBaseError):
    """A pseudonymised case base was used without its key, or with another one (or the reverse)."""


class OutputError(CbrError):
    """An output path names something cbr must not replace (a device, a link, a socket, a folder)."""


class DamagedRowError(CaseBaseError):
    """A stored value does not decode (a map of the wrong size, JSON that is not JSON, a NaN embedding)."""
