"""Adding cases: ``cbr index`` and the retain step of ``cbr feedback`` share this code path.

A batch of images is decoded once, embedded by every member model, explained at the same forward
pass, and committed in one short transaction (cases, embeddings, maps). Only then are the vectors
added to the in-memory indexes, which are saved as a new generation now and then and at the end.
A crash at any point therefore loses at most the work since the last commit, and the next open
re-adds to the index whatever the case base holds but the file lacks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from cbr.dataset import Problem, Record, Scan, read_dataset
from cbr.errors import CbrError, ImageError
from cbr.schema import Calibration, Case, Dataset, Embedding, Explanation
from cbr.schema import Problem as ProblemRow

__all__ = ["IngestReport", "CaseWriter", "index_dataset", "calibrate", "case_map_target"]

LOG = logging.getLogger(__name__)
SAVE_EVERY_S = 60.0
CALIBRATION_CASES = 500
CALIBRATION_K = 50


@dataclass
class IngestReport:
    """What one ``cbr index`` run did."""

    source: str | None
    models: list[str]
    added: int = 0
    embedded: int = 0  # existing cases embedded for a newly added model
    already: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def images_per_s(self) -> float:
        done = self.added + self.embedded
        return done / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source, "models": self.models, "added": self.added, "embedded": self.embedded,
            "already": self.already, "problems": [{"path": p.path, "reason": p.reason} for p in self.problems],
            "notes": self.notes, "rebuilt": self.rebuilt, "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(self.images_per_s, 2),
        }


def case_map_target(embedder, label: str):
    """The target of a case's stored map: its labelled class when the model has a head for it,
    else the embedding norm (what the embedding is made of), which any embedder has.

    Returns (target, its name, whether it needs the classifier head)."""
    from explain.targets import ClassTarget, EmbeddingNormTarget

    names = embedder.config.class_names
    if embedder.head is not None and label in names:
        return ClassTarget(names.index(label)), f"class:{label}", True
    return EmbeddingNormTarget(), "embedding", False


def compute_maps(embedder, x, acts, targets, classifier: bool, method: str) -> np.ndarray:
    """Raw maps for a batch.

    ``acts`` are the CAM-layer activations from ``embedder.cam_features(x)``. The fast path
    back-propagates only from the CAM layer up (explain.cam.maps_from_activations); methods
    that need the image (scorecam) and layers the trunk cannot be cut at go through grad-cam's
    hooked path on the whole model.
    """
    import torch
    from explain.cam import maps_from_activations, maps_from_images
    from explain.methods import FAST_METHODS

    if method in FAST_METHODS and embedder.cam_split() is not None:
        if acts.is_inference():
            acts = acts.clone()  # inference tensors cannot enter autograd
        return maps_from_activations(embedder.cam_head(classifier), acts, targets, method)
    head = embedder.classifier_head() if classifier else embedder.neck
    model = torch.nn.Sequential(embedder.trunk, head)
    with torch.enable_grad():
        return maps_from_images(model, embedder.target_module(), x, targets, method)


class CaseWriter:
    """Adds decoded images as cases to the case base and to every member's index."""

    def __init__(self, cb, members, *, explain: str = "gradcam"):
        """``members``: list of (model_id, embedder, index, kind)."""
        self.cb = cb
        self.members = members
        self.explain = explain
        self._dirty = False
        self._last_save = time.monotonic()

    def embed(self, tensors: list):
        """Per member: (normalised embeddings as numpy, trunk activations, input batch)."""
        import torch

        out = []
        for (model_id, emb, _, _), x in zip(self.members, tensors):
            with torch.no_grad():
                acts, e = emb.cam_features(x)
            out.append((e.float().cpu().numpy(), acts, x))
        return out

    def add(self, records: list[Record], tensors: list, *, dataset_id=None, origin="index",
            query_id=None, feedback_id=None, only_models=None) -> list[int]:
        """Store a batch of records (with their preprocessed tensors, one per member) as cases.

        Existing cases (same sha256) only get the embeddings and maps they lack.
        """
        from explain.cam import encode_map

        embedded = self.embed(tensors)
        maps_per_member = []
        for (model_id, emb, _, _), (_, acts, x) in zip(self.members, embedded):
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

        ids, added = [], [[] for _ in self.members]
        with self.cb.write() as s:
            for i, r in enumerate(records):
                case = s.scalar(select(Case).where(Case.sha256 == r.sha256))
                if case is not None and case.removed_at is not None:
                    ids.append(case.id)  # removed on purpose: never searchable again through a new model
                    continue
                if case is None:
                    case = Case(sha256=r.sha256, path=r.path, label=r.label, group_id=r.group, meta=r.metadata,
                                dataset_id=dataset_id, origin=origin, query_id=query_id, feedback_id=feedback_id)
                    s.add(case)
                    s.flush()
                ids.append(case.id)
                have = set(s.scalars(select(Embedding.model_id).where(Embedding.case_id == case.id)))
                for m, (model_id, emb, _, _) in enumerate(self.members):
                    if model_id in have or (only_models is not None and model_id not in only_models):
                        continue
                    s.add(Embedding(case_id=case.id, model_id=model_id, vector=embedded[m][0][i].tobytes()))
                    added[m].append(i)
                    if maps_per_member[m] is not None:
                        name, raw = maps_per_member[m][i]
                        data, shape, scale = encode_map(raw)
                        s.add(Explanation(model_id=model_id, case_id=case.id, role="case", method=self.explain,
                                          target=name, height=shape[0], width=shape[1], dtype="float16",
                                          scale=float(scale), data=data))
        # Only after the commit: the index never holds a vector the case base lacks.
        import index as ix

        id_arr = np.asarray(ids, dtype=np.int64)
        for m, (model_id, _, index, _) in enumerate(self.members):
            if added[m]:
                ix.add(index, embedded[m][0][added[m]], id_arr[added[m]])
                self._dirty = True
        return ids

    def maybe_save(self, force: bool = False) -> None:
        from cbr.member import save_index

        if self._dirty and (force or time.monotonic() - self._last_save > SAVE_EVERY_S):
            for model_id, _, index, kind in self.members:
                save_index(self.cb, model_id, index, kind)
            self._dirty = False
            self._last_save = time.monotonic()


