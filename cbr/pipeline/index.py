"""``cbr index``: read a dataset, then decode, embed, explain, store and index it in batches, and
calibrate the votes. Incremental (images already stored are skipped) and resumable."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from tqdm import tqdm

from cbr.data.batches import iter_batches
from cbr.data.dataset import ManifestSpec, Problem, Scan, read_dataset
from cbr.data.text import confusable_with, lookalike_note
from cbr.errors import CbrError
from cbr.lazy_import import LazyModule
from cbr.pipeline.calibration import calibrate, has_calibration
from cbr.pipeline.patient import check_key
from cbr.pipeline.engine import ray_batches, RaySettings
from cbr.pipeline.map_reliability import measure_case_maps
from cbr.pipeline.finding_search import index_findings, rebuild_finding_indexes
from cbr.pipeline.settings import NO_EXPLANATION, IndexConfig, with_overrides
from cbr.store.damage import drop_damaged
from cbr.store.member import embedded_count, load_index, Member, rebuild_index, register_model, save_index, writer_lock
from cbr.store.schema import Case, Dataset, Embedding, IndexManifest, Model
from cbr.store.schema import Problem as ProblemRow
from cbr.store.writer import CaseWriter, Stored, stored_cases
import index as ix

__all__ = ["IngestReport", "IndexConfig", "index_dataset", "make_embedder", "open_member", "open_members", "records_to_embed",
           "train_on_collection"]

LOG = logging.getLogger(__name__)
models_embedder = LazyModule("cbr.models.embedder")  # torch-bound: loads on first use


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


def _model_source(spec: str) -> str:
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def _one_window(members) -> str:
    """The VOI window shared by every member: images are decoded once for all of them."""
    windows = {m.embedder.config.window for m in members}
    if len(windows) > 1:
        shown = ", ".join(f"{m.label}: {m.embedder.config.window}" for m in members)
        raise CbrError(f"the models decode DICOM/NIfTI with different windows ({shown}); "
                       "index them in separate runs, or give one --window for all")
    return windows.pop() if windows else "auto"


def make_embedder(spec: str, c: IndexConfig, window):
    """The embedder of one model of ``c`` (a backbone name or a checkpoint path), in eval mode on ``c.device``."""
    emb = models_embedder.create_embedder(spec, weights=None if Path(spec).exists() else c.weights,
                                          target_layer=c.target_layer, window=window, contrast=c.contrast, tta=c.tta,
                                          crop=c.crop).to(c.device)
    emb.eval()
    return emb


def open_member(cb, spec: str, emb, index_type: str, n_hint: int, notes: list) -> Member:
    """``emb`` registered as a member: its index loaded (and repaired) or built empty, of ``index_type``."""
    model_id = register_model(cb, emb, _model_source(spec))
    with cb.read() as s:
        has_manifest = s.scalar(select(IndexManifest.id).where(IndexManifest.model_id == model_id)) is not None
    if has_manifest:
        index, kind, repaired, _ = load_index(cb, model_id, persist_repair=True)
        notes.extend(repaired)
        staged = False
    else:
        kind = index_type
        try:
            # A kind that learns from the vectors (IVF, PQ) is trained once on the whole collection
            # at the end of the run (train_on_collection), which reads it back from the case base a
            # chunk at a time; until then the cases are only stored (see Member.staged).
            staged = ix.needs_training(emb.config.embedding_dim, kind, n_hint)
            index = ix.build(emb.config.embedding_dim, "flat" if staged else kind, n_hint=n_hint)
        except ValueError as e:
            raise CbrError(f"--index-type {kind!r}: {e}") from None
    return Member(model_id=model_id, fingerprint=emb.fingerprint, label=spec, embedder=emb, index=index, kind=kind,
                  staged=staged)


def open_members(cb, c: IndexConfig, window, n_hint: int, notes: list) -> list:
    """One ``Member`` per model of ``c``: registered, its index loaded (and repaired) or built empty."""
    return [open_member(cb, spec, make_embedder(spec, c, window), c.index_type, n_hint, notes) for spec in c.models]


def _computed(todo, members, writer, c: IndexConfig, window):
    """Yield (record indices, embeddings per member, maps per member, [(index, problem)]) per batch,
    decoded and computed here (engine "local") or on Ray (pipeline/engine.py)."""
    if c.engine == "ray":
        # CPU copies travel to the actors (a CUDA tensor cannot load where there is no GPU).
        settings = RaySettings(embedders=tuple(copy.deepcopy(m.embedder).to("cpu") for m in members),
                               explain=c.explain, batch_size=c.batch_size)
        yield from ray_batches(todo, settings, c.ray_address)
        return
    for idx, tensors, bad in iter_batches(todo, [m.embedder.preprocess for m in members], c.batch_size,
                                          c.num_workers, window=window):
        if not idx:
            yield idx, None, None, bad
            continue
        embeddings, maps = writer.compute([todo[i] for i in idx], [t.to(c.device) for t in tensors])
        yield idx, embeddings, maps, bad


def train_on_collection(cb, members, notes: list) -> None:
    """Build each staged member's index (see open_member) from the stored collection, and replace
    an exact stand-in left by an earlier run by its kind: trained on an even sample of the stored
    vectors and filled a chunk at a time (store.member.rebuild_index). A collection too small to
    train it keeps an exact index until a later run; an empty one, the empty stand-in."""
    for m in members:
        staged, m.staged = m.staged, False
        if staged and not embedded_count(cb, m.model_id):
            save_index(cb, m.model_id, m.index, m.kind)
        elif staged or (m.index.ntotal and not ix.learned(m.index)
                        and ix.needs_training(m.index.d, m.kind, m.index.ntotal)):
            try:
                m.index = rebuild_index(cb, m.model_id, m.kind)
            except ValueError as e:
                notes.append(f"{m.label}: index kind {m.kind!r} stays exact (flat) for now: {str(e).split(' (')[0]}; "
                             "the next `cbr index` run trains it")
                if staged:  # the stand-in, filled from the case base as it is saved (a small collection)
                    save_index(cb, m.model_id, m.index, m.kind)


def records_to_embed(records, stored: Stored, model_ids: list, report: IngestReport) -> list:
    """The records to embed: new images, and stored ones that a member lacks. Images stored for
    every member are counted as already there; removed or relabelled ones are refused."""
    todo = []
    for r in records:
        case_id = stored.case_of.get(r.sha256)
        if case_id is not None:
            label = stored.label_of[case_id]
            if case_id in stored.removed:
                report.problems.append(Problem(r.path, f"was removed from the case base (case {case_id}); not re-added"))
                continue
            if label != r.label:
                report.problems.append(Problem(r.path, f"label conflict: case {case_id} has the same image labelled {label!r}, here {r.label!r}"))
                continue
            if set(model_ids) <= stored.models_of.get(case_id, set()):
                report.already += 1
                continue
        todo.append(r)
    return todo


def _rebuild(cb, report: IngestReport) -> None:
    """Rebuild every member's index from the stored embeddings (``--rebuild``), calibrating where missing."""
    # Rows that do not decode first (a map of the wrong size, a NaN embedding): dropped, so
    # that the rebuild reads only sound rows; DATA, if given, embeds those images again.
    report.notes.extend(drop_damaged(cb))
    with cb.read() as s:
        # Models with an index, or with stored embeddings whose manifest row was lost.
        rows = s.execute(select(Model.id, Model.source).where(
            Model.id.in_(select(IndexManifest.model_id)) | Model.id.in_(select(Embedding.model_id))
        ).order_by(Model.id)).all()
    for model_id, src in rows:
        index = rebuild_index(cb, model_id)
        if not has_calibration(cb, model_id):
            calibrate(cb, model_id, index)
        report.rebuilt.append(src)
    report.notes.extend(rebuild_finding_indexes(cb))  # the findings' indexes too, of the same kinds


