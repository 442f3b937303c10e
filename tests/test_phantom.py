"""cbr.data.phantom: deterministic, plausible, learnable synthetic MRI slices with masks."""

import csv
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cbr.errors import UnknownNameError
from cbr.data.phantom import CLASSES, make_phantoms, near_duplicate, phantom, sample_patient


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The default data set (30 patients x 3 slices at 128 px); its speed is benchmarks/bench_phantoms.py."""
    out = tmp_path_factory.mktemp("phantoms")
    manifest = make_phantoms(out)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return out, manifest, rows


def _load(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_manifest_columns_and_layout(default_set):
    out, manifest, rows = default_set
    assert manifest == out / "manifest.csv"
    assert list(rows[0]) == ["path", "label", "patient_id", "mask", "slice"]
    assert len(rows) == 90
    for row in rows:
        stem = f"{row['patient_id']}_s{row['slice']}.png"
        assert row["path"] == f"images/{stem}" and row["mask"] == f"masks/{stem}"
        img = Image.open(out / row["path"])
        assert img.mode == "L" and img.size == (128, 128)


def test_class_balance_and_patient_slices(default_set):
    rows = default_set[2]
    patients = {r["patient_id"]: r["label"] for r in rows}
    assert Counter(patients.values()) == {c: 10 for c in CLASSES}
    assert Counter(r["patient_id"] for r in rows) == {p: 3 for p in patients}
    # Round-robin: neighbouring patients have different classes.
    assert [patients[p] for p in sorted(patients)][:3] == list(CLASSES)


def test_masks_match_classes(default_set):
    out, _, rows = default_set
    for row in rows:
        mask = _load(out / row["mask"])
        assert set(np.unique(mask)) <= {0, 255}
        if row["label"] == "normal":
            assert not mask.any()
        else:
            area = (mask > 0).mean()
            assert 0.005 < area < 0.15, (row, area)
            # Inside the image, away from the border (the lesion is inside the brain).
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_slices_share_the_lesion(default_set):
    out, _, rows = default_set
    by_patient = {}
    for row in rows:
        if row["label"] != "normal":
            ys, xs = np.nonzero(_load(out / row["mask"]))
            by_patient.setdefault(row["patient_id"], []).append((ys.mean(), xs.mean()))
    for centres in by_patient.values():
        spread = np.ptp(np.array(centres), axis=0).max()
        assert spread < 0.1 * 128  # neighbouring slices: the lesion barely moves


def test_deterministic_by_seed(tmp_path):
    a = make_phantoms(tmp_path / "a", patients=4, slices=2, size=48, seed=7).parent
    b = make_phantoms(tmp_path / "b", patients=4, slices=2, size=48, seed=7).parent
    c = make_phantoms(tmp_path / "c", patients=4, slices=2, size=48, seed=8).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 * 2 * 2 + 1
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images/P000_s0.png").read_bytes() != (c / "images/P000_s0.png").read_bytes()


def test_classes_subset_and_unknown_class(tmp_path):
    manifest = make_phantoms(tmp_path, patients=4, slices=1, size=32, classes=("normal", "cyst"))
    with open(manifest, newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["normal", "cyst", "normal", "cyst"]
    with pytest.raises(UnknownNameError, match="choose from cyst, normal, tumour"):
        make_phantoms(tmp_path, patients=1, classes=("glioma",))
    with pytest.raises(UnknownNameError):
        phantom(np.random.default_rng(0), "glioma")


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("label", CLASSES)
def test_phantom_shapes_and_lesion_contrast(label, size):
    for seed in range(4):
        img, mask = phantom(np.random.default_rng(seed), label, size)
        assert img.mode == "L" and img.size == (size, size)
        assert mask.dtype == bool and mask.shape == (size, size)
        a = np.asarray(img).astype(float)
        if label == "normal":
            assert not mask.any()
            continue
        assert mask.any()
        # Compare the lesion with the brain around it (a ring just outside the mask).
        ys, xs = np.nonzero(mask)
        cy, cx, r = ys.mean(), xs.mean(), np.sqrt(mask.sum() / np.pi)
        yy, xx = np.mgrid[:size, :size]
        d = np.hypot(yy - cy, xx - cx)
        ring = (d > 1.9 * r) & (d < 1.9 * r + max(3, size / 16)) & ~mask
        inside = a[mask].mean()
        if label == "tumour":
            assert inside > a[ring].mean() + 40  # bright enhancing lesion
        else:
            assert inside < a[ring].mean() - 40  # dark cyst


def test_patient_params_reproduce_the_anatomy():
    params = sample_patient(np.random.default_rng(1))
    a, mask_a = phantom(np.random.default_rng(2), "cyst", 64, patient_params=params)
    b, mask_b = phantom(np.random.default_rng(3), "cyst", 64, patient_params=params)
    np.testing.assert_array_equal(mask_a, mask_b)  # same lesion
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float))
    assert 0 < diff.mean() < 20  # same head, different noise


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_near_duplicate(mode):
    img = phantom(np.random.default_rng(0), "tumour", 64)[0].convert(mode)
    dup = near_duplicate(img, seed=1)
    assert dup.mode == img.mode and dup.size == img.size
    assert _png(dup) != _png(img)
    diff = np.abs(np.asarray(dup, int) - np.asarray(img, int))
    assert diff.max() <= 2 and diff.mean() < 1.5
    assert _png(near_duplicate(img, seed=1)) == _png(dup)
    assert _png(near_duplicate(img, seed=2)) != _png(dup)


def test_near_duplicate_of_a_flat_image_still_differs():
    img = Image.new("L", (1, 1), 255)
    assert near_duplicate(img).tobytes() != img.tobytes()
