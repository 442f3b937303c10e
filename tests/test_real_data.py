"""The readers on the real datasets in ../shared/data (skipped where that folder is absent)."""

from pathlib import Path

import pytest

from cbr.data.dataset import ManifestSpec, read_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "brain_mri_yesno").is_dir(), reason="../shared/data is not here")
def test_brain_mri_folders_and_their_duplicates():
    scan = read_dataset(DATA / "brain_mri_yesno")
    assert scan.labels == ["no", "yes"]
    dups = [p for p in scan.problems if p.reason.startswith("duplicate of")]
    # Exact copies inside the archive: kept once, so no image can sit on both sides of a split.
    assert len(dups) >= 1
    assert len(scan.records) + len(dups) <= 253
    assert len({r.sha256 for r in scan.records}) == len(scan.records)


@pytest.mark.skipif(not (DATA / "chest_xray_pneumonia").is_dir(), reason="../shared/data is not here")
def test_chest_xray_manifest_with_patient_groups():
    root = DATA / "chest_xray_pneumonia"
    scan = read_dataset(root / "manifest.csv", ManifestSpec(path_column="filename", label_column="class",
                        group_column="patient_key", images=[root / "NORMAL", root / "PNEUMONIA"]))
    assert scan.labels == ["NORMAL", "PNEUMONIA"]
    assert len(scan.records) >= 590
    groups = {r.group for r in scan.records}
    assert None not in groups and len(groups) < len(scan.records)  # several images per patient
