"""``cbr import``: embeddings computed elsewhere (a Ray or GPU job) become cases of a case base.

The input is what such a job writes: a Parquet file with one row per image (columns ``path``,
``label``, ``group``, ``metadata`` and ``embedding``), or an ``.npy`` matrix with a CSV manifest
giving the same columns row for row. Optional columns: ``sha256`` (the image file's; else the file
at ``path`` is hashed) and ``fingerprint`` (the model's, else the Parquet key-value metadata
``cbr.fingerprint`` or ``--fingerprint``).

Decisions:

* The vectors must come from the model named: the same dimension and the same fingerprint, checked
  before anything is written; a mismatch is refused in one line (vectors of another model would be
  searched as if comparable, silently wrong).
* Rows are read a batch at a time (never the whole file) and written by the same ``CaseWriter`` as
  ``cbr index``, one transaction per batch. A killed import keeps every committed batch; running it
  again skips the rows already stored (by sha256) and finishes, without duplicates.
* Imported cases have no stored case map (no image was read here). At query time their neighbour
  maps are computed from their files, as for every neighbour, and stored with the query.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from sqlalchemy import select

from cbr.data.image import sha256_file
from cbr.data.records import Problem, Record
from cbr.errors import CbrError
from cbr.pipeline.calibration import calibrate, has_calibration
from cbr.pipeline.index import make_embedder, open_member, records_to_embed, train_on_collection
from cbr.pipeline.settings import NO_EXPLANATION, IndexConfig, with_overrides
from cbr.store.encoding import EMBEDDING_DTYPES
from cbr.store.member import writer_lock
from cbr.store.schema import Dataset
from cbr.store.writer import CaseWriter, stored_cases

__all__ = ["COLUMNS", "FINGERPRINT_KEY", "ImportConfig", "ImportReport", "import_embeddings"]

COLUMNS = ("path", "label", "group", "metadata", "embedding")
FINGERPRINT_KEY = "cbr.fingerprint"  # Parquet key-value metadata: the fingerprint of the model that embedded
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ImportConfig:
    """How ``cbr import`` reads embeddings and stores them."""

    model: str = "mobilenet_v2"  # the backbone name or checkpoint that computed the embeddings
    weights: str = "imagenet"  # for a backbone name: its weights (a checkpoint carries its own)
    manifest: str | None = None  # with an .npy matrix: the CSV of path,label,group,metadata, row for row
    fingerprint: str | None = None  # the embedding model's fingerprint, when the file does not carry it
    index_type: str = "flat"  # of a new index (as `cbr index --index-type`)
    batch_size: int = 5000  # rows per read and per transaction
    embedding_dtype: str = "float32"  # how embeddings are stored (store/encoding.py)

    def __post_init__(self):
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise CbrError(f"--embedding-dtype {self.embedding_dtype!r}: choose from {', '.join(EMBEDDING_DTYPES)}")
        if self.batch_size < 1:
            raise CbrError("--batch-size must be at least 1")


@dataclass
class ImportReport:
    """What one ``cbr import`` run did."""

    source: str
    model: str
    added: int = 0
    already: int = 0
    embedded: int = 0  # stored cases that got this model's embedding
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def to_dict(self) -> dict:
        return {"source": self.source, "model": self.model, "added": self.added, "embedded": self.embedded,
                "already": self.already, "problems": [{"path": p.path, "reason": p.reason} for p in self.problems],
                "notes": self.notes, "elapsed_s": round(self.elapsed, 3)}


@dataclass
class _Source:
    """An embeddings file opened for streaming: its size, dimension, fingerprint and batches of
    (rows as dicts, float32 vectors, problems of rows whose vector cannot be read)."""

    rows: int
    dim: int | None
    fingerprint: str | None
    batches: object  # a generator


def _parquet(path: Path, batch_size: int) -> _Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CbrError("reading Parquet needs pyarrow: pip install 'cbr[parquet]'") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
        raise CbrError(f"{path}: not a readable Parquet file ({e})") from None
    names = set(f.schema_arrow.names)
    missing = [c for c in ("path", "label", "embedding") if c not in names]
    if missing:
        raise CbrError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    kind = f.schema_arrow.field("embedding").type
    dim = getattr(kind, "list_size", None)  # a fixed-size list says its dimension; a list, its first row
    meta = f.schema_arrow.metadata or {}
    fp = meta.get(FINGERPRINT_KEY.encode())

    def batches():
        for batch in f.iter_batches(batch_size=batch_size):
            vectors = _matrix(batch.column("embedding"))
            table = batch.drop_columns(["embedding"]).to_pydict()
            rows = [dict(zip(table, values)) for values in zip(*table.values())]
            yield rows, vectors

    return _Source(f.metadata.num_rows, dim, fp.decode() if fp else None, batches())


def _matrix(column):
    """A Parquet list column as a float32 matrix without a Python object per value; a column with
    nulls or rows of several lengths as a list of rows (each checked on its own, see ``_batch``)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column)
    if column.null_count == 0 and len(column) and pc.min(lengths).as_py() == pc.max(lengths).as_py():
        values = column.flatten()
        if values.null_count == 0:
            return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), -1)
    return column.to_pylist()


