"""`cbr import`: embeddings computed elsewhere (Parquet, or .npy + CSV) become cases, checked, resumable."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from cbr.data.image import sha256_file
from cbr.data.sources import read_source
from cbr.models.embedder import create_embedder
from cbr.pipeline.importer import FINGERPRINT_KEY
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Embedding, Explanation
from index_data import casebase_counts
from conftest import invoke

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TINY = ("--model", "tinycnn", "--weights", "none")


@pytest.fixture(scope="module")
def tiny():
    emb = create_embedder("tinycnn", weights="none")
    emb.eval()
    return emb


@pytest.fixture
def images(tmp_path, tiny):
    """12 distinct images in two classes, and their embeddings as a Ray or GPU job would compute them."""
    import torch

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for i in range(12):
        label = "ab"[i % 2]
        # class a: bright on the left, b: on the right, so neighbours share labels
        px = rng.integers(0, 60, (32, 32), dtype=np.uint8)
        px[:, :16] += 150 if label == "a" else 0
        px[:, 16:] += 150 if label == "b" else 0
        path = root / f"{i}.png"
        Image.fromarray(px).save(path)
        rows.append({"path": f"images/{i}.png", "label": label, "group": f"p{i // 2}",
                     "metadata": json.dumps({"site": "x"})})
    x = torch.stack([tiny.preprocess(read_source(str(tmp_path / r["path"]))[0]) for r in rows])
    with torch.no_grad():
        vectors = tiny(x).float().numpy()
    return tmp_path, rows, vectors


def _parquet(path, rows, vectors, fingerprint=None, **columns):
    d = vectors.shape[1]
    table = pa.table({**{k: [r[k] for r in rows] for k in ("path", "label", "group", "metadata")}, **columns,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), d)})
    if fingerprint is not None:
        table = table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint})
    pq.write_table(table, path)
    return path


@pytest.mark.slow
def test_import_parquet_then_query(runner, images, tiny):
    root, rows, vectors = images
    source = _parquet(root / "emb.parquet", rows, vectors, tiny.fingerprint)
    db = root / "cases.db"
    result = invoke(runner, "import", source, *TINY, "--db", db)
    assert result.exit_code == 0, result.output
    assert "cases added:   12" in result.output
    assert casebase_counts(db) == (12, 12, 12, 12)
    with open_casebase(str(db)).read() as s:
        case = s.scalar(select(Case).where(Case.path == str(root / "images" / "3.png")))
        assert (case.label, case.group_id, case.meta, case.origin) == ("b", "p1", {"site": "x"}, "import")
        assert case.sha256 == sha256_file(root / "images" / "3.png")  # hashed from the file: no sha256 column
    again = invoke(runner, "import", source, *TINY, "--db", db)
    assert again.exit_code == 0, again.output
    assert "cases added:   0" in again.output and "already there: 12" in again.output
    assert casebase_counts(db) == (12, 12, 12, 12)

    # A query finds the imported cases; their neighbour maps are computed from their files and stored.
    query = root / "q.png"
    Image.open(root / "images" / "4.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(query)
    result = invoke(runner, "query", query, "--db", db, "-k", "3", "--json", "--out", root / "reports")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    answer = answer[0] if isinstance(answer, list) else answer
    neighbours = answer["members"][0]["neighbours"]
    assert len(neighbours) == 3 and answer["prediction"]["label"] == "a"
    with open_casebase(str(db)).read() as s:
        maps = s.scalars(select(Explanation.case_id).where(Explanation.role == "neighbour")).all()
    assert {n["case_id"] for n in neighbours} <= set(maps)


@pytest.mark.postgres  # and on PostgreSQL (tests/pg.py)
def test_import_npy_with_manifest(runner, images, tiny, db_url):
    root, rows, vectors = images
    np.save(root / "emb.npy", vectors)
    with open(root / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "metadata"])
        w.writeheader()
        w.writerows(rows)
    db = db_url
    result = invoke(runner, "import", root / "emb.npy", "--manifest", root / "rows.csv", *TINY,
                    "--fingerprint", tiny.fingerprint, "--db", db)
    assert result.exit_code == 0, result.output
    assert "cases added:   12" in result.output
    assert casebase_counts(db) == (12, 12, 12, 12)
    cb = open_casebase(str(db))
    with cb.read() as s:
        stored = s.scalar(select(Embedding.vector).join(Case).where(Case.path == str(root / "images" / "0.png")))
    np.testing.assert_allclose(np.frombuffer(stored, np.float32), vectors[0] / np.linalg.norm(vectors[0]), atol=1e-6)

    short = root / "short.csv"
    short.write_text("path,label\nimages/0.png,a\n")
    result = invoke(runner, "import", root / "emb.npy", "--manifest", short, *TINY, "--fingerprint",
                    tiny.fingerprint, "--db", root / "other.db")
    assert result.exit_code == 1
    assert "has 1 rows" in result.output and "12 embeddings" in result.output


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_import_refuses_another_dimension(runner, images, tiny):
    root, rows, vectors = images
    source = _parquet(root / "emb.parquet", rows, vectors[:, :32].copy(), tiny.fingerprint)
    line = _one_error_line(invoke(runner, "import", source, *TINY, "--db", root / "cases.db"))
    assert "dimension 32" in line and "64" in line
    assert casebase_counts(root / "cases.db")[0] == 0  # nothing written


def test_import_refuses_another_model(runner, images, tiny):
    root, rows, vectors = images
    source = _parquet(root / "emb.parquet", rows, vectors, "0" * 64)
    line = _one_error_line(invoke(runner, "import", source, *TINY, "--db", root / "cases.db"))
    assert "fingerprint 0000000000000000" in line and "not by tinycnn" in line
    unsigned = _parquet(root / "unsigned.parquet", rows, vectors)
    line = _one_error_line(invoke(runner, "import", unsigned, *TINY, "--db", root / "cases.db"))
    assert "does not say which model" in line and "--fingerprint" in line
    assert casebase_counts(root / "cases.db")[0] == 0


def test_import_skips_bad_rows_and_lists_them(runner, images, tiny):
    root, rows, vectors = images
    vectors = vectors.copy()
    vectors[1] = np.nan
    rows = [dict(r) for r in rows]
    rows[2]["label"] = ""
    rows[3]["path"] = "images/missing.png"
    source = _parquet(root / "emb.parquet", rows, vectors, tiny.fingerprint)
    result = invoke(runner, "import", source, *TINY, "--db", root / "cases.db")
    assert result.exit_code == 0, result.output
    assert "cases added:   9" in result.output and "skipped:       3" in result.output
    assert "row 2: an embedding with a missing, infinite or NaN value" in result.output
    assert "row 3: no label" in result.output
    assert "row 4: no sha256 column and the file cannot be hashed" in result.output


@pytest.mark.slow
def test_import_resumes_after_kill(tmp_path, tiny):
    """kill -9 in the middle of an import; running it again finishes, every row once."""
    n, d = 20000, tiny.config.embedding_dim
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    rows = [{"path": f"/nowhere/{i}.png", "label": "ab"[i % 2], "group": None, "metadata": None} for i in range(n)]
    shas = [f"{i:064x}" for i in range(n)]
    source = _parquet(tmp_path / "big.parquet", rows, vectors, tiny.fingerprint, sha256=shas)
    db = tmp_path / "cases.db"
    cmd = [sys.executable, "-m", "cbr", "import", str(source), *TINY, "--db", str(db), "--batch-size", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        seen = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    seen = _counts_cases(db)
                except Exception:  # the schema may not exist yet
                    seen = 0
                if seen >= 1000:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 0 < _counts_cases(db) < n, "the import should be killed in the middle"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert casebase_counts(db) == (n, n, n, n)


def _counts_cases(db):
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM cases").fetchone()[0]