class DecodedRecords:
    """A torch Dataset that decodes each record once and applies every transform to it.

    Items are (index, [one tensor per transform], None) or (index, None, problem reason): a file
    that cannot be used is reported, never fatal. Used by indexing (one transform per member's
    preprocessing) and by training (letterboxed uint8).
    """

    def __init__(self, records, transforms):
        self.records, self.transforms = records, list(transforms)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from cbr.image import read_image

        r = self.records[i]
        try:
            img, sha = read_image(r.path)
        except ImageError as e:
            return i, None, e.reason
        if sha != r.sha256:
            return i, None, "file changed since the dataset was read; run again"
        return i, [t(img) for t in self.transforms], None


def _collate(items):
    import torch

    ok = [(i, t) for i, t, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not ok:
        return [], None, bad
    n = len(ok[0][1])
    tensors = [torch.stack([t[m] for _, t in ok]) for m in range(n)]
    return [i for i, _ in ok], tensors, bad


def decode_workers(n: int, batch_size: int) -> int:
    """Decoding processes: none for a single batch, 1 on a 2-core machine, else up to 4."""
    import os

    if n <= batch_size:
        return 0
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores - 1)


def iter_batches(records, transforms, batch_size: int, num_workers: int | None = None):
    """Yield (record indices, one stacked tensor per transform, [(index, problem reason)]).

    ``transforms`` are callables PIL image -> tensor, e.g. each member's ``preprocess``.
    """
    import torch

    if num_workers is None:
        num_workers = decode_workers(len(records), batch_size)
    loader = torch.utils.data.DataLoader(
        DecodedRecords(records, transforms), batch_size=batch_size, shuffle=False,
        num_workers=num_workers if len(records) > batch_size else 0, collate_fn=_collate,
    )
    yield from loader