def _npy(path: Path, manifest: str | None, batch_size: int) -> _Source:
    if manifest is None:
        raise CbrError(f"{path}: an .npy matrix needs --manifest CSV with the columns path,label,group,metadata, "
                       "row for row")
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CbrError(f"{path}: not a readable .npy matrix ({e})") from None
    if matrix.ndim != 2:
        raise CbrError(f"{path}: an .npy of shape {matrix.shape}; expected one embedding per row (2-D)")
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
            n = sum(1 for _ in csv.reader(fh))
    except OSError as e:
        raise CbrError(f"--manifest {manifest}: cannot read it ({e.strerror})") from None
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise CbrError(f"--manifest {manifest}: missing column(s) {', '.join(missing)}; "
                       "expected path,label,group,metadata")
    if n != matrix.shape[0]:
        raise CbrError(f"--manifest {manifest} has {n} rows and {path} {matrix.shape[0]} embeddings; they must "
                       "match row for row")

    def batches():
        with open(manifest, newline="", encoding="utf-8") as fh, open(path, "rb") as data:
            reader = csv.DictReader(fh)
            start = 0
            while rows := list(islice(reader, batch_size)):
                yield rows, _npy_rows(matrix, data, start, len(rows))
                start += len(rows)

    return _Source(matrix.shape[0], matrix.shape[1], None, batches())


def _npy_rows(matrix, data, start: int, count: int) -> np.ndarray:
    """Rows start .. start+count-1 of an .npy (``matrix``: its memory map) as float32, read from
    the open file ``data``: pages read through the map would stay in the process's resident set
    until the end (a 10M x 512 float16 file: 10 GB)."""
    if not matrix.flags.c_contiguous:  # Fortran order: rows are not contiguous in the file
        return np.asarray(matrix[start:start + count], dtype=np.float32)
    d = matrix.shape[1]
    data.seek(matrix.offset + start * d * matrix.dtype.itemsize)
    x = np.fromfile(data, dtype=matrix.dtype, count=count * d)
    if len(x) != count * d:
        raise CbrError(f"{data.name}: ends after {start + len(x) // d} of its {matrix.shape[0]} rows (truncated?)")
    return x.reshape(count, d).astype(np.float32, copy=False)


def _open(path: Path, c: ImportConfig) -> _Source:
    if not path.is_file():
        raise CbrError(f"{path}: no such file; give a Parquet file or an .npy matrix with --manifest")
    if path.suffix.lower() == ".npy":
        return _npy(path, c.manifest, c.batch_size)
    return _parquet(path, c.batch_size)


def _record(row: dict, vector, dim: int, base: Path) -> tuple[Record | None, str | None]:
    """(the row as a ``Record``, None) or (None, why it is skipped)."""
    path, label = row.get("path"), row.get("label")
    if not path or not isinstance(path, str):
        return None, "no path"
    if label is None or not str(label).strip():
        return None, "no label"
    if vector is None or len(vector) != dim:
        return None, f"an embedding of {0 if vector is None else len(vector)} values; the model's have {dim}"
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except ValueError:
            return None, "metadata is not JSON"
    if meta is not None and not isinstance(meta, dict):
        return None, "metadata is not a JSON object"
    full = Path(path) if Path(path).is_absolute() else base / path
    sha = (row.get("sha256") or "").strip().lower()
    if sha and not _SHA256.match(sha):
        return None, f"sha256 {sha[:80]!r} is not 64 hex digits"
    if not sha:
        try:
            sha = sha256_file(full)
        except CbrError as e:
            return None, f"no sha256 column and the file cannot be hashed ({e})"
    group = row.get("group")
    return Record(path=str(full), label=str(label), group=None if group in (None, "") else str(group),
                  metadata=meta or {}, sha256=sha), None


