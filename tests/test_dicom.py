"""DICOM: finding files by content, pixels (modality LUT, windows, MONOCHROME1, colour, frames),
metadata and patient groups, bad files, and that no identifying attribute ever leaves the decoder."""

import json

import numpy as np
import pytest

from cbr.data.dataset import read_dataset
from cbr.data.sources import Source, SourceSpec, read_source
from cbr.data.windows import WINDOWS, apply_window, parse_window
from cbr.errors import ImageError, ModelMismatchError

from conftest import TINY, invoke

pydicom = pytest.importorskip("pydicom")

# Identifying attributes written into every generated file; none may appear in any output.
MARKER_NAME = "ZZLEAKMARKER^PATIENTNAME"
MARKER_BIRTH = "19010203"
MARKER_ADDRESS = "42 Leakmarker Street"
MARKERS = ("ZZLEAKMARKER", MARKER_BIRTH, "Leakmarker")


def make_dicom(path, pixels, *, patient_id="P001", modality="CT", slope=1.0, intercept=0.0,
               photometric="MONOCHROME2", window=None, sop_uid=None, series_uid="1.2.826.0.1.3680043.2.1143.7",
               transfer_syntax=None, body_part="CHEST"):
    """Write a DICOM Part 10 file (preamble + DICM) holding ``pixels``.

    ``pixels``: (H, W) int16/uint16 grey, (F, H, W) multi-frame grey, or (H, W, 3) uint8 RGB.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage if rgb else CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1143.1", series_uid
    ds.Modality, ds.BodyPartExamined = modality, body_part
    ds.PatientName, ds.PatientBirthDate, ds.PatientAddress = MARKER_NAME, MARKER_BIRTH, MARKER_ADDRESS
    ds.ReferringPhysicianName = "ZZLEAKMARKER^DOCTOR"
    if patient_id is not None:
        ds.PatientID = patient_id
    if rgb:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "RGB"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        data = pixels.astype(np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        signed = pixels.dtype.kind == "i"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, int(signed)
        data = pixels.astype(np.int16 if signed else np.uint16)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = data.shape[-3:-1] if rgb else data.shape[-2:]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = data.tobytes()
    if meta.TransferSyntaxUID.is_compressed:  # the bytes are not really compressed: never decoded
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([ds.PixelData])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(lo=-1000, hi=1000, size=16):
    return np.linspace(lo, hi, size * size).reshape(size, size).round().astype(np.int16)


# -- windows --------------------------------------------------------------------------------


def test_window_known_values():
    # DICOM's linear function, centre 40 width 80: 0 up to c - 0.5 - (w - 1) / 2 = 0, 255 from 79,
    # ((x - 39.5) / 79 + 0.5) * 255 between: 20 -> 64.6, 39.5 -> 127.5, 40 -> 129.1
    hu = np.array([-1000, -1, 0, 20, 39.5, 40, 79, 80, 3000])
    assert apply_window(hu, 40, 80).tolist() == [0, 0, 0, 65, 128, 129, 255, 255, 255]


@pytest.mark.parametrize("text, canonical", [(None, "auto"), ("CT-Lung", "ct-lung"), (" 40 , 80", "40,80"),
                                             ("40.0,80", "40,80"), ("minmax", "minmax")])
def test_window_names(text, canonical):
    assert parse_window(text) == canonical


@pytest.mark.parametrize("bad", ["lung", "40", "40,0", "a,b"])
def test_bad_window_lists_choices(bad):
    with pytest.raises(Exception, match="ct-lung|width"):
        parse_window(bad)


@pytest.mark.parametrize("preset", sorted(WINDOWS))
def test_ct_presets_applied_to_rescaled_values(tmp_path, preset):
    # stored values 0..2000 with intercept -1024: HU -1024..976
    stored = np.linspace(0, 2000, 256).reshape(16, 16).astype(np.int16)
    path = make_dicom(tmp_path / "ct", stored, intercept=-1024.0)
    img, _, _ = read_source(str(path), window=preset)
    c, w = WINDOWS[preset]
    expected = apply_window(stored.astype(float) - 1024.0, c, w)
    assert np.array_equal(np.asarray(img)[..., 0], expected)


@pytest.mark.parametrize("rle", [False, True])
def test_write_dicom_round_trips(tmp_path, rle):
    """cbr.data.dicom.write_dicom (the benchmarks' and test data's writer): pixels, rescale and tags survive."""
    from pydicom.uid import CTImageStorage, RLELossless

    from cbr.data.dicom import write_dicom

    stored = np.linspace(0, 4095, 256).reshape(16, 16).astype(np.uint16)
    path = tmp_path / "ct.dcm"
    write_dicom(path, stored, sop_class=CTImageStorage, transfer_syntax=RLELossless if rle else None, Modality="CT",
                BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024)
    ds = pydicom.dcmread(path)
    assert (ds.SOPClassUID, ds.Modality, ds.BitsAllocated, ds.BitsStored, ds.Rows) == (CTImageStorage, "CT", 16, 12, 16)
    assert ds.file_meta.TransferSyntaxUID == (RLELossless if rle else pydicom.uid.ExplicitVRLittleEndian)
    assert np.array_equal(ds.pixel_array, stored)
    img, _, _ = read_source(str(path), window="ct-lung")
    c, w = WINDOWS["ct-lung"]
    assert np.array_equal(np.asarray(img)[..., 0], apply_window(stored.astype(float) - 1024.0, c, w))


def test_file_window_by_default_and_explicit_override(tmp_path):
    hu = np.array([[-100, 0, 40, 80, 200] * 2] * 10, dtype=np.int16)
    path = make_dicom(tmp_path / "w", hu, window=(40, 80))
    auto = np.asarray(read_source(str(path))[0])[0, :5, 0]
    assert auto.tolist() == apply_window(hu[0, :5], 40, 80).tolist()
    wide = np.asarray(read_source(str(path), window="0,400")[0])[0, :5, 0]
    assert wide.tolist() == apply_window(hu[0, :5], 0, 400).tolist()
    mm = np.asarray(read_source(str(path), window="minmax")[0])[0, :5, 0]
    assert mm.tolist() == [0, 255 * 100 // 300, 119, 153, 255]


def test_monochrome1_is_inverted(tmp_path):
    px = _ramp(0, 1000).astype(np.uint16)
    m2 = np.asarray(read_source(str(make_dicom(tmp_path / "m2", px)), window="minmax")[0])
    m1 = np.asarray(read_source(str(make_dicom(tmp_path / "m1", px, photometric="MONOCHROME1")), window="minmax")[0])
    assert np.array_equal(m1, 255 - m2)


def test_rgb_and_ybr_colour():
    from pydicom import examples

    rgb = np.asarray(read_source(str(examples.get_path("rgb_color")))[0])
    assert rgb.shape == (240, 320, 3) and not np.array_equal(rgb[..., 0], rgb[..., 2])
    # the YBR JPEG example (30 frames): converted to RGB, the middle frame by default
    img, _, src = read_source(str(examples.get_path("ybr_color")))
    assert src.frame == 16 and np.asarray(img).shape == (240, 320, 3)


def test_generated_rgb_pixels_are_kept(tmp_path):
    px = np.zeros((12, 12, 3), np.uint8)
    px[..., 0], px[..., 1], px[..., 2] = 200, 30, 90
    img = np.asarray(read_source(str(make_dicom(tmp_path / "c", px)))[0])
    assert img[0, 0].tolist() == [200, 30, 90]


@pytest.mark.parametrize("name", ["ct", "mr", "jpeg2k", "palette_color", "overlay"])
def test_pydicom_examples_decode(name):
    from pydicom import examples

    img, sha, src = read_source(str(examples.get_path(name)))
    assert img.mode == "RGB" and min(img.size) >= 8 and len(sha) == 64 and src.frame is None


def test_compressed_transfer_syntaxes_decode():
    from pydicom.data import get_testdata_file

    ref = np.asarray(read_source(get_testdata_file("MR_small.dcm"))[0])
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(np.asarray(read_source(get_testdata_file(name))[0]), ref), name


# -- frames and identity --------------------------------------------------------------------


def test_every_frame_is_a_case_with_its_own_identity(tmp_path):
    frames = np.stack([np.full((10, 10), i * 100, np.int16) + np.arange(10, dtype=np.int16) for i in range(3)])
    make_dicom(tmp_path / "data" / "a" / "cine", frames)
    scan = read_dataset(tmp_path / "data")
    assert [r.metadata["frame"] for r in scan.records] == [1, 2, 3]
    assert len({r.sha256 for r in scan.records}) == 3
    for r in scan.records:
        img, sha, src = read_source(r.path)
        assert sha == r.sha256 and src.frame == r.metadata["frame"] and r.metadata["frames"] == 3
    middle = read_dataset(tmp_path / "data", sources=SourceSpec(frames="middle"))
    assert [r.metadata["frame"] for r in middle.records] == [2]
    # the query of the whole file decodes the middle frame, with the same identity
    assert read_source(str(tmp_path / "data" / "a" / "cine"))[1] == middle.records[0].sha256


def test_single_frame_identity_is_the_file_hash(tmp_path):
    import hashlib

    path = make_dicom(tmp_path / "x", _ramp())
    scan = read_dataset_of(tmp_path, {"a": [path]})
    assert scan.records[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == read_source(str(path))[1]


def read_dataset_of(tmp_path, classes, **kw):
    """Copy files into DATA/<label>/ and read it."""
    import shutil

    root = tmp_path / "DATA"
    for label, files in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, root / label / f.name)
    return read_dataset(root, **kw)


# -- metadata, groups, duplicates -----------------------------------------------------------


def test_metadata_and_patient_groups(tmp_path):
    a = make_dicom(tmp_path / "a", _ramp(), patient_id="PID-7")
    b = make_dicom(tmp_path / "b", _ramp(0, 500), patient_id=None)
    scan = read_dataset_of(tmp_path, {"nodule": [a], "normal": [b]})
    by = {r.label: r for r in scan.records}
    assert by["nodule"].group == "PID-7" and by["normal"].group is None
    assert set(by["nodule"].metadata) == {"format", "Modality", "BodyPartExamined", "StudyInstanceUID",
                                          "SeriesInstanceUID", "SOPInstanceUID"}
    assert by["nodule"].metadata["Modality"] == "CT"
    for marker in MARKERS:
        assert marker not in json.dumps([r.__dict__ for r in scan.records])


def test_pseudonymise_is_keyed_and_stable(tmp_path):
    a = make_dicom(tmp_path / "a", _ramp(), patient_id="PID-7")
    g1 = read_dataset_of(tmp_path, {"x": [a]}, sources=SourceSpec(pseudonymise="k1")).records[0].group
    g2 = read_dataset_of(tmp_path, {"x": [a]}, sources=SourceSpec(pseudonymise="k1")).records[0].group
    g3 = read_dataset_of(tmp_path, {"x": [a]}, sources=SourceSpec(pseudonymise="k2")).records[0].group
    assert g1 == g2 != g3 and "PID-7" not in g1 and len(g1) == 32
    assert "k1" not in repr(SourceSpec(pseudonymise="k1")) and "k1" not in json.dumps(SourceSpec(pseudonymise="k1").to_dict())


def test_same_sop_instance_twice_is_a_duplicate(tmp_path):
    a = make_dicom(tmp_path / "a", _ramp(), sop_uid="1.2.3.4.5")
    b = make_dicom(tmp_path / "b", _ramp(0, 900), sop_uid="1.2.3.4.5")  # other bytes, same instance
    scan = read_dataset_of(tmp_path, {"x": [a, b]})
    assert len(scan.records) == 1
    dup = [p for p in scan.problems if "SOPInstanceUID" in p.reason]
    assert len(dup) == 1 and dup[0].kind == "duplicate" and dup[0].path.endswith("/b")


# -- bad files ------------------------------------------------------------------------------


def test_bad_dicom_is_skipped_with_a_reason(tmp_path):
    from pydicom import examples
    from pydicom.data import get_testdata_file

    good = make_dicom(tmp_path / "good", _ramp())
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-100])
    mpeg = make_dicom(tmp_path / "mpeg", _ramp(), transfer_syntax="1.2.840.10008.1.2.4.100")
    files = [good, truncated, mpeg, examples.get_path("dicomdir"), examples.get_path("rt_plan"),
             __import__("pathlib").Path(get_testdata_file("test-SR.dcm")),
             __import__("pathlib").Path(get_testdata_file("meta_missing_tsyntax.dcm"))]
    scan = read_dataset_of(tmp_path, {"x": files})
    assert [r.path.rsplit("/", 1)[1] for r in scan.records] == ["good"]
    reasons = {p.path.rsplit("/", 1)[1]: p.reason for p in scan.problems}
    assert reasons["truncated"].startswith("truncated pixel data")
    assert "unsupported transfer syntax MPEG2 Main Profile / Main Level" in reasons["mpeg"]
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert reasons["rtplan.dcm"] == "no pixel data (RT Plan Storage); not an image"
    assert reasons["test-SR.dcm"] == "structured report (Comprehensive SR Storage), not an image"
    assert reasons["meta_missing_tsyntax.dcm"].startswith("missing transfer syntax")
    for marker in MARKERS:
        assert all(marker not in p.reason for p in scan.problems)


def test_missing_frame_is_named(tmp_path):
    path = make_dicom(tmp_path / "one", _ramp())
    with pytest.raises(ImageError, match="frame 3 does not exist"):
        read_source(Source(str(path), frame=3))


# -- end to end: no extensions, patient ids from tags, names nowhere ------------------------


def _dicom_dataset(root):
    rng = np.random.default_rng(0)
    for label, base in (("normal", -800), ("nodule", 200)):
        for p in range(3):
            for s in range(2):
                px = (rng.normal(base, 60, (24, 24))).astype(np.int16)
                px[8:16, 8:16] += 300 if label == "nodule" else 0
                (root / label).mkdir(parents=True, exist_ok=True)
                make_dicom(root / label / f"IM{p}{s}", px, patient_id=f"{label[:3].upper()}{p}", intercept=-1024.0,
                           window=(40, 400))
    return root


@pytest.mark.slow
def test_cli_index_and_query_extensionless_dicom_without_leaks(tmp_path, runner):
    data = _dicom_dataset(tmp_path / "data")
    query = make_dicom(tmp_path / "scan.dcm", (np.random.default_rng(5).normal(200, 60, (24, 24))).astype(np.int16),
                       patient_id="QQ1", intercept=-1024.0, window=(40, 400))
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "cases added:   12" in r.output
    rj = invoke(runner, "query", query, "--db", db, "-k", "3", "--out", tmp_path / "reports", "--json")
    assert rj.exit_code == 0, rj.output
    answer = json.loads(rj.output.splitlines()[-1])
    groups = {n["patient_id"] for n in answer["neighbours"]}
    assert groups <= {f"{a}{p}" for a in ("NOR", "NOD") for p in range(3)}  # PatientID tags
    assert answer["neighbours"][0]["metadata"]["Modality"] == "CT"
    rt = invoke(runner, "query", query, "--db", db, "-k", "3", "--out", tmp_path / "reports")
    assert rt.exit_code == 0, rt.output
    exported = invoke(runner, "export", "--what", "cases", "--db", db, "--format", "csv")
    outputs = [r.output, rj.output, rt.output, exported.output, db.read_bytes().decode("latin-1")]
    outputs += [p.read_bytes().decode("latin-1") for p in (tmp_path / "reports").rglob("*.html")]
    for text in outputs:
        for marker in MARKERS:
            assert marker not in text


def test_query_with_another_window_is_refused(tmp_path, runner):
    data = _dicom_dataset(tmp_path / "data")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--window", "ct-lung", "--explain", "none")
    assert r.exit_code == 0, r.output
    scan = next((data / "nodule").iterdir())
    bad = invoke(runner, "query", scan, "--db", db, "--window", "ct-bone", "--explain", "none", "--out", tmp_path / "o")
    assert bad.exit_code == 1
    assert "--window ct-bone: the case base's models decode DICOM/NIfTI with window ct-lung" in bad.output
    ok = invoke(runner, "query", scan, "--db", db, "--window", "CT-Lung", "--explain", "none", "--out", tmp_path / "o")
    assert ok.exit_code == 0, ok.output
    assert "similarity" in ok.output


def test_window_is_part_of_the_fingerprint():
    from cbr.models.embedder import create_embedder

    auto = create_embedder("tinycnn", weights="none", input_size=32)
    lung = create_embedder("tinycnn", weights="none", input_size=32, window="ct-lung")
    assert auto.fingerprint != lung.fingerprint and lung.config.window == "ct-lung"


def test_decode_query_refuses_a_mixed_window_for_dicom(tmp_path):
    from cbr.data.sources import decode_query

    path = make_dicom(tmp_path / "d", _ramp())
    with pytest.raises(ModelMismatchError, match="different windows"):
        decode_query(str(path), ["auto", "ct-lung"])


def test_cli_pseudonymise_stores_neither_the_id_nor_the_key(tmp_path, runner):
    from cbr.data.identity import pseudonym

    data = _dicom_dataset(tmp_path / "data")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none",
               "--pseudonymise", "s3cret-key-XYZ")
    assert r.exit_code == 0, r.output
    out = invoke(runner, "export", "--what", "cases", "--db", db, "--format", "json")
    groups = {c["group_id"] for c in json.loads(out.output)}
    assert groups == {pseudonym("s3cret-key-XYZ", f"{a}{p}") for a in ("NOR", "NOD") for p in range(3)}
    stored = db.read_bytes()
    assert b"s3cret-key-XYZ" not in stored and b"NOR0" not in stored and b"ZZLEAKMARKER" not in stored


def test_origin_is_described_for_people():
    from cbr.data.sources import describe_origin

    assert describe_origin({"format": "dicom", "Modality": "CT", "SeriesInstanceUID": "1.2.3", "frame": 12,
                            "frames": 30}) == "CT series 1.2.3, frame 12 of 30"
    assert describe_origin({"format": "dicom", "SeriesInstanceUID": "1.2.3"}) == "series 1.2.3"
    assert describe_origin({"format": "nifti", "volume_file": "sub-01", "axis": "axial", "slice": 40,
                            "slices": 155}) == "volume sub-01, axial slice 40 of 155"
    assert describe_origin({"format": "npz", "archive": "p.npz", "split": "test", "index": 7}) == "p.npz, test image 7"
    assert describe_origin({"age": "50"}) is None


@pytest.mark.parametrize("text, expected", [
    ("/d/scan.dcm", Source("/d/scan.dcm")),
    ("/d/cine#frame=12", Source("/d/cine", frame=12)),
    ("/d/v.nii.gz#volume=1&axis=coronal&slice=3", Source("/d/v.nii.gz", axis="coronal", slice=3, volume=1)),
    ("/d/m.npz#split=test&index=7", Source("/d/m.npz", split="test", index=7)),
    ("/d/scan#v2.png", Source("/d/scan#v2.png")),  # a '#' in a file name
    ("/d/a#note=x", Source("/d/a#note=x")),  # unknown keys: part of the name
])
def test_locators_round_trip(text, expected):
    src = Source.parse(text)
    assert src == expected and Source.parse(src.locator) == src


@pytest.mark.parametrize("bad", ["/d/c#frame=0", "/d/c#frame=x", "/d/v#axis=up&slice=1", "/d/m#split=test",
                                 "/d/x#frame=1&slice=2"])
def test_bad_locators_are_named(bad):
    from cbr.data.locator import SourceError

    with pytest.raises(SourceError):
        Source.parse(bad)
