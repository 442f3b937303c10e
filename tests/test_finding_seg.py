"""Lesion masks given as DICOM SEG objects (the manifest's ``mask`` column naming a SEG file)."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, invoke

hd = pytest.importorskip("highdicom")


SERIES = "1.2.826.0.1.3680043.2.1143.2"


def _source(pixels, *, frames=1, z=None):
    """An in-memory secondary-capture image (``frames`` frames of ``pixels``), a SEG's source; with
    ``z``, a plane of a volume (highdicom needs the geometry for a SEG of several planes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1143.1", SERIES
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "OT", "P1", "Test^P1", "", ""
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    if z is not None:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1143.3"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.tile(pixels.astype(np.uint8), (frames, 1, 1)).tobytes()
    return ds


def _seg_bytes(sources, masks, *, kind="BINARY") -> bytes:
    """A DICOM SEG of ``masks`` ((frames, H, W) bool, one plane per source image or frame) written
    by highdicom; a (frames, H, W, S) array gives S segments."""
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    masks = np.asarray(masks)
    n_segments = masks.shape[-1] if masks.ndim == 4 else 1
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"lesion {i + 1}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i in range(n_segments)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.float32 if kind == "FRACTIONAL" else bool),
        segmentation_type=kind, segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=2, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cbr tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1")
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def _box_mask(shape, *boxes):
    m = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_a_seg_of_one_plane_reads_as_the_union_of_its_segments(tmp_path):
    from cbr.data.mask import read_mask
    from cbr.pipeline.finding_search import mask_boxes

    a, b = _box_mask((32, 40), (10, 5, 30, 15)), _box_mask((32, 40), (2, 20, 8, 30))
    path = tmp_path / "m.dcm"
    path.write_bytes(_seg_bytes([_source(np.zeros((32, 40)))], np.stack([a, b], axis=-1)[None]))
    assert np.array_equal(read_mask(str(path)), a | b)
    assert mask_boxes(str(path), (40, 32)) == [[10, 5, 30, 15], [2, 20, 8, 30]]
    assert mask_boxes(str(path), (80, 64)) == [[20, 10, 60, 30], [4, 40, 16, 60]]  # scaled to its image


def test_a_fractional_seg_is_lesion_where_the_fraction_is_at_least_half(tmp_path):
    from cbr.data.mask import read_mask

    frac = np.zeros((1, 16, 16), dtype=np.float32)
    frac[0, 2:6, 3:9] = 0.8
    frac[0, 10:12, 10:12] = 0.3  # under half: not lesion
    path = tmp_path / "m.dcm"
    path.write_bytes(_seg_bytes([_source(np.zeros((16, 16)))], frac, kind="FRACTIONAL"))
    assert np.array_equal(read_mask(str(path)), _box_mask((16, 16), (3, 2, 9, 6)))


def test_lesion_mask_of_a_seg_equals_that_of_the_same_png(tmp_path):
    from cbr.data.mask import lesion_mask

    m = _box_mask((48, 64), (20, 10, 44, 30))
    (tmp_path / "m.dcm").write_bytes(_seg_bytes([_source(np.zeros((48, 64)))], m[None]))
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    assert np.array_equal(lesion_mask(str(tmp_path / "m.dcm"), 32), lesion_mask(str(tmp_path / "m.png"), 32))


def test_a_seg_of_several_images_gives_each_dicom_image_its_own_plane(tmp_path):
    from pydicom import dcmread, dcmwrite

    from cbr.data.mask import read_mask

    sources = [_source(np.full((20, 20), 40 * (i + 1)), z=i) for i in range(3)]
    masks = np.stack([_box_mask((20, 20), (i * 5, 2, i * 5 + 4, 9)) for i in range(3)])
    seg = tmp_path / "m.dcm"
    seg.write_bytes(_seg_bytes(sources, masks))
    for i, ds in enumerate(sources):
        dcmwrite(tmp_path / f"{i}.dcm", ds, enforce_file_format=True)
        assert np.array_equal(read_mask(str(seg), image=str(tmp_path / f"{i}.dcm")), masks[i])
    # a multi-frame image: the plane of the frame its locator names (the same SEG, its planes
    # re-pointed at the frames of one instance, as an enhanced multi-frame's SEG references them)
    frames = _source(np.zeros((20, 20)), frames=3)
    dcmwrite(tmp_path / "frames.dcm", frames, enforce_file_format=True)
    ds = dcmread(seg)
    uids = [s.SOPInstanceUID for s in sources]
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedFrameNumber = uids.index(ref.ReferencedSOPInstanceUID) + 1
        ref.ReferencedSOPInstanceUID = frames.SOPInstanceUID
    series = ds.ReferencedSeriesSequence[0]
    series.ReferencedInstanceSequence = series.ReferencedInstanceSequence[:1]
    series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = frames.SOPInstanceUID
    dcmwrite(seg, ds)
    assert np.array_equal(read_mask(str(seg), image=f"{tmp_path / 'frames.dcm'}#frame=2"), masks[1])


def test_a_seg_of_several_planes_without_the_image_among_them_is_refused_by_name(tmp_path):
    from cbr.data.mask import read_mask

    sources = [_source(np.zeros((20, 20)), z=i) for i in range(2)]
    seg = tmp_path / "m.dcm"
    seg.write_bytes(_seg_bytes(sources, np.stack([_box_mask((20, 20), (1, 1, 5, 5))] * 2)))
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "img.png")
    with pytest.raises(OSError, match=r"m\.dcm.*2 planes.*none of them is this image"):
        read_mask(str(seg), image=str(tmp_path / "img.png"))


