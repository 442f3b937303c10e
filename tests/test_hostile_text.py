"""Random text at every label, patient-id and note entry point (issue 12): each is refused with
one line or stored, and whatever is stored survives the query, report and export paths."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from sqlalchemy import select
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbr.data.records import Candidate
from cbr.data.text import TextError, check_candidates, for_terminal
from cbr.errors import CbrError
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case
from conftest import TINY, invoke
from test_hostile_inputs import _images
from test_reliability_corruption import assert_one_line_error

# Any code point (surrogates included: a library caller can pass them), biased toward the hostile ones.
_HOSTILE = st.sampled_from(["\n", "\r", "\t", "\x1b", "\x07", "\x00", "\x7f", "\x85", "\u2028", "\u202e", "\ud800",
                            "=", "+", "-", "@", "<", ">", "&", '"', "'", "e\u0301", "\U0001f600", " "])
TEXT = st.lists(st.one_of(st.characters(), _HOSTILE), max_size=40).map("".join)


@pytest.fixture(scope="module")
def world(tmp_path_factory, _indexed_template, query_set):
    """A private case base with one recorded query, an open CaseBase and a warm Searcher."""
    from click.testing import CliRunner

    from cbr.pipeline.query import Searcher

    root = tmp_path_factory.mktemp("text")
    for item in _indexed_template.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, root / item.name)
    db = root / "cases.db"
    image = _images(query_set)[0]
    out = root / "reports"
    result = invoke(CliRunner(), "query", image, "--db", db, "--json", "--explain", "none", "--out", out, "-k", 3)
    assert result.exit_code == 0, result.output
    cb = open_casebase(db, create=False)
    searcher = Searcher(cb, k=3, explain="none", out_dir=str(out))
    return cb, searcher, image, json.loads(result.stdout), root


def _one_line(e: Exception) -> None:
    text = str(e)
    assert text and "\n" not in for_terminal(text) and "\x1b" not in for_terminal(text)


def _survives(cb, qid, root) -> None:
    """The report and both exports of what is stored."""
    from cbr.pipeline.audit.export import export
    from cbr.pipeline.audit.trail import rerender_report

    html = rerender_report(cb, qid, root / "r.html")
    assert "<script" not in open(html, encoding="utf-8").read()
    for what in ("feedback", "cases", "queries"):
        export(cb, what, "json", root / f"{what}.json")
        json.loads((root / f"{what}.json").read_text(encoding="utf-8"))
        export(cb, what, "csv", root / f"{what}.csv")
        with open(root / f"{what}.csv", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            assert not [v for v in row.values() if v and v[0] in "=+-@\t\r"], row


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=TEXT, note=st.one_of(st.none(), TEXT), by=st.one_of(st.none(), TEXT))
def test_feedback_text_is_refused_in_one_line_or_survives_every_path(world, label, note, by):
    from cbr.pipeline.audit.feedback import add_feedback

    cb, _, _, answer, root = world
    try:
        add_feedback(cb, answer["query_id"], label, note=note, by=by)
    except CbrError as e:
        _one_line(e)
        return
    _survives(cb, answer["query_id"], root)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=TEXT, patient=st.one_of(st.none(), TEXT))
def test_case_labels_and_patients_are_refused_with_their_row_or_survive_query_and_report(world, label, patient):
    cb, searcher, image, answer, root = world
    kept, problems = check_candidates([Candidate("/x.png", label, patient, {}, 7, 0)])
    if problems:
        assert problems[0].reason.startswith("row 7: ") and "\n" not in for_terminal(problems[0].reason)
        return
    if not kept[0].label:
        return  # the manifest reader reports a blank label itself
    case_id = answer["neighbours"][0]["case_id"]
    with cb.write() as s:  # stored as `cbr index` would store it
        s.get(Case, case_id).label = kept[0].label
    try:
        got = searcher.query(image, patient=patient)
    except TextError as e:
        _one_line(e)
        return
    assert got.report and any(n["label"] == kept[0].label for n in got.neighbours)
    _survives(cb, got.query_id, root)


# -- issue 24, item 11: labels that render alike ----------------------------------------------


def _manifest(folder, query_set, labels):
    """A manifest of the query phantoms (new to the case base) with these labels, one image each."""
    from pathlib import Path

    folder.mkdir()
    images = sorted((Path(query_set).parent / "images").glob("*.png"))
    rows = ["path,label,patient_id"] + [f"{img},{label},Q{i}" for i, (img, label) in enumerate(zip(images, labels))]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "manifest.csv"


def _labels(db):
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return set(s.scalars(select(Case.label).distinct()))
    finally:
        cb.close()


@pytest.mark.slow
@pytest.mark.parametrize("invisible", ["\u200b", "\u200d", "\u00ad", "\u2060", "\ufeff", "\u034f", "\ufe0f",
                                       "\U000e0041"])
def test_labels_with_invisible_code_points_are_refused(runner, indexed, query_set, tmp_path, invisible):
    manifest = _manifest(tmp_path / "m", query_set, ["tumour" + invisible, "tu" + invisible + "mour", "tumour"])
    result = invoke(runner, "index", manifest, "--db", indexed, *TINY, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == 1 and len(report["problems"]) == 2, report
    assert all(f"U+{ord(invisible):04X}" in p["reason"] for p in report["problems"]), report["problems"]
    assert _labels(indexed) == {"normal", "cyst", "tumour"}
    line = assert_one_line_error(invoke(runner, "feedback", "1", "--label", "cyst" + invisible, "--db", indexed))
    assert f"U+{ord(invisible):04X}" in line


def test_a_mixed_script_label_confusable_with_a_class_is_warned(runner, indexed, query_set, tmp_path):
    cyrillic = "tum\u043eur"  # Cyrillic о: renders as "tumour"
    manifest = _manifest(tmp_path / "m", query_set, [cyrillic, "\u043e\u043f\u0443\u0445\u043e\u043b\u044c"])
    result = invoke(runner, "index", manifest, "--db", indexed, *TINY, "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    notes = [n for n in json.loads(result.stdout)["notes"] if "confusable" in n]
    # Only the mixed-script look-alike is warned about; a label wholly in another script is not.
    assert len(notes) == 1 and "'tumour'" in notes[0] and "U+043E" in notes[0], notes
    result = invoke(runner, "query", _images(query_set)[0], "--db", indexed, "--explain", "none", "--out",
                    tmp_path / "q")
    assert result.exit_code == 0, result.output
    refused = invoke(runner, "feedback", "1", "--label", "cy\u0455t", "--db", indexed)  # Cyrillic ѕ
    assert refused.exit_code == 1 and "confusable" in refused.output and "--new-class" in refused.output
    said = invoke(runner, "feedback", "1", "--label", "cy\u0455t", "--new-class", "--db", indexed)
    assert said.exit_code == 0 and "confusable" in said.output and "'cyst'" in said.output, said.output