def _stored(cb, scan, manifest, sources) -> tuple[int, Stored]:
    """(the dataset row's id, created if new; what the case base holds of the scan's images,
    looked up a chunk of sha256s at a time)."""
    with cb.write() as s:
        ds = s.scalar(select(Dataset).where(Dataset.source == scan.source, Dataset.kind == scan.kind))
        if ds is None:
            options = (manifest or ManifestSpec()).to_dict()
            if sources is not None:
                options["sources"] = sources.to_dict()  # never the pseudonymisation key itself
            ds = Dataset(source=scan.source, kind=scan.kind, options=options)
            s.add(ds)
            s.flush()
        dataset_id = ds.id
        stored = stored_cases(s, (r.sha256 for r in scan.records))
    return dataset_id, stored


def _lookalikes(cb, records) -> list[str]:
    """A warning for each new label that mixes scripts to look like another class (stored or in
    this dataset): ``tumоur`` with a Cyrillic ``о`` would quietly become a class of its own."""
    labels = {r.label for r in records}
    with cb.read() as s:
        stored = set(s.scalars(select(Case.label).distinct()))
    notes = []
    for label in sorted(labels - stored):
        other = confusable_with(label, (stored | labels) - {label})
        if other is not None:
            notes.append(lookalike_note(label, other))
    return notes


