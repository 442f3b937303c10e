"""Measuring the whole pipeline: metrics, patient-grouped splits, leakage, explanation checks and
the two protocols of ``cbr evaluate`` (cross-validation and a held-out test set).

Names are imported from their modules on first use: ``cbr.learn`` imports the metrics and splits
from here, and must not pull in the protocols (which train) with them.
"""

import importlib

_EXPORTS = {
    "EvalConfig": "config",
    "cross_validate": "crossval",
    "evaluate_casebase": "heldout",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