def _vectors(records_vectors: list) -> np.ndarray:
    """The batch's vectors as float32 rows of unit length (cbr searches by inner product)."""
    x = np.asarray(records_vectors, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _checked_fingerprint(src: _Source, rows: list, c: ImportConfig, path: Path) -> str:
    """The embedding model's fingerprint, from the file or --fingerprint; refused if they disagree or none."""
    said = {r.get("fingerprint") for r in rows if r.get("fingerprint")} | {src.fingerprint, c.fingerprint}
    said.discard(None)
    if len(said) > 1:
        raise CbrError(f"{path}: the embeddings name several model fingerprints ({', '.join(sorted(said))}); "
                       "import each model's embeddings separately")
    if not said:
        raise CbrError(f"{path} does not say which model computed it; write the model's fingerprint as the Parquet "
                       f"metadata {FINGERPRINT_KEY!r} or a fingerprint column, or give --fingerprint")
    return said.pop()


def _batch(rows, vectors, dim: int, base: Path, report: ImportReport, row0: int):
    """(records, their unit vectors) of one batch; unusable rows go to ``report.problems``."""
    records, kept = [], []
    for i, (row, v) in enumerate(zip(rows, vectors)):
        rec, why = _record(row, v, dim, base)
        if rec is not None:
            try:
                v = np.asarray(v, dtype=np.float32)
                usable = bool(np.isfinite(v).all() and v.any())
            except (TypeError, ValueError):  # a null inside the list
                usable = False
            if not usable:
                rec, why = None, "an embedding with a missing, infinite or NaN value, or all zeros"
        if rec is None:
            report.problems.append(Problem(str(row.get("path") or f"row {row0 + i + 1}"), f"row {row0 + i + 1}: {why}"))
            continue
        records.append(rec)
        kept.append(v)
    return records, (_vectors(kept) if kept else np.empty((0, dim), dtype=np.float32))


def _dataset_id(cb, path: Path, c: ImportConfig) -> int:
    with cb.write() as s:
        ds = s.scalar(select(Dataset).where(Dataset.source == str(path), Dataset.kind == "embeddings"))
        if ds is None:
            ds = Dataset(source=str(path), kind="embeddings", options={"manifest": c.manifest, "model": c.model})
            s.add(ds)
            s.flush()
        return ds.id


def import_embeddings(cb, source, config: ImportConfig | None = None, *, progress: bool = False,
                      **overrides) -> ImportReport:
    """Store embeddings computed elsewhere as cases, index them and calibrate the votes.

    Resumable: rows already stored (same sha256, this model's embedding present) are skipped.

    Args:
        cb: an open CaseBase.
        source: a Parquet file (columns path, label, group, metadata, embedding; optional sha256 and
            fingerprint) or an ``.npy`` matrix with ``manifest`` (a CSV with the same columns).
        config: an ``ImportConfig``; ``overrides`` change some of its fields.
        progress: show a progress bar.

    Example:
        >>> import_embeddings(open_casebase("cases.db"), "embeddings.parquet", ImportConfig(model="model.pt"))
    """
    from tqdm import tqdm

    c = with_overrides(config, ImportConfig, overrides)
    t0 = time.monotonic()
    path = Path(source).resolve()
    src = _open(path, c)
    first = next(src.batches, None)
    emb = make_embedder(c.model, IndexConfig(models=(c.model,), weights=c.weights, explain=NO_EXPLANATION), None)
    dim = emb.config.embedding_dim
    file_dim = src.dim or (len(first[1][0]) if first and len(first[1]) and first[1][0] is not None else None)
    if file_dim is not None and file_dim != dim:
        raise CbrError(f"{path}: embeddings of dimension {file_dim}, but {c.model} embeds in {dim}; "
                       "import them with the model that computed them")
    fp = _checked_fingerprint(src, first[0] if first else [], c, path)
    if fp != emb.fingerprint:
        raise CbrError(f"{path}: computed by the model with fingerprint {fp[:16]}, not by {c.model} "
                       f"({emb.fingerprint[:16]}); import them with the model that computed them")
    report = ImportReport(source=str(path), model=c.model)
    with writer_lock(cb):
        member = open_member(cb, c.model, emb, c.index_type, src.rows, report.notes)
        dataset_id = _dataset_id(cb, path, c)
        writer = CaseWriter(cb, [member], explain=NO_EXPLANATION, embedding_dtype=c.embedding_dtype)
        bar = tqdm(total=src.rows, desc="importing", unit="row", disable=not progress)
        row0 = 0
        for rows, vectors in _chain(first, src.batches):
            _store(cb, writer, member, rows, vectors, dim, path.parent, report, row0, dataset_id)
            row0 += len(rows)
            bar.update(len(rows))
        bar.close()
        if member.index.ntotal == 0:
            writer.mark_dirty()
        writer.maybe_save(force=True)
        train_on_collection(cb, [member], report.notes)
        if report.added or report.embedded or not has_calibration(cb, member.model_id):
            calibrate(cb, member.model_id, member.index)
    report.elapsed = time.monotonic() - t0
    return report


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


def _store(cb, writer, member, rows, vectors, dim, base, report, row0, dataset_id) -> None:
    """Write one batch: the rows not stored yet for this model, in one transaction."""
    records, x = _batch(rows, vectors, dim, base, report, row0)
    if not records:
        return
    with cb.read() as s:
        stored = stored_cases(s, [r.sha256 for r in records])
    todo = set(map(id, records_to_embed(records, stored, [member.model_id], report)))
    keep = [i for i, r in enumerate(records) if id(r) in todo]
    if not keep:
        return
    batch = [records[i] for i in keep]
    new = {r.sha256 for r in batch if r.sha256 not in stored.case_of}
    writer.store(batch, [x[keep]], [None], dataset_id=dataset_id, origin="import", stored=stored)
    report.added += len(new)
    report.embedded += len({r.sha256 for r in batch} - new)
    writer.maybe_save()
