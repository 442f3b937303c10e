"""Hostile inputs, round two, items 7 and 8 (issue 24): pseudonymisation leaks and PHI outside the
DICOM allow-list. Every entry point turns a patient id into its stored form with the same key; a
pseudonymised case base refuses a query without its key; file names, burned-in text and
allow-listed attributes that break their value representation never reach what is stored or shown."""

import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import TINY, invoke

pydicom = pytest.importorskip("pydicom")

from test_dicom import make_dicom  # noqa: E402 - after the importorskip

KEY = "k3y-for-phi-tests"
ONE_LINE = "Error: "


def _dataset(root, *, names=None, burned=()):
    """2 classes x 3 patients x 2 files; ``names`` maps (label, patient, slice) to a file name."""
    rng = np.random.default_rng(0)
    for label, base in (("normal", -800), ("nodule", 200)):
        for p in range(3):
            for s in range(2):
                px = (rng.normal(base, 60, (24, 24))).astype(np.int16)
                px[8:16, 8:16] += 300 if label == "nodule" else 0
                name = (names or {}).get((label, p, s), f"IM{p}{s}")
                path = make_dicom(root / label / name, px, patient_id=f"{label[:3].upper()}{p}", intercept=-1024.0,
                                  window=(40, 400))
                if (label, p, s) in burned:
                    ds = pydicom.dcmread(path)
                    ds.BurnedInAnnotation = "YES"
                    ds.save_as(path)
    return root


@pytest.fixture(scope="module")
def pseudonymised(tmp_path_factory):
    """A DICOM case base indexed with --pseudonymise KEY: (folder, data, db)."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("phi")
    data = _dataset(root / "data")
    r = invoke(CliRunner(), "index", data, "--db", root / "cases.db", *TINY, "--workers", "0", "--explain", "none",
               "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def casebase(pseudonymised, tmp_path):
    """A fresh copy of the pseudonymised case base; returns (db, data folder)."""
    for item in pseudonymised.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    return tmp_path / "cases.db", tmp_path / "data"


def _twin(data, tmp_path, patient_id, name="twin.dcm", of="IM00"):
    """A new file of patient ``patient_id`` with the pixels of one of NOD0's cases (another sha256)."""
    ds = pydicom.dcmread(data / "nodule" / of)
    return make_dicom(tmp_path / name, ds.pixel_array.astype(np.int16), patient_id=patient_id, intercept=-1024.0,
                      window=(40, 400))


def _png_twin(data, tmp_path):
    from cbr.data.sources import read_source

    path = tmp_path / "twin.png"
    read_source(str(data / "nodule" / "IM00"))[0].save(path)
    return path


