"""A module of ours that loads on first use, bound at the top of the file that uses it.

Our torch-bound modules (those that subclass ``torch.nn.Module``, and so import torch as they
load) are heavy packages like torch itself, and so are the web-bound ones (the serve modules that
import FastAPI or uvicorn as they load). A light module that calls one binds it at its top::

    embedder = LazyModule("cbr.models.embedder")

    def build(name):
        return embedder.create_embedder(name)

so the head of the file states the dependency (tests/test_architecture.py reads it as an edge of
the import graph, and checks that only torch- or web-bound modules are bound this way), while ``cbr --help``
and the read-only commands, which never call such a function, never load torch.
"""

from __future__ import annotations

import importlib

__all__ = ["LazyModule"]


class LazyModule:
    """A stand-in for the module ``name``: reading an attribute imports the module (once; Python's
    import lock makes that thread-safe) and returns the module's attribute.

    Args:
        name: the module's dotted name, e.g. ``"cbr.models.embedder"``.
    """

    __slots__ = ("_lazy_name",)

    def __init__(self, name: str):
        self._lazy_name = name

    def __getattr__(self, attr: str):
        # Read through on every use (a dict lookup once imported): a test's monkeypatch of the
        # module's attribute is seen, and there is no cached state to race on.
        return getattr(importlib.import_module(self._lazy_name), attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._lazy_name!r})"
