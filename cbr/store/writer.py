"""Writing cases: one short transaction per batch (cases, embeddings, maps), then the vectors go
into the in-memory indexes, which are saved as a new generation now and then and at the end.

A crash at any point therefore loses at most the work since the last commit, and the next open
re-adds to the index whatever the case base holds but the file lacks.
"""

from __future__ import annotations

import time

import numpy as np
from sqlalchemy import select

from cbr.data.dataset import Record
from cbr.models.maps import case_map_target, compute_maps
from cbr.store.encoding import encode_vector
from cbr.store.member import save_index
from cbr.store.rows import explanation_row
from cbr.store.schema import Case, Embedding
from explain.spec import resolve_spec
import index as ix

__all__ = ["CaseWriter", "SAVE_EVERY_S"]

SAVE_EVERY_S = 60.0


class CaseWriter:
    """Adds decoded images as cases to the case base and to every member's index."""

    def __init__(self, cb, members, *, explain: str = "gradcam", embedding_dtype: str = "float32"):
        """``members``: the ``Member``s whose indexes receive the new cases; ``embedding_dtype``:
        how their embeddings are stored (``store/encoding.py``)."""
        self.cb = cb
        self.members = members
        self.explain = explain
        self.embedding_dtype = embedding_dtype
        self._dirty = False
        self._last_save = time.monotonic()

    def embed(self, tensors: list):
        """Per member: (normalised embeddings as numpy, trunk activations, input batch)."""
        import torch

        out = []
        for m, x in zip(self.members, tensors):
            with torch.no_grad():
                acts, e = m.embedder.cam_features(x)
            out.append((e.float().cpu().numpy(), acts, x))
        return out

    def add(self, records: list[Record], tensors: list, *, dataset_id=None, origin="index",
            query_id=None, feedback_id=None, only_models=None) -> list[int]:
        """Store a batch of records (with their preprocessed tensors, one per member) as cases.

        Existing cases (same sha256) only get the embeddings and maps they lack.
        """
        embeddings, maps = self.compute(records, tensors)
        return self.store(records, embeddings, maps, dataset_id=dataset_id, origin=origin, query_id=query_id,
                          feedback_id=feedback_id, only_models=only_models)

    def compute(self, records: list[Record], tensors: list) -> tuple[list, list]:
        """Per member: the batch's embeddings (numpy) and its case maps ((target name, raw map) per
        record, or None without maps). Pure computation: a remote worker (the Ray engine) runs it."""
        embedded = self.embed(tensors)
        maps_per_member = []
        for member, (_, acts, x) in zip(self.members, embedded):
            emb = member.embedder
            if self.explain == "none":
                maps_per_member.append(None)
                continue
            groups: dict = {}
            for i, r in enumerate(records):
                target, name, classifier = case_map_target(emb, r.label)
                groups.setdefault((name, classifier), []).append((i, target))
            maps = [None] * len(records)
            for (name, classifier), items in groups.items():
                idx = [i for i, _ in items]
                raw = compute_maps(emb, x[idx], acts[idx], [t for _, t in items], classifier, self.explain)
                for j, i in enumerate(idx):
                    maps[i] = (name, raw[j])
            maps_per_member.append(maps)
        return [e for e, _, _ in embedded], maps_per_member

    def store(self, records: list[Record], embeddings: list, maps_per_member: list, *, dataset_id=None,
              origin="index", query_id=None, feedback_id=None, only_models=None) -> list[int]:
        """Write what ``compute`` returned in one transaction, then add the vectors to the indexes."""
        ids, added = [], [[] for _ in self.members]
        with self.cb.write() as s:
            for i, r in enumerate(records):
                case = s.scalar(select(Case).where(Case.sha256 == r.sha256))
                if case is not None and case.removed_at is not None:
                    ids.append(case.id)  # removed on purpose: never searchable again through a new model
                    continue
                if case is None:
                    # A record shown under a neutral locator keeps its file only to re-read it.
                    case = Case(sha256=r.sha256, path=r.shown or r.path, label=r.label, group_id=r.group,
                                meta=r.metadata, dataset_id=dataset_id, origin=origin, query_id=query_id,
                                feedback_id=feedback_id, file_locator=r.path if r.shown else None)
                    s.add(case)
                    s.flush()
                ids.append(case.id)
                have = set(s.scalars(select(Embedding.model_id).where(Embedding.case_id == case.id)))
                for m, member in enumerate(self.members):
                    model_id = member.model_id
                    if model_id in have or (only_models is not None and model_id not in only_models):
                        continue
                    s.add(Embedding(case_id=case.id, model_id=model_id,
                                    vector=encode_vector(embeddings[m][i], self.embedding_dtype)))
                    added[m].append(i)
                    if maps_per_member[m] is not None:
                        name, raw = maps_per_member[m][i]
                        spec = resolve_spec(self.explain, member.embedder.config.input_size)  # with its parameters
                        s.add(explanation_row(raw, model_id=model_id, method=spec, target=name, role="case",
                                              case_id=case.id))
        # Only after the commit: the index never holds a vector the case base lacks.
        id_arr = np.asarray(ids, dtype=np.int64)
        for m, member in enumerate(self.members):
            if added[m]:
                ix.add(member.index, embeddings[m][added[m]], id_arr[added[m]])
                self._dirty = True
        return ids

    def mark_dirty(self) -> None:
        """Save at the next ``maybe_save`` even when no vector was added (a new, empty index)."""
        self._dirty = True

    def maybe_save(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._last_save > SAVE_EVERY_S):
            for m in self.members:
                save_index(self.cb, m.model_id, m.index, m.kind)
            self._dirty = False
            self._last_save = time.monotonic()
