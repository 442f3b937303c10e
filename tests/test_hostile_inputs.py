"""Hostile inputs (issue 12): labels and notes, files that block or never end, images swapped
after indexing, spreadsheet formulas, crafted checkpoints and file modes.

Each test reproduces one attack on v1; every refusal is exit code 1 and one line, and nothing
stored is changed by it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from badfiles import ESCAPE_LABEL, HUGE_BYTES, NEWLINE_LABEL, make_fifo, make_huge, within
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Explanation, Feedback, Query
from conftest import TINY, invoke
from test_reliability_corruption import assert_one_line_error


def _images(manifest) -> list[Path]:
    with open(manifest, newline="") as fh:
        return [manifest.parent / r["path"] for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def private(tmp_path_factory, phantom_set):
    """A case base over a private copy of the phantoms (tests may swap its files, then restore them)."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(phantom_set.parent, root / "data")
    db = root / "cb" / "cases.db"
    db.parent.mkdir()
    result = invoke(CliRunner(), "index", root / "data" / phantom_set.name, "--db", db, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    return db, root / "data" / phantom_set.name


@pytest.fixture
def cb_copy(private, tmp_path):
    """A fresh copy of the private case base (same image files): (db, manifest)."""
    db, manifest = private
    dest = tmp_path / "cb"
    shutil.copytree(db.parent, dest)
    return dest / db.name, manifest


def _count(db, column) -> int:
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return s.scalar(select(func.count(column)))
    finally:
        cb.close()


def _digest(path) -> str:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _query_json(runner, db, image, out, *extra) -> dict:
    result = invoke(runner, "query", image, "--db", db, "--json", "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _set_label(db, case_id, label) -> None:
    """Store a label as a case base from before issue 12 could hold it."""
    cb = open_casebase(db, create=False)
    with cb.write() as s:
        s.get(Case, case_id).label = label
    cb.close()


# -- 1. labels, patient ids, notes -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("option, value, needle", [
    ("--label", NEWLINE_LABEL, "--label contains a newline"),
    ("--label", ESCAPE_LABEL, "--label contains an escape character"),
    ("--label", "a\u202eb", "--label contains the control character U+202E"),
    ("--by", "dr\tx", "--by contains a tab"),
    ("--note", "ok\x1b[2J", "--note contains an escape character"),
])
def test_feedback_text_with_control_characters_is_refused(runner, cb_copy, tmp_path, option, value, needle):
    db, manifest = cb_copy
    qid = _query_json(runner, db, _images(manifest)[0], tmp_path, "--explain", "none")["query_id"]
    args = {"--label": "tumour", "--by": None, "--note": None}
    args[option] = value
    cmd = ["feedback", qid, "--db", db, "--retain"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    before = _digest(db)
    assert_one_line_error(invoke(runner, *cmd), needle)
    assert _digest(db) == before  # no feedback row, no case


def test_feedback_note_keeps_newlines_and_label_is_nfc(runner, cb_copy, tmp_path):
    db, manifest = cb_copy
    qid = _query_json(runner, db, _images(manifest)[0], tmp_path, "--explain", "none")["query_id"]
    r = invoke(runner, "feedback", qid, "--db", db, "--label", "cafe\u0301", "--new-class", "--note",
               "line 1\r\nline 2\tend")
    assert r.exit_code == 0, r.output
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        fb = s.scalar(select(Feedback))
    assert fb.label == "caf\u00e9" and fb.note == "line 1\nline 2\tend"
    show = invoke(runner, "show", qid, "--db", db)
    assert show.exit_code == 0 and "line 1\\nline 2\\tend" in show.output  # one line in the terminal


def test_query_patient_with_control_character_is_refused(runner, cb_copy, tmp_path):
    db, manifest = cb_copy
    before = _count(db, Query.id)
    assert_one_line_error(invoke(runner, "query", _images(manifest)[0], "--db", db, "--patient", "P\n1",
                                 "--out", tmp_path), "--patient contains a newline")
    assert _count(db, Query.id) == before


def test_stored_multiline_and_escape_labels_render_and_never_reach_the_terminal(runner, cb_copy, tmp_path):
    """A case base written before issue 12 may hold such labels: every query that retrieves them
    renders (v1: ValueError "can't measure length of multiline text"), and the terminal gets escapes."""
    db, manifest = cb_copy
    image = _images(manifest)[0]
    first = _query_json(runner, db, image, tmp_path / "a", "-k", 4, "--explain", "none")
    ids = [n["case_id"] for n in first["neighbours"]]
    _set_label(db, ids[0], NEWLINE_LABEL)
    _set_label(db, ids[1], ESCAPE_LABEL)
    result = invoke(runner, "query", image, "--db", db, "-k", 4, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "\\x1b]0;pwned\\x07" in result.output
    qid = _count(db, Query.id)
    report = invoke(runner, "report", qid, "--db", db, "--out", tmp_path / "r.html")
    assert report.exit_code == 0, report.output
    assert "<script" not in (tmp_path / "r.html").read_text()
    for command in (["history"], ["show", qid]):
        r = invoke(runner, *command, "--db", db)
        assert r.exit_code == 0 and "\x1b" not in r.output, r.output


def test_error_messages_never_carry_escape_sequences(runner, indexed, tmp_path):
    line = assert_one_line_error(invoke(runner, "query", tmp_path / "\x1b]0;pwned\x07.png", "--db", indexed))
    assert "\x1b" not in line and "\x07" not in line and "\\x1b]0;pwned\\x07.png" in line


# -- 2. FIFOs, devices, huge files -----------------------------------------------------------


@pytest.mark.slow
def test_query_of_a_fifo_returns_in_a_subprocess(indexed, tmp_path):
    """The real command, as a user runs it: v1 blocked forever in open()."""
    fifo = make_fifo(tmp_path)
    cmd = [sys.executable, "-m", "cbr", "query", str(fifo), "--db", str(indexed), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {fifo}: not a regular file"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", ["dev_zero", "huge", "small_cap"])
def test_device_and_oversized_reads_are_refused_in_time(runner, indexed, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("CBR_MAX_FILE_MB", "2048")  # the --max-file-mb run changes it: monkeypatch restores it
    image, extra, needle = {
        "dev_zero": ("/dev/zero", [], "not a regular file"),
        "huge": (make_huge(tmp_path), [], "file too large"),
        "small_cap": (tmp_path / "x.png", ["--max-file-mb", "0.001"], "file too large"),
    }[kind]
    if kind == "small_cap":
        Image.new("RGB", (64, 64), "gray").save(image)
        image.write_bytes(image.read_bytes() + os.urandom(4096))
    before = _count(indexed, Query.id)
    with within(60):
        result = invoke(runner, *extra, "query", image, "--db", indexed, "--out", tmp_path)
    line = assert_one_line_error(result, needle)
    if kind == "huge":
        assert f"{HUGE_BYTES} bytes exceeds the limit of {HUGE_BYTES - 1} bytes" in line and "--max-file-mb" in line
    assert _count(indexed, Query.id) == before


def test_fifo_swapped_in_for_a_case_hangs_neither_query_nor_report(runner, cb_copy, tmp_path):
    db, manifest = cb_copy
    images = _images(manifest)
    first = _query_json(runner, db, images[0], tmp_path / "a", "-k", 3, "--explain", "none")
    victim = Path(first["neighbours"][0]["path"])
    saved = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    try:
        with within(120):
            answer = _query_json(runner, db, images[0], tmp_path / "b", "-k", 3)
            report = invoke(runner, "report", answer["query_id"], "--db", db, "--out", tmp_path / "r.html")
    finally:
        victim.unlink()
        victim.write_bytes(saved)
    status = {n["case_id"]: n["image_status"] for n in answer["neighbours"]}
    assert status[first["neighbours"][0]["case_id"]] == "image changed or missing since indexing"
    assert report.exit_code == 0, report.output


def test_feedback_retain_with_a_fifo_image_records_nothing(runner, cb_copy, tmp_path):
    db, manifest = cb_copy
    qid = _query_json(runner, db, _images(manifest)[0], tmp_path, "--explain", "none")["query_id"]
    fifo = make_fifo(tmp_path)
    with within(60):
        result = invoke(runner, "feedback", qid, "--db", db, "--label", "tumour", "--retain", "--image", fifo)
    assert_one_line_error(result, "not a regular file", "nothing was recorded")
    assert _count(db, Feedback.id) == 0


# -- 3. an indexed image changed on disk -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("change", ["swapped", "deleted"])
def test_a_changed_neighbour_is_flagged_and_never_mapped(runner, cb_copy, tmp_path, change):
    db, manifest = cb_copy
    image = _images(manifest)[0]
    before = _query_json(runner, db, image, tmp_path / "a", "-k", 3, "--explain", "none")
    victim_id, victim = before["neighbours"][0]["case_id"], Path(before["neighbours"][0]["path"])
    saved = victim.read_bytes()
    try:
        if change == "swapped":
            Image.new("RGB", (48, 48), "white").save(victim)  # v1 showed this white image as the case
        else:
            victim.unlink()
        after = _query_json(runner, db, image, tmp_path / "b", "-k", 3)
        table = invoke(runner, "query", image, "--db", db, "-k", 3, "--out", tmp_path / "c")
    finally:
        victim.write_bytes(saved)
    status = {n["case_id"]: n["image_status"] for n in after["neighbours"]}
    assert status.pop(victim_id) == "image changed or missing since indexing"
    assert set(status.values()) == {"ok"}
    # The vote rests on the stored label and embedding: the same answer as before.
    assert after["prediction"]["label"] == before["prediction"]["label"]
    assert [(n["case_id"], n["similarity"]) for n in after["neighbours"]] == \
        [(n["case_id"], n["similarity"]) for n in before["neighbours"]]
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        maps = s.scalars(select(Explanation.case_id).where(Explanation.query_id == after["query_id"],
                                                           Explanation.role == "neighbour")).all()
    assert victim_id not in maps and maps  # the other neighbours have their similarity maps
    report = Path(after["report"]).read_text()
    assert "image changed or missing since indexing" in report
    assert table.exit_code == 0 and "[image changed or missing since indexing]" in table.output


# -- 4. formula injection in CSV exports -----------------------------------------------------


FORMULAS = ["=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


@pytest.mark.slow
def test_csv_export_neutralises_formula_cells(runner, cb_copy, tmp_path):
    db, manifest = cb_copy
    qid = _query_json(runner, db, _images(manifest)[0], tmp_path, "--explain", "none")["query_id"]
    for text in FORMULAS[:4]:
        r = invoke(runner, "feedback", qid, "--db", db, "--label", text, "--new-class", "--note", text, "--by", text)
        assert r.exit_code == 0, r.output
    cb = open_casebase(db, create=False)
    with cb.write() as s:  # labels never hold a tab or CR now; a case base from v1 may
        for text in FORMULAS[4:]:
            s.add(Feedback(query_id=qid, label=text, note=text, by=text))
    cb.close()
    out = tmp_path / "feedback.csv"
    assert invoke(runner, "export", "--what", "feedback", "--db", db, "--out", out).exit_code == 0
    with open(out, encoding="utf-8", newline="") as fh:  # newline="": a CR inside a cell stays one
        rows = list(csv.DictReader(fh))
    cells = [r[c] for r in rows for c in ("label", "note", "by")]
    assert len(cells) == 3 * len(FORMULAS)
    assert not [c for c in cells if c and c[0] in "=+-@\t\r"], cells
    assert "'=1+1" in cells and "'-2+3" in cells and "'@SUM(A1)" in cells and "'\t=1" in cells
    # JSON keeps the values as they are; numbers in CSV are never touched.
    js = json.loads(invoke(runner, "export", "--what", "feedback", "--db", db, "--format", "json").stdout)
    assert [f["label"] for f in js][:2] == ["=1+1", "+cmd|' /C calc'!A0"]
    queries = list(csv.DictReader(io.StringIO(invoke(runner, "export", "--what", "queries", "--db", db).stdout)))
    assert float(queries[0]["confidence"]) >= 0


# -- 6. crafted checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(create_embedder("tinycnn", weights="none", class_names=["a", "b"]), path)
    return path


CRAFTED = {
    "input_size_negative": (lambda c: c["config"].update(input_size=-5), "input_size = -5"),
    "input_size_zero": (lambda c: c["config"].update(input_size=0), "input_size = 0"),
    "input_size_text": (lambda c: c["config"].update(input_size="64"), "input_size = '64'"),
    "input_size_huge": (lambda c: c["config"].update(input_size=10**9), "input_size = 1000000000"),
    "std_zero": (lambda c: c["config"].update(std=[0, 0, 0]), "std = [0, 0, 0]"),
    "mean_nan": (lambda c: c["config"].update(mean=[float("nan"), 0, 0]), "mean = [nan, 0, 0]"),
    "config_list": (lambda c: c.update(config=[1, 2, 3]), "model config is a list, not a mapping"),
    "duplicate_classes": (lambda c: c["config"].update(class_names=["a", "a"]), "repeated: a"),
    "newline_class": (lambda c: c["config"].update(class_names=["a\nb", "c"]), "contains a newline"),
    "unknown_backbone": (lambda c: c["config"].update(backbone=["x"]), "is not known to this version"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_checkpoint_config_is_one_line(runner, checkpoint, phantom_set, tmp_path, kind):
    import torch

    from cbr.models.checkpoint import CheckpointError
    from cbr.models.embedder import load_checkpoint

    payload = torch.load(checkpoint, weights_only=True)
    alter, needle = CRAFTED[kind]
    alter(payload)
    bad = tmp_path / f"{kind}.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match=None) as e:
        load_checkpoint(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)
    result = invoke(runner, "index", phantom_set, "--db", tmp_path / "c.db", "--model", bad, "--workers", "0")
    assert_one_line_error(result, needle)
    assert not (tmp_path / "c.db.indexes").exists() or not any((tmp_path / "c.db.indexes").glob("*.faiss"))


# -- 10. file modes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(runner, cb_copy, tmp_path, umask, mode):
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder

    db, manifest = cb_copy
    old = os.umask(umask)
    try:
        answer = _query_json(runner, db, _images(manifest)[0], tmp_path / "out", "-k", 2)
        assert invoke(runner, "export", "--what", "cases", "--db", db, "--out", tmp_path / "c.csv").exit_code == 0
        save_checkpoint(create_embedder("tinycnn", weights="none"), tmp_path / "m.pt")
    finally:
        os.umask(old)
    for path in (Path(answer["report"]), Path(answer["explanation"]), tmp_path / "c.csv", tmp_path / "m.pt"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path