def index_dataset(cb, source=None, config: IndexConfig | None = None, *, manifest: ManifestSpec | None = None,
                  records=None, rebuild: bool = False, progress: bool = False, sources=None,
                  **overrides) -> IngestReport:
    """Index a dataset into a case base: read, decode, embed, explain, store, index, calibrate.

    Incremental (images already stored are skipped) and interruptible (re-running completes).

    Args:
        cb: an open CaseBase.
        source: a class-folder dataset or a CSV manifest; may be None with ``rebuild``.
        config: an ``IndexConfig`` (models, weights, index type, batch size, CAM method and layer,
            workers, device); ``overrides`` change some of its fields (``models=["resnet50"]``).
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).
        records: index these ``Record``s instead of reading ``source`` (evaluation folds).
        sources: a ``SourceSpec``: DICOM frames, NIfTI slices, ``.npz`` split and classes, patient-id
            key, and the VOI window (which becomes part of every model's preprocessing).
        rebuild: rebuild every index from the stored embeddings first (no image is re-read).
        progress: show a progress bar.

    Example:
        >>> report = index_dataset(open_casebase("cases.db"), "data/brain_mri", IndexConfig(models=("resnet50",)))
    """
    c = with_overrides(config, IndexConfig, overrides)
    t0 = time.monotonic()
    report = IngestReport(source=str(source) if source is not None else None, models=list(c.models))
    with writer_lock(cb):
        if rebuild:
            _rebuild(cb, report)
        if source is None and records is None:
            report.elapsed = time.monotonic() - t0
            return report

        if records is not None:
            scan = Scan(source=str(source or "<records>"), kind="records", records=list(records), problems=[])
        else:
            # one key per case base: raw ids beside hashed ones, or two keys, would group nothing
            check_key(cb, sources.pseudonymise if sources is not None else None, "index")
            scan = read_dataset(source, manifest, progress=progress, sources=sources)
        report.problems.extend(scan.problems)
        report.notes.extend(_lookalikes(cb, scan.records))

        members = open_members(cb, c, sources and sources.window, len(scan.records), report.notes)
        model_ids = [m.model_id for m in members]
        window = _one_window(members)

        dataset_id, stored = _stored(cb, scan, manifest, sources)
        todo = records_to_embed(scan.records, stored, model_ids, report)

        writer = CaseWriter(cb, members, explain=c.explain, embedding_dtype=c.embedding_dtype)
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)
        decode_problems = []
        for idx, embeddings, maps, bad in _computed(todo, members, writer, c, window):
            decode_problems.extend(Problem(todo[i].path, reason) for i, reason in bad)
            if idx:
                batch = [todo[i] for i in idx]
                before_new = sum(1 for r in batch if r.sha256 not in stored.case_of)
                writer.store(batch, embeddings, maps, dataset_id=dataset_id, stored=stored)
                report.added += before_new
                report.embedded += len(batch) - before_new
                writer.maybe_save()
            bar.update(len(idx) + len(bad))
        bar.close()
        report.problems.extend(decode_problems)
        if any(m.index.ntotal == 0 for m in members):
            writer.mark_dirty()
        writer.maybe_save(force=True)
        train_on_collection(cb, members, report.notes)
        for m in members:
            if report.added or not has_calibration(cb, m.model_id):
                calibrate(cb, m.model_id, m.index)
        if c.explain != NO_EXPLANATION:
            report.notes.extend(measure_case_maps(cb, members, scan.records, c.explain))
        masked = {r.sha256 for r in scan.records if (r.metadata or {}).get("mask")}
        if masked:  # each lesion becomes a finding too
            report.notes.extend(index_findings(cb, members, masked))
        if report.problems:
            with cb.write() as s:
                s.add_all(ProblemRow(dataset_id=dataset_id, path=p.path, reason=p.reason) for p in report.problems)
    report.elapsed = time.monotonic() - t0
    return report