def _model_source(spec: str) -> str:
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def index_dataset(cb, source=None, *, models=("mobilenet_v2",), weights: str = "imagenet",
                  index_type: str = "flat", batch_size: int = 32, explain: str = "gradcam",
                  rebuild: bool = False, path_column: str = "path", label_column: str = "label",
                  group_column: str | None = None, images=(), progress: bool = False,
                  num_workers: int | None = None, device: str = "cpu", records=None,
                  target_layer: str | None = None) -> IngestReport:
    """Index a dataset into a case base: read, decode, embed, explain, store, index, calibrate.

    Incremental (images already stored are skipped) and interruptible (re-running completes).

    Args:
        cb: an open CaseBase.
        source: a class-folder dataset or a CSV manifest; may be None with ``rebuild``.
        models: backbone names or checkpoint paths; one index (ensemble member) per model.
        weights: ``imagenet`` or ``none`` for backbone names (checkpoints carry their own).
        index_type: ``flat``, ``hnsw``, ``ivf`` or a faiss factory string (new indexes only).
        batch_size: images per forward pass.
        explain: CAM method for each case's stored map, or ``none``.
        rebuild: rebuild every index from the stored embeddings first (no image is re-read).
        path_column, label_column, group_column, images: manifest options (see read_dataset).
        progress: show a progress bar.
        records: index these ``Record``s instead of reading ``source`` (evaluation folds).
        target_layer: CAM layer of every model (a dotted module path inside its trunk); default the
            last convolutional block, the fast path. Part of the model's fingerprint.

    Example:
        >>> report = index_dataset(open_casebase("cases.db"), "data/brain_mri", models=["mobilenet_v2"])
    """
    from tqdm import tqdm

    from cbr.embedder import create_embedder
    from cbr.member import load_index, rebuild_index, register_model, writer_lock
    from cbr.schema import IndexManifest, Model

    import index as ix

    t0 = time.monotonic()
    report = IngestReport(source=str(source) if source is not None else None, models=list(models))
    with writer_lock(cb):
        if rebuild:
            with cb.read() as s:
                # Models with an index, or with stored embeddings whose manifest row was lost.
                rows = s.execute(select(Model.id, Model.source).where(
                    Model.id.in_(select(IndexManifest.model_id)) | Model.id.in_(select(Embedding.model_id))
                ).order_by(Model.id)).all()
            for model_id, src in rows:
                rebuild_index(cb, model_id)
                report.rebuilt.append(src)
        if source is None and records is None:
            report.elapsed = time.monotonic() - t0
            return report

        if records is not None:
            scan = Scan(source=str(source or "<records>"), kind="records", records=list(records), problems=[])
        else:
            scan = read_dataset(source, path_column=path_column, label_column=label_column,
                                group_column=group_column, images=images, progress=progress)
        report.problems.extend(scan.problems)

        members = []
        for spec in models:
            emb = create_embedder(spec, weights=None if Path(spec).exists() else weights,
                                  target_layer=target_layer).to(device)
            emb.eval()
            model_id = register_model(cb, emb, _model_source(spec))
            with cb.read() as s:
                has_manifest = s.scalar(select(IndexManifest.id).where(IndexManifest.model_id == model_id)) is not None
            if has_manifest:
                index, kind, notes = load_index(cb, model_id, persist_repair=True)
                report.notes.extend(notes)
            else:
                kind = index_type
                try:
                    index = ix.build(emb.config.embedding_dim, kind, n_hint=len(scan.records))
                except ValueError as e:
                    raise CbrError(f"--index-type {index_type!r}: {e}") from None
            members.append((model_id, emb, index, kind))
        model_ids = [m[0] for m in members]

        with cb.write() as s:
            ds = s.scalar(select(Dataset).where(Dataset.source == scan.source, Dataset.kind == scan.kind))
            if ds is None:
                ds = Dataset(source=scan.source, kind=scan.kind, options={
                    "path_column": path_column, "label_column": label_column,
                    "group_column": group_column, "images": [str(i) for i in images]})
                s.add(ds)
                s.flush()
            dataset_id = ds.id
            known = {c.sha256: (c.id, c.label, c.removed_at) for c in s.scalars(
                select(Case).where(Case.sha256.in_([r.sha256 for r in scan.records])))} if scan.records else {}
            have = {}
            for case_id, model_id in s.execute(select(Embedding.case_id, Embedding.model_id).where(Embedding.model_id.in_(model_ids))):
                have.setdefault(case_id, set()).add(model_id)

        todo, new_count = [], 0
        for r in scan.records:
            if r.sha256 in known:
                case_id, label, removed = known[r.sha256]
                if removed is not None:
                    report.problems.append(Problem(r.path, f"was removed from the case base (case {case_id}); not re-added"))
                    continue
                if label != r.label:
                    report.problems.append(Problem(r.path, f"label conflict: case {case_id} has the same image labelled {label!r}, here {r.label!r}"))
                    continue
                if set(model_ids) <= have.get(case_id, set()):
                    report.already += 1
                    continue
            else:
                new_count += 1
            todo.append(r)

        writer = CaseWriter(cb, members, explain=explain)
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)
        decode_problems = []
        for idx, tensors, bad in iter_batches(todo, [m[1].preprocess for m in members], batch_size, num_workers):
            decode_problems.extend(Problem(todo[i].path, reason) for i, reason in bad)
            if idx:
                batch = [todo[i] for i in idx]
                tensors = [t.to(device) for t in tensors]
                before_new = sum(1 for r in batch if r.sha256 not in known)
                writer.add(batch, tensors, dataset_id=dataset_id)
                report.added += before_new
                report.embedded += len(batch) - before_new
                writer.maybe_save()
            bar.update(len(idx) + len(bad))
        bar.close()
        report.problems.extend(decode_problems)
        writer._dirty = writer._dirty or any(m[2].ntotal == 0 for m in members)
        writer.maybe_save(force=True)
        for model_id, emb, index, kind in members:
            if report.added or not _has_calibration(cb, model_id):
                calibrate(cb, model_id, index)
        if report.problems:
            with cb.write() as s:
                s.add_all(ProblemRow(dataset_id=dataset_id, path=p.path, reason=p.reason) for p in report.problems)
    report.elapsed = time.monotonic() - t0
    return report


