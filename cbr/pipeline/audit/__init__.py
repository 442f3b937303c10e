"""The audit trail: reading it (``trail``), expert feedback and retain (``feedback``), removing
cases (``removal``) and exporting rows (``export``).

The trail's other names are imported from their modules on first use, so that ``cbr export
--help`` (which lists ``EXPORTS``) does not import SQLAlchemy. ``export`` is imported here (it
is light) because its function shares its module's name.
"""

import importlib

from cbr.pipeline.audit.export import EXPORT_FORMATS, EXPORTS, export

_LAZY = {
    "history": "trail", "show": "trail", "rerender_report": "trail",
    "add_feedback": "feedback", "RetainError": "feedback",
    "remove_cases": "removal",
}

__all__ = ["history", "show", "rerender_report", "add_feedback", "RetainError", "remove_cases", "export",
           "EXPORTS", "EXPORT_FORMATS"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