def _export(runner, db, what):
    r = invoke(runner, "export", "--what", what, "--db", db, "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


EVERY = ("--explain", "none", "-k", "12")  # all 12 cases, unless a patient's are left out


# -- item 7: one stored form for every patient id ---------------------------------------------


def test_query_patient_is_pseudonymised_before_it_is_used_or_stored(casebase, tmp_path, runner):
    from cbr.data.identity import pseudonym

    db, data = casebase
    png = _png_twin(data, tmp_path)
    r = invoke(runner, "query", png, "--db", db, *EVERY, "--out", tmp_path / "o", "--json", "--patient", "NOD0",
               "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    answer = json.loads(r.output.splitlines()[-1])
    nod0 = pseudonym(KEY, "NOD0")
    assert len(answer["neighbours"]) == 10 and nod0 not in {n["patient_id"] for n in answer["neighbours"]}
    assert answer["patient_id"] == nod0 if "patient_id" in answer else True
    assert _export(runner, db, "queries")[-1]["patient_id"] == nod0
    assert b"NOD0" not in db.read_bytes()


@pytest.mark.slow
def test_pseudonymised_case_base_refuses_a_query_without_its_key(casebase, tmp_path, runner, monkeypatch):
    db, data = casebase
    monkeypatch.delenv("CBR_PSEUDONYMISE_KEY", raising=False)
    png = _png_twin(data, tmp_path)
    for extra in ((), ("--patient", "NOD0"), ("--no-record",)):
        r = invoke(runner, "query", png, "--db", db, *EVERY, "--out", tmp_path / "o", *extra)
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert "\n" not in line and line.startswith(ONE_LINE)
        assert "--pseudonymise" in line and "CBR_PSEUDONYMISE_KEY" in line and "pseudonymised" in line
    wrong = invoke(runner, "query", png, "--db", db, *EVERY, "--out", tmp_path / "o", "--pseudonymise", "not-the-key")
    assert wrong.exit_code == 1 and "\n" not in wrong.output.strip()
    assert "wrong key" in wrong.output and "--pseudonymise" in wrong.output and "CBR_PSEUDONYMISE_KEY" in wrong.output
    assert _export(runner, db, "queries") == []  # nothing was recorded
    monkeypatch.setenv("CBR_PSEUDONYMISE_KEY", KEY)
    ok = invoke(runner, "query", png, "--db", db, *EVERY, "--out", tmp_path / "o")
    assert ok.exit_code == 0, ok.output


def test_the_case_base_records_a_key_id_never_the_key(casebase, runner):
    from cbr.data.identity import key_id
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Dataset

    db, _ = casebase
    with open_casebase(db, create=False).read() as s:
        options = [d.options for d in s.query(Dataset)]
    assert [o["sources"]["key_id"] for o in options] == [key_id(KEY)]
    assert key_id(KEY) != key_id("another") and KEY not in key_id(KEY)
    assert KEY.encode() not in db.read_bytes()


def test_index_with_another_key_or_none_is_refused(casebase, tmp_path, runner, monkeypatch):
    monkeypatch.delenv("CBR_PSEUDONYMISE_KEY", raising=False)
    db, _ = casebase
    more = _dataset(tmp_path / "more")
    for extra in ((), ("--pseudonymise", "other-key")):
        r = invoke(runner, "index", more, "--db", db, *TINY, "--workers", "0", "--explain", "none", *extra)
        assert r.exit_code == 1 and "\n" not in r.output.strip(), r.output
        assert "--pseudonymise" in r.output and "CBR_PSEUDONYMISE_KEY" in r.output


def test_dicom_query_patient_id_is_hashed_with_the_same_function(casebase, tmp_path, runner):
    from cbr.data.identity import pseudonym, stored_patient_id

    assert stored_patient_id(" NOD0 ", KEY) == pseudonym(KEY, "NOD0") and stored_patient_id("NOD0", None) == "NOD0"
    db, data = casebase
    twin = _twin(data, tmp_path, "NOD0")
    r = invoke(runner, "query", twin, "--db", db, *EVERY, "--out", tmp_path / "o", "--json", "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    answer = json.loads(r.output.splitlines()[-1])
    assert len(answer["neighbours"]) == 10
    assert _export(runner, db, "queries")[-1]["patient_id"] == pseudonym(KEY, "NOD0")


def _client(db, tmp_path, **settings):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    cb = open_casebase(db, create=False)
    app = create_app(cb, ServeSettings(data_dir=tmp_path / "serve", explain="none", k=12, **settings))
    return TestClient(app, base_url="http://127.0.0.1:8765")


def test_serve_uses_the_key_for_uploads_and_the_patient_field(casebase, tmp_path, runner):
    from cbr.data.identity import pseudonym
    from cbr.errors import CbrError

    db, data = casebase
    with pytest.raises(CbrError, match="--pseudonymise.*CBR_PSEUDONYMISE_KEY"):
        _client(db, tmp_path)
    with pytest.raises(CbrError, match="wrong key"):
        _client(db, tmp_path, pseudonymise="not-the-key")
    client = _client(db, tmp_path, pseudonymise=KEY)
    twin = _twin(data, tmp_path, "NOD0", name="Doe^John_19450317.dcm")
    with open(twin, "rb") as fh:
        r = client.post("/api/queries", files={"image": (twin.name, fh, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["neighbours"]) == 10 and pseudonym(KEY, "NOD0") not in {n["patient_id"] for n in body["neighbours"]}
    png = _png_twin(data, tmp_path)
    with open(png, "rb") as fh:
        r = client.post("/api/queries", files={"image": ("x.png", fh, "image/png")}, data={"patient": "NOD1"})
    assert r.status_code == 200, r.text
    rows = _export(runner, db, "queries")
    assert [q["patient_id"] for q in rows] == [pseudonym(KEY, "NOD0"), pseudonym(KEY, "NOD1")]
    shown = json.dumps(rows) + client.get(f"/api/queries/{rows[0]['id']}").text
    assert "Doe" not in shown and "19450317" not in shown
    assert b"NOD1" not in db.read_bytes() and b"Doe^John" not in db.read_bytes()


def test_serve_has_the_option_and_reads_the_environment(runner):
    r = invoke(runner, "serve", "--help")
    assert "--pseudonymise" in r.output and "CBR_PSEUDONYMISE_KEY" in r.output


# -- item 8: file names, burned-in text, attribute values -------------------------------------


@pytest.mark.slow
def test_pseudonymised_dicom_cases_show_a_neutral_locator_and_stay_readable(tmp_path, runner):
    import hashlib

    names = {("nodule", 0, 0): "Doe^John_19450317.dcm", ("normal", 1, 1): "Roe^Jane_19600101.dcm"}
    data = _dataset(tmp_path / "data", names=names)
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    cases = _export(runner, db, "cases")
    uid = str(pydicom.dcmread(data / "nodule" / "Doe^John_19450317.dcm").SOPInstanceUID)
    doe = next(c for c in cases if c["metadata"].get("SOPInstanceUID") == uid)
    assert doe["path"] == "dicom:" + hashlib.sha256(uid.encode()).hexdigest()[:24]
    # a DICOM query is shown under its neutral locator too, and still read again from its file
    smith = _twin(data, tmp_path, "QQ9", name="Smith^Ann_19700101.dcm", of="IM01")
    q = invoke(runner, "query", smith, "--db", db, "-k", "12", "--out", tmp_path / "o", "--pseudonymise", KEY)
    assert q.exit_code == 0, q.output
    (query,) = _export(runner, db, "queries")
    smith_uid = str(pydicom.dcmread(smith).SOPInstanceUID)
    assert query["image"] == "dicom:" + hashlib.sha256(smith_uid.encode()).hexdigest()[:24]
    again = invoke(runner, "report", query["id"], "--db", db, "--out", tmp_path / "again.html")
    assert again.exit_code == 0, again.output
    retained = invoke(runner, "feedback", query["id"], "--label", "nodule", "--retain", "--db", db)
    assert retained.exit_code == 0, retained.output
    assert _export(runner, db, "cases")[-1]["path"] == query["image"]
    client = _client(db, tmp_path, pseudonymise=KEY)
    page = client.get(f"/cases/{doe['id']}", headers={"accept": "text/html"})
    image = client.get(f"/api/cases/{doe['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"  # re-read from the file
    assert client.get(f"/api/queries/{query['id']}/image").status_code == 200
    report = "".join(p.read_text() for p in (tmp_path / "o").rglob("*.html")) + (tmp_path / "again.html").read_text()
    assert "image changed or missing" not in report and "unavailable" not in report  # every image re-read
    shown = [r.output, q.output, json.dumps(_export(runner, db, "cases")), json.dumps(_export(runner, db, "queries")),
             page.text, client.get(f"/api/cases/{doe['id']}").text, client.get(f"/api/queries/{query['id']}").text,
             invoke(runner, "history", "--db", db).output, invoke(runner, "show", query["id"], "--db", db).output,
             report, retained.output]
    for text in shown:
        for leak in ("Doe", "19450317", "Roe^Jane", "Smith", "19700101"):
            assert leak not in text


def test_without_a_key_dicom_cases_keep_their_paths(tmp_path, runner):
    data = _dataset(tmp_path / "data")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert r.exit_code == 0, r.output
    assert {c["path"] for c in _export(runner, db, "cases")} == {str(p) for p in data.rglob("IM*")}


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path, runner):
    data = _dataset(tmp_path / "data", burned={("nodule", 0, 0)})
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert r.exit_code == 0, r.output
    assert "cases added:   11" in r.output
    burned = data / "nodule" / "IM00"
    assert f"{burned}: burned-in annotation (BurnedInAnnotation=YES)" in r.output and "--allow-burned-in" in r.output
    q = invoke(runner, "query", burned, "--db", db, "--explain", "none", "--out", tmp_path / "o")
    assert q.exit_code == 1 and "\n" not in q.output.strip(), q.output
    assert "BurnedInAnnotation=YES" in q.output and "--allow-burned-in" in q.output
    ok = invoke(runner, "query", burned, "--db", db, "--explain", "none", "--out", tmp_path / "o", "--allow-burned-in")
    assert ok.exit_code == 0, ok.output
    again = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none", "--allow-burned-in")
    assert again.exit_code == 0 and "cases added:   1" in again.output, again.output


def test_serve_refuses_a_burned_in_upload(tmp_path, runner):
    data = _dataset(tmp_path / "data", burned={("nodule", 0, 0)})
    db = tmp_path / "cases.db"
    assert invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none").exit_code == 0
    client = _client(db, tmp_path)
    with open(data / "nodule" / "IM00", "rb") as fh:
        r = client.post("/api/queries", files={"image": ("IM00", fh, "application/dicom")})
    assert r.status_code == 422 and "BurnedInAnnotation=YES" in r.json()["detail"]


@pytest.mark.parametrize("attribute, value, kept", [
    ("BodyPartExamined", "CHEST", True),
    ("BodyPartExamined", "Chest of SMITH^JOHN", False),  # lower case, '^' and 19 characters: not a CS
    ("BodyPartExamined", "CHEST JOHN SMITH X", False),  # 18 characters: longer than a CS may be
    ("Modality", "CT", True),
    ("Modality", "ct", False),
    ("StudyInstanceUID", "1.2.826.0.1.3680043.2.1143.1", True),
    ("StudyInstanceUID", "1.2.SMITH.4", False),
    ("SeriesInstanceUID", "1.2." + "3" * 70, False),  # longer than 64
    ("SOPInstanceUID", "1.2.840.DOE^JOHN", False),
])
def test_allow_listed_values_must_fit_their_value_representation(tmp_path, attribute, value, kept):
    from cbr.data import dicom

    path = make_dicom(tmp_path / "a", np.zeros((16, 16), np.int16))
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():  # pydicom warns that the value breaks its VR: the point of the test
        warnings.simplefilter("ignore")
        setattr(ds, attribute, value)
    info = dicom.inspect_dicom(ds, "a")
    assert (info.metadata.get(attribute) == value) is kept
    if not kept:
        assert attribute not in info.metadata and value not in json.dumps(info.metadata)


@pytest.mark.parametrize("vr, good, bad", [
    ("CS", ["CHEST", "T1_MAP", "A B"], ["chest", "A-B", "X" * 17]),
    ("UI", ["1.2.3", "1.2.840.10008.1.2"], ["1.2.a", "", "1." + "2" * 64]),
    ("DA", ["19450317"], ["1945-03-17", "194503", "19451317"]),
    ("TM", ["1230", "123045.5", "12"], ["12:30", "2561"]),
    ("AS", ["045Y", "003M"], ["45Y", "045y", "045"]),
    ("DS", ["1.5", "-2e3", " 7 "], ["1,5", "abc", "1" * 17]),
    ("IS", ["42", "-7"], ["4.2", "x", "9999999999999"]),
    ("LO", ["Head first"], ["a\\b", "x" * 65, "bell\x07"]),
    ("SH", ["AXIAL T2"], ["x" * 17, "tab\there"]),
    ("PN", [], ["DOE^JOHN"]),  # a VR without a rule is never kept
])
def test_value_representation_rules(vr, good, bad):
    from cbr.data.dicom import fits_vr

    assert all(fits_vr(v, vr) for v in good), [v for v in good if not fits_vr(v, vr)]
    assert not any(fits_vr(v, vr) for v in bad), [v for v in bad if fits_vr(v, vr)]


def test_upgrade_from_0007_adds_the_case_file_locator_and_keeps_cases(tmp_path):
    from datetime import datetime, timezone

    from sqlalchemy import JSON, DateTime, Integer, String, column, insert, inspect, select, table

    from cbr.store.casebase import current, open_casebase, upgrade
    from cbr.store.schema import Case

    db = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(db, "0007")
    cb = open_casebase(db, migrate=False)
    with cb.engine.begin() as conn:
        assert "file_locator" not in {c["name"] for c in inspect(conn).get_columns("cases")}
        cases = table("cases", column("id", Integer), column("sha256", String), column("path", String),
                      column("label", String), column("metadata", JSON), column("origin", String),
                      column("added_at", DateTime(timezone=True)))
        conn.execute(insert(cases).values(sha256="a" * 64, path="/old/IM0001#frame=2", label="x", metadata={},
                                          origin="index", added_at=datetime(2026, 12, 1, tzinfo=timezone.utc)))
    cb.close()
    assert upgrade(db) == ("0007", current(db)["head"])
    with open_casebase(db).read() as s:
        case = s.scalar(select(Case))
        assert case.file_locator is None and case.readable_locator == "/old/IM0001#frame=2"


def test_a_nifti_volume_path_standing_for_its_patient_is_hashed_too(tmp_path):
    nib = pytest.importorskip("nibabel")
    from cbr.data.dataset import read_dataset
    from cbr.data.identity import pseudonym
    from cbr.data.sources import SourceSpec

    (tmp_path / "DATA" / "x").mkdir(parents=True)
    vol = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "DATA" / "x" / "Doe^John.nii.gz")
    scan = read_dataset(tmp_path / "DATA", sources=SourceSpec(pseudonymise=KEY, slices="middle"))
    assert {r.group for r in scan.records} == {pseudonym(KEY, "x/Doe^John.nii.gz")}
    plain = read_dataset(tmp_path / "DATA", sources=SourceSpec(slices="middle"))
    assert {r.group for r in plain.records} == {"x/Doe^John.nii.gz"}


def _leaks(runner, db, tmp_path, outputs, names):
    """Every text a user sees of the case base: exports, history, show, the reports written."""
    shown = [*outputs, json.dumps(_export(runner, db, "cases")), json.dumps(_export(runner, db, "queries")),
             invoke(runner, "history", "--db", db).output]
    shown += [p.read_text() for p in tmp_path.rglob("*.html")]
    return [n for n in names for text in shown if n in text]


@pytest.mark.slow
def test_pseudonymised_png_cases_and_queries_show_no_file_name(tmp_path, runner):
    """A class-folder image's name can hold a patient's name as a DICOM file's can; with a key
    it is shown under its content hash and still read again from its file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("normal", "nodule"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            px = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(px).save(tmp_path / "data" / label / f"Doe_John_19450317_{i}.png")
    query = tmp_path / "Smith_Ann_19700101.png"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(query)
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0", "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    assert all(c["path"].startswith("image:") for c in _export(runner, db, "cases"))
    q = invoke(runner, "query", query, "--db", db, "-k", "3", "--out", tmp_path / "o", "--pseudonymise", KEY)
    assert q.exit_code == 0, q.output
    (recorded,) = _export(runner, db, "queries")
    assert recorded["image"].startswith("image:")
    again = invoke(runner, "report", recorded["id"], "--db", db, "--out", tmp_path / "again.html")
    assert again.exit_code == 0, again.output
    report = (tmp_path / "again.html").read_text()
    assert "image changed or missing" not in report and "unavailable" not in report  # re-read from the files
    show = invoke(runner, "show", recorded["id"], "--db", db)
    assert _leaks(runner, db, tmp_path, [r.output, q.output, show.output, again.output],
                  ("Doe_John", "19450317", "Smith_Ann", "19700101")) == []


@pytest.mark.slow
def test_pseudonymised_nifti_slices_show_no_file_name(tmp_path, runner):
    from test_nifti import _volume, make_volume

    for label, base in (("normal", 50.0), ("tumour", 150.0)):
        for p in range(2):
            make_volume(tmp_path / "data" / label / f"Roe_Jane_19600101_{label}{p}.nii.gz", _volume(seed=p) + base)
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0", "--slices", "every:8",
               "--explain", "none", "--pseudonymise", KEY)
    assert r.exit_code == 0, r.output
    cases = _export(runner, db, "cases")
    assert cases and all(c["path"].startswith("nifti:") and "#axis=" in c["path"] for c in cases)
    assert _leaks(runner, db, tmp_path, [r.output], ("Roe_Jane", "19600101")) == []