def _has_calibration(cb, model_id: int) -> bool:
    with cb.read() as s:
        return s.scalar(select(Calibration.id).where(Calibration.model_id == model_id)) is not None


def calibrate(cb, model_id: int, index, *, max_cases: int = CALIBRATION_CASES, k_max: int = CALIBRATION_K,
              seed: int = 0) -> int:
    """Store held-out neighbour labels for the credibility vote; returns the number of rows.

    Each calibration case is searched against the rest of the case base, excluding itself and
    every case of its patient, as a new patient's query would be.
    """
    import index as ix

    from cbr.member import active_embeddings

    ids, vecs = active_embeddings(cb, model_id)
    if len(ids) < 2:
        return 0
    with cb.read() as s:
        meta = {c.id: (c.label, c.group_id) for c in s.scalars(select(Case).where(Case.id.in_(ids.tolist())))}
    by_group: dict = {}
    for cid, (_, g) in meta.items():
        if g is not None:
            by_group.setdefault(g, []).append(cid)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ids), size=min(max_cases, len(ids)), replace=False))
    exclude = []
    for p in pick:
        cid = int(ids[p])
        g = meta[cid][1]
        exclude.append(by_group.get(g, [cid]) if g is not None else [cid])
    _, I = ix.search(index, vecs[pick], min(k_max, len(ids) - 1), exclude=exclude)
    rows = [[meta[int(ids[p])][0], [meta[int(j)][0] for j in I[n] if j >= 0 and int(j) in meta]]
            for n, p in enumerate(pick)]
    with cb.write() as s:
        row = s.scalar(select(Calibration).where(Calibration.model_id == model_id))
        if row is None:
            s.add(Calibration(model_id=model_id, rows=rows))
        else:
            row.rows = rows
    return len(rows)
