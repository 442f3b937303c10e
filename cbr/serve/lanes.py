"""The lanes queries run in, in ``cbr serve``: retrieval (with the cheap CAM maps) and expensive
explanations, so that a query asking for lime never holds a plain one.

Each lane answers one query at a time under its own lock (a forward pass already uses every
core; two at once only make both slower). The explanation lane has its own copies of the
members' embedders, made the first time an expensive method is asked for: CAM methods hook the
model's layers, and two queries hooking one shared module would mix their activations. The
FAISS indexes are read by both lanes; each lane reloads them when a writer saved new ones.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading

from sqlalchemy import select

from cbr.errors import CbrError
from cbr.store.member import load_index, load_sidecar
from cbr.store.schema import IndexManifest
from explain.methods import FAST_METHODS, FUSED_METHODS
from explain.spec import base_name

__all__ = ["Lane", "Busy", "is_expensive", "CHEAP_METHODS"]

LOG = logging.getLogger(__name__)
# One backward pass a map (or none): these run in the retrieval lane.
CHEAP_METHODS = frozenset(FAST_METHODS) | frozenset(FUSED_METHODS) | {"none"}


class Busy(CbrError):
    """The server has as much of this kind of work queued as it takes; answered 503, try again later."""


def is_expensive(method: str) -> bool:
    """Whether a method runs the model many times a map (Score-CAM, lime, occlusion, ...)."""
    return base_name(method) not in CHEAP_METHODS


def current_manifests(cb) -> dict:
    with cb.read() as s:
        return {mid: path for mid, path in s.execute(select(IndexManifest.model_id, IndexManifest.path))}


class Lane:
    """A Searcher (and its option variants) used by one query at a time.

    Args:
        cb: the open CaseBase.
        searcher: the lane's Searcher; its members are this lane's own.
    """

    def __init__(self, cb, searcher):
        self.cb, self.searcher = cb, searcher
        self.lock = threading.RLock()
        self._variants = {}
        self._manifests = current_manifests(cb)

    def copy(self) -> "Lane":
        """A lane with its own copies of the embedders (the indexes are shared until one is reloaded)."""
        with self.lock:
            members = [dataclasses.replace(m, embedder=copy.deepcopy(m.embedder), notes=list(m.notes))
                       for m in self.searcher.members]
            searcher = self.searcher.with_options()
        searcher.members = members
        return Lane(self.cb, searcher)

    def searcher_for(self, k=None, vote=None, explain=None, where=()):
        own = (self.searcher.k, self.searcher.vote_name, self.searcher.explain, self.searcher.config.where)
        key = (k or own[0], vote or own[1], explain or own[2], tuple(where) or own[3])
        if key == own:
            return self.searcher
        if key not in self._variants:
            self._variants[key] = self.searcher.with_options(k=key[0], vote=key[1], explain=key[2], where=key[3])
        return self._variants[key]

    def query(self, image, *, patient=None, k=None, vote=None, explain=None, vectors=None, where=(), **identity):
        """Answer and record one query in this lane; returns the Answer. ``identity``: ``sources``
        (the pseudonymisation key, burned-in text allowed) and ``patient_stored``, as for
        :meth:`cbr.pipeline.query.Searcher.query`."""
        with self.lock:
            self.refresh()
            searcher = self.searcher_for(k, vote, explain, where)
            if vectors is None:
                return searcher.query(image, patient=patient, **identity)
            return searcher.query_vectors(image, vectors, patient=patient, **identity)

    def refresh(self) -> None:
        """Reload a member's index when a writer (retain here, or another cbr process) saved a new one."""
        with self.lock:
            now = current_manifests(self.cb)
            if now == self._manifests:
                return
            for m in self.searcher.members:
                if now.get(m.model_id) != self._manifests.get(m.model_id):
                    m.index, m.kind, notes, m.digest = load_index(self.cb, m.model_id)
                    m.sidecar = load_sidecar(self.cb, m.model_id, m.index)
                    for n in notes:
                        LOG.warning("%s", n)
            self._manifests = now
