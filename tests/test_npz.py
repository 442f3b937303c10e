"""MedMNIST-style .npz: splits, class names, array indices as case ids, duplicates, bad arrays,
and `cbr index` / `cbr query` end to end (small arrays written in MedMNIST's layout)."""

import json

import numpy as np
import pytest

from cbr.data.dataset import read_dataset
from cbr.data.sources import SourceSpec, read_source
from cbr.errors import DatasetError, ImageError

from conftest import TINY, invoke


def make_npz(path, n=(12, 4, 6), size=28, rgb=False, seed=0, labels_shape=1):
    """train/val/test images (N, size, size[, 3]) uint8 and labels (N, 1) in 2 classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = np.arange(count) % 2
        shape = (count, size, size, 3) if rgb else (count, size, size)
        images = rng.integers(0, 60, shape).astype(np.uint8)
        images[labels == 1, 8:20, 8:20] += 150  # class 1 has a bright square
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1) if labels_shape == 1 else labels
    np.savez_compressed(path, **arrays)
    return path


def test_split_and_class_names(tmp_path):
    path = make_npz(tmp_path / "pneumoniamnist.npz")
    scan = read_dataset(path, sources=SourceSpec(split="train", classes=("normal", "pneumonia")))
    assert scan.kind == "npz" and len(scan.records) == 12 and not scan.problems
    r = scan.records[3]
    assert r.path == f"{path}#split=train&index=3" and r.label == "pneumonia" and r.group is None
    assert r.metadata == {"format": "npz", "archive": "pneumoniamnist.npz", "split": "train", "index": 3}
    img, sha, _ = read_source(r.path)
    assert sha == r.sha256 and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 0], np.load(path)["train_images"][3])
    numbers = read_dataset(path, sources=SourceSpec(split="test"))
    assert numbers.labels == ["0", "1"] and len(numbers.records) == 6


def test_all_splits_and_rgb(tmp_path):
    path = make_npz(tmp_path / "derma.npz", rgb=True)
    scan = read_dataset(path, sources=SourceSpec(split="all"))
    assert len(scan.records) == 22 and {r.metadata["split"] for r in scan.records} == {"train", "val", "test"}
    img, _, _ = read_source(scan.records[0].path)
    assert np.asarray(img).shape == (28, 28, 3)


def test_same_image_in_two_splits_is_a_duplicate(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (3, 16, 16)).astype(np.uint8)
    test = a.copy()
    np.savez(tmp_path / "leak.npz", train_images=a, train_labels=np.array([[0], [1], [0]]),
             test_images=test, test_labels=np.array([[0], [0], [1]]))
    scan = read_dataset(tmp_path / "leak.npz", sources=SourceSpec(split="all"))
    # index 0: same label -> a duplicate; 1 and 2: different labels -> both copies dropped
    assert [r.path.rsplit("#", 1)[1] for r in scan.records] == ["split=test&index=0"]
    (dup,) = [p for p in scan.problems if p.kind == "duplicate"]
    assert dup.path.endswith("#split=train&index=0") and dup.reason == f"duplicate of {scan.records[0].path}"
    assert sum(p.reason.startswith("label conflict") for p in scan.problems) == 4 == len(scan.problems) - 1


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": np.zeros((2, 9, 9), np.uint8), "train_labels": np.zeros((2, 14), int)}, "multi-label"),
    ({"train_images": np.zeros((2, 9, 9, 9), np.uint8), "train_labels": np.zeros((2, 1), int)}, "3D volumes"),
    ({"train_images": np.zeros((2, 9, 9), np.uint8), "train_labels": np.zeros((3, 1), int)}, "2 train images but 3"),
    ({"train_images": np.zeros((2, 9, 9), np.uint8), "train_labels": np.array([[0], [5]])}, "labels go up to 5"),
    ({"val_images": np.zeros((2, 9, 9), np.uint8), "val_labels": np.zeros((2, 1), int)}, "no 'train_images'"),
])
def test_unusable_arrays_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path / "x.npz", sources=SourceSpec(classes=("a", "b")))


def test_not_an_archive_and_bad_index(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match="not a readable .npz archive"):
        read_dataset(tmp_path / "bad.npz")
    path = make_npz(tmp_path / "ok.npz")
    with pytest.raises(ImageError, match="index 99 does not exist"):
        read_source(f"{path}#split=test&index=99")
    with pytest.raises(ImageError, match="name the image inside the archive"):
        read_source(str(path))


def test_npz_inside_a_class_folder_is_explained(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    make_npz(tmp_path / "d" / "x" / "inner.npz")
    scan = read_dataset(tmp_path / "d")
    assert not scan.records and "indexed on its own" in scan.problems[0].reason


@pytest.mark.slow
def test_cli_index_and_query_npz(tmp_path, runner):
    path = make_npz(tmp_path / "pneumoniamnist.npz")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", path, "--db", db, *TINY, "--workers", "0", "--classes", "normal,pneumonia")
    assert r.exit_code == 0, r.output
    assert "cases added:   12" in r.output
    q = invoke(runner, "query", f"{path}#split=test&index=1", "--db", db, "-k", "3", "--json", "--out", tmp_path / "out")
    assert q.exit_code == 0, q.output
    answer = json.loads(q.output.splitlines()[-1])
    assert answer["image"].endswith("pneumoniamnist.npz#split=test&index=1")
    assert {n["label"] for n in answer["neighbours"]} <= {"normal", "pneumonia"}
    top = answer["neighbours"][0]
    assert top["path"].startswith(f"{path}#split=train&index=")
    report = open(answer["report"]).read()
    assert f"pneumoniamnist.npz, train image {top['metadata']['index']}" in report
    bad = invoke(runner, "index", path, "--db", db, *TINY, "--classes", "a,a")
    assert bad.exit_code == 2 and "--classes" in bad.output
