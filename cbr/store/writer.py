"""Writing cases: one short transaction per batch (cases, embeddings, maps), then the vectors go
into the in-memory indexes, which are saved as a new generation now and then and at the end.

A crash at any point therefore loses at most the work since the last commit, and the next open
re-adds to the index whatever the case base holds but the file lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import insert, select

from cbr.data.dataset import Record
from cbr.models.maps import case_map_target, compute_maps
from cbr.store.chunks import rows_in
from cbr.store.encoding import encode_vector
from cbr.store.member import save_index
from cbr.store.rows import explanation_values
from cbr.store.schema import Case, Embedding, Explanation
from explain.spec import resolve_spec
import index as ix

__all__ = ["CaseWriter", "SAVE_EVERY_S", "Stored", "stored_cases"]

SAVE_EVERY_S = 60.0


@dataclass
class Stored:
    """What the case base already holds of the records being written: looked up once, in chunks
    of keys, and kept up to date by ``CaseWriter.store`` (never a query per record)."""

    case_of: dict[str, int] = field(default_factory=dict)  # sha256 -> case id
    label_of: dict[int, str] = field(default_factory=dict)  # case id -> its label
    removed: set[int] = field(default_factory=set)  # case ids taken out of search
    models_of: dict[int, set[int]] = field(default_factory=dict)  # case id -> model ids with its embedding


def stored_cases(s, sha256s) -> Stored:
    """The stored cases among ``sha256s`` and the models that embedded each, in session ``s``."""
    out = Stored()
    for case_id, sha, label, removed_at in rows_in(
            s, select(Case.id, Case.sha256, Case.label, Case.removed_at), Case.sha256, sha256s):
        out.case_of[sha] = case_id
        out.label_of[case_id] = label
        if removed_at is not None:
            out.removed.add(case_id)
    for case_id, model_id in rows_in(s, select(Embedding.case_id, Embedding.model_id), Embedding.case_id,
                                     out.case_of.values()):
        out.models_of.setdefault(case_id, set()).add(model_id)
    return out


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
              origin="index", query_id=None, feedback_id=None, only_models=None,
              stored: Stored | None = None) -> list[int]:
        """Write what ``compute`` returned in one transaction, then add the vectors to the indexes.

        ``stored``: what the case base already holds of these records, as the caller looked it up
        (``stored_cases``); it is looked up here when not given, and updated with what is written.
        """
        specs = [resolve_spec(self.explain, m.embedder.config.input_size) if self.explain != "none" else None
                 for m in self.members]  # each member's method, with its parameters
        ids, added, embedded, maps, rows = [], [[] for _ in self.members], {}, [], []
        with self.cb.write() as s:
            if stored is None:  # inside the write transaction: no other writer adds these meanwhile
                stored = stored_cases(s, [r.sha256 for r in records])
            new = self._new_cases(s, records, stored, dict(dataset_id=dataset_id, origin=origin,
                                                              query_id=query_id, feedback_id=feedback_id))
            for i, r in enumerate(records):
                case_id = stored.case_of.get(r.sha256) or new[r.sha256]
                ids.append(case_id)
                if case_id in stored.removed:
                    continue  # removed on purpose: never searchable again through a new model
                have = stored.models_of.get(case_id, set()) | embedded.get(case_id, set())
                for m, member in enumerate(self.members):
                    model_id = member.model_id
                    if model_id in have or (only_models is not None and model_id not in only_models):
                        continue
                    rows.append(dict(case_id=case_id, model_id=model_id,
                                     vector=encode_vector(embeddings[m][i], self.embedding_dtype)))
                    embedded.setdefault(case_id, set()).add(model_id)
                    added[m].append(i)
                    if maps_per_member[m] is not None:
                        name, raw = maps_per_member[m][i]
                        maps.append(explanation_values(raw, model_id=model_id, method=specs[m], target=name,
                                                       role="case", case_id=case_id))
            # one executemany each: ORM objects cost 0.2 ms a row to build and flush (a third of an
            # import's CPU at 1M rows, docs/results.md "Import throughput")
            if rows:
                s.execute(insert(Embedding.__table__), rows)
            if maps:
                s.execute(insert(Explanation), maps)
        stored.case_of.update(new)
        stored.label_of.update((new[r.sha256], r.label) for r in records if r.sha256 in new)
        for case_id, models in embedded.items():
            stored.models_of.setdefault(case_id, set()).update(models)
        # Only after the commit: the index never holds a vector the case base lacks.
        id_arr = np.asarray(ids, dtype=np.int64)
        for m, member in enumerate(self.members):
            if added[m] and not member.staged:  # a staged member is built from the case base at the end
                ix.add(member.index, embeddings[m][added[m]], id_arr[added[m]])
                self._dirty = True
        return ids

    @staticmethod
    def _new_cases(s, records, stored, provenance: dict) -> dict:
        """{sha256: case id} of the records not stored yet, inserted in one executemany (the ORM
        would insert them one statement each, to learn each id), then their ids read back in chunks."""
        new = {}
        for r in records:
            if r.sha256 not in stored.case_of and r.sha256 not in new:
                # A record shown under a neutral locator keeps its file only to re-read it.
                new[r.sha256] = {"sha256": r.sha256, "path": r.shown or r.path, "label": r.label, "group_id": r.group,
                                 "metadata": r.metadata, "file_locator": r.path if r.shown else None, **provenance}
        if not new:
            return {}
        # Core, by column names ("metadata", not the attribute "meta"): the ORM bulk path costs 40 us a row more
        s.execute(insert(Case.__table__), list(new.values()))
        return dict(rows_in(s, select(Case.sha256, Case.id), Case.sha256, new))

    def mark_dirty(self) -> None:
        """Save at the next ``maybe_save`` even when no vector was added (a new, empty index)."""
        self._dirty = True

    def maybe_save(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._last_save > SAVE_EVERY_S):
            for m in self.members:
                if not m.staged:  # saving would fill its stand-in with every stored vector
                    save_index(self.cb, m.model_id, m.index, m.kind)
            self._dirty = False
            self._last_save = time.monotonic()