@pytest.mark.parametrize("damage, reason", [
    ("ct", "not a segmentation"),
    ("truncated", "truncated or corrupt DICOM|malformed DICOM SEG"),
    ("no frames", "malformed DICOM SEG"),
])
def test_a_bad_seg_is_refused_with_its_reason(tmp_path, damage, reason):
    from pydicom import dcmread, dcmwrite

    from cbr.data.mask import read_mask

    path = tmp_path / "m.dcm"
    good = _seg_bytes([_source(np.zeros((16, 16)))], _box_mask((16, 16), (2, 2, 8, 8))[None])
    if damage == "ct":
        dcmwrite(path, _source(np.zeros((16, 16))), enforce_file_format=True)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        ds = dcmread(io.BytesIO(good))
        del ds.PerFrameFunctionalGroupsSequence
        dcmwrite(path, ds)
    with pytest.raises(OSError, match=reason):
        read_mask(str(path))


def test_index_stores_seg_lesions_as_findings_and_lists_a_bad_seg(runner, tmp_path):
    """A manifest whose masks are DICOM SEG files: each lesion becomes a finding with its box; a
    SEG that is not one is listed with its reason, and indexing goes on."""
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Case, Finding

    rng = np.random.default_rng(0)
    rows, boxes = [], {}
    for i in range(6):
        img = (rng.random((48, 48)) * 80).astype(np.uint8)
        box = (4 + 3 * i, 6, 20 + 3 * i, 22) if i % 2 else None
        if box:
            img[box[1]:box[3], box[0]:box[2]] = 230
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        mask = _box_mask((48, 48), box) if box else np.zeros((48, 48), dtype=bool)
        (tmp_path / f"{i}.seg.dcm").write_bytes(_seg_bytes([_source(img)], mask[None]))
        rows.append({"path": f"{i}.png", "label": "lesion" if box else "clear", "patient_id": f"p{i}",
                     "mask": f"{i}.seg.dcm"})
        boxes[f"{i}.png"] = box
    (tmp_path / "5.seg.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)  # a damaged SEG
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    db = tmp_path / "c.db"
    result = invoke(runner, "index", tmp_path / "m.csv", "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    assert "its mask finding was not embedded" in result.output and "DICOM" in result.output
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            stored = {path.rsplit("/", 1)[-1]: box for path, box in s.query(Case.path, Finding.box).join(
                Finding, Finding.case_id == Case.id)}
    finally:
        cb.close()
    assert stored == {p: list(b) for p, b in boxes.items() if b and p != "5.png"}


def test_a_seg_among_the_images_is_skipped_as_a_mask_not_indexed_as_a_case(tmp_path):
    """DICOM series folders hold SEG objects beside the images: one is listed with its reason, and
    a query of it is refused, never read as a (binary) image."""
    from cbr.data.dataset import read_dataset
    from cbr.data.sources import read_source
    from cbr.errors import ImageError

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16), 60 * i + (label == "b") * 30, dtype=np.uint8)).save(
                tmp_path / "data" / label / f"{i}.png")
    seg = tmp_path / "data" / "a" / "lesion"  # found by content, no extension
    seg.write_bytes(_seg_bytes([_source(np.zeros((16, 16)))], _box_mask((16, 16), (2, 2, 8, 8))[None]))
    scan = read_dataset(tmp_path / "data")
    assert len(scan.records) == 4 and not any(r.path.endswith("lesion") for r in scan.records)
    reasons = [p.reason for p in scan.problems if p.path.endswith("lesion")]
    assert len(reasons) == 1 and "segmentation (SEG) object, not an image" in reasons[0] and "mask" in reasons[0]
    with pytest.raises(ImageError, match="segmentation"):
        read_source(str(seg))
