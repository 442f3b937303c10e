"""NIfTI volumes: slicing along an axis, slice rules, orientation, windows, 4D, groups, end to end."""

import json

import numpy as np
import pytest

from cbr.data.dataset import ManifestSpec, read_dataset
from cbr.data.sources import Source, SourceSpec, read_source
from cbr.errors import ImageError

from conftest import TINY, invoke

nib = pytest.importorskip("nibabel")


def make_volume(path, data, affine=None, cal=None):
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _volume(shape=(20, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(100, 30, shape).astype(np.float32)


@pytest.mark.parametrize("axis, count", [("axial", 16), ("coronal", 24), ("sagittal", 20)])
def test_every_slice_along_the_axis_is_a_case(tmp_path, axis, count):
    make_volume(tmp_path / "data" / "tumour" / "p1.nii.gz", _volume())
    scan = read_dataset(tmp_path / "data", sources=SourceSpec(axis=axis))
    assert len(scan.records) == count and not scan.problems
    r = scan.records[3]
    assert r.path.endswith(f"p1.nii.gz#axis={axis}&slice=3")
    assert r.metadata == {"format": "nifti", "volume_file": "p1", "axis": axis, "slices": count, "slice": 3}
    assert r.group == "tumour/p1.nii.gz"  # the volume is the patient
    assert len({x.sha256 for x in scan.records}) == count
    img, sha, src = read_source(r.path)
    assert sha == r.sha256 and src == Source.parse(r.path)


@pytest.mark.parametrize("rule, slices", [("middle", [8]), ("every:5", [0, 5, 10, 15]), ("every:100", [0])])
def test_slice_rules(tmp_path, rule, slices):
    make_volume(tmp_path / "data" / "a" / "v.nii", _volume())
    scan = read_dataset(tmp_path / "data", sources=SourceSpec(slices=rule))
    assert [r.metadata["slice"] for r in scan.records] == slices


@pytest.mark.parametrize("rule", ["every:0", "some", "every:x"])
def test_bad_slice_rule(rule):
    with pytest.raises(Exception, match="--slices"):
        SourceSpec(slices=rule)


def test_orientation_does_not_depend_on_storage_order(tmp_path):
    ras = _volume()
    # the same anatomy stored left-right and front-back flipped (LPS), described by its affine
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [19, 23, 0]
    a = make_volume(tmp_path / "ras.nii", ras)
    b = make_volume(tmp_path / "lps.nii", ras[::-1, ::-1, :], lps_affine)
    for axis in ("axial", "coronal", "sagittal"):
        pa = np.asarray(read_source(f"{a}#axis={axis}&slice=5")[0])
        pb = np.asarray(read_source(f"{b}#axis={axis}&slice=5")[0])
        assert np.array_equal(pa, pb), axis


def test_axial_slice_is_upright(tmp_path):
    v = np.zeros((10, 12, 4), np.float32)
    v[:, -1, :] = 1.0  # the most anterior row (RAS: y grows to the front)
    img = np.asarray(read_source(f"{make_volume(tmp_path / 'v.nii', v)}#axis=axial&slice=0")[0])[..., 0]
    assert img.shape == (12, 10) and img[0].min() == 255 and img[1:].max() == 0  # anterior at the top


def test_windows(tmp_path):
    v = np.zeros((10, 10, 3), np.float32)
    v[..., 1] = np.linspace(-200, 200, 100).reshape(10, 10)
    v[0, 0, 0] = 1000  # the volume's maximum, in another slice
    path = make_volume(tmp_path / "ct.nii.gz", v)
    plane = np.rot90(v[..., 1])
    mm = np.asarray(read_source(f"{path}#axis=axial&slice=1")[0])[..., 0]
    expected = np.rint((plane + 200) * 255 / 1200).astype(np.uint8)  # the volume's min..max: -200..1000
    assert np.array_equal(mm, expected)
    from cbr.data.windows import apply_window

    win = np.asarray(read_source(f"{path}#axis=axial&slice=1", window="ct-brain")[0])[..., 0]
    assert np.array_equal(win, apply_window(plane, 40, 80))
    cal = make_volume(tmp_path / "cal.nii.gz", v, cal=(-100, 100))
    auto = np.asarray(read_source(f"{cal}#axis=axial&slice=1")[0])[..., 0]
    assert np.array_equal(auto, np.clip(np.rint((plane + 100) * 255 / 200), 0, 255).astype(np.uint8))


def test_4d_takes_the_first_volume_or_the_chosen_one():
    from nibabel.testing import data_path

    path = f"{data_path}/example4d.nii.gz"
    first = read_source(path)
    second = read_source(path, volume=1)
    assert first[2].volume == 0 and second[2].volume == 1 and first[1] != second[1]
    with pytest.raises(ImageError, match="volume 9 does not exist"):
        read_source(f"{path}#volume=9&axis=axial&slice=0")


def test_4d_volume_choice_in_a_dataset(tmp_path):
    import shutil

    from nibabel.testing import data_path

    (tmp_path / "d" / "x").mkdir(parents=True)
    shutil.copy(f"{data_path}/example4d.nii.gz", tmp_path / "d" / "x" / "f.nii.gz")
    scan = read_dataset(tmp_path / "d", sources=SourceSpec(volume=1, slices="middle"))
    (r,) = scan.records
    assert r.path.endswith("#volume=1&axis=axial&slice=12") and r.metadata["volumes"] == 2  # (128, 96, 24, 2)
    bad = read_dataset(tmp_path / "d", sources=SourceSpec(volume=5))
    assert not bad.records and "volume 5 does not exist" in bad.problems[0].reason


def test_nibabel_example_and_bad_volumes(tmp_path):
    import shutil

    from nibabel.testing import data_path

    (tmp_path / "d" / "x").mkdir(parents=True)
    shutil.copy(f"{data_path}/anatomical.nii", tmp_path / "d" / "x" / "anat.nii")
    (tmp_path / "d" / "x" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / "d" / "x" / "text.nii").write_text("not a volume at all" * 30)
    scan = read_dataset(tmp_path / "d", sources=SourceSpec(slices="middle"))
    assert [r.metadata["volume_file"] for r in scan.records] == ["anat"]
    reasons = {p.path.rsplit("/", 1)[1]: p.reason for p in scan.problems}
    assert reasons == {"broken.nii.gz": "truncated or corrupt gzip data",
                       "text.nii": "not a NIfTI-1 or NIfTI-2 volume (bad header)"}


def test_manifest_gives_the_patient(tmp_path):
    make_volume(tmp_path / "v1.nii", _volume(seed=1))
    (tmp_path / "m.csv").write_text("path,label,patient_id\nv1.nii,glioma,P9\n")
    scan = read_dataset(tmp_path / "m.csv", ManifestSpec(), sources=SourceSpec(slices="middle"))
    assert [(r.group, r.label) for r in scan.records] == [("P9", "glioma")]


@pytest.mark.slow
def test_cli_index_and_query_a_volume(tmp_path, runner):
    for label, base in (("normal", 50.0), ("tumour", 150.0)):
        for p in range(2):
            v = _volume(seed=p + (10 if label == "tumour" else 0))
            v += base
            make_volume(tmp_path / "data" / label / f"{label}{p}.nii.gz", v)
    query = make_volume(tmp_path / "q.nii.gz", _volume(seed=99) + 150.0)
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0", "--slices", "every:4")
    assert r.exit_code == 0, r.output
    assert "cases added:   16" in r.output
    rj = invoke(runner, "query", f"{query}#axis=axial&slice=4", "--db", db, "-k", "3", "--json",
                "--out", tmp_path / "reports")
    assert rj.exit_code == 0, rj.output
    answer = json.loads(rj.output.splitlines()[-1])
    assert answer["image"].endswith("q.nii.gz#axis=axial&slice=4")
    top = answer["neighbours"][0]
    assert top["metadata"]["format"] == "nifti" and "#axis=axial&slice=" in top["path"]
    report = open(answer["report"]).read()
    assert "axial slice" in report and "of 16" in report  # "volume tumour1, axial slice 8 of 16"
    whole = invoke(runner, "query", query, "--db", db, "-k", "1", "--explain", "none", "--out", tmp_path / "r2")
    assert whole.exit_code == 0, whole.output
    assert "q.nii.gz#axis=axial&slice=8" in whole.output  # a whole volume: its middle slice
