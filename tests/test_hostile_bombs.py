"""Decompression bombs (issue 24, items 3 to 6): small files that declare a huge decoded size.

Every decoder checks the decoded size its header declares (rows x columns x frames x bytes per
sample) against ``cbr --max-decoded-mb`` before decoding a pixel. A bomb given as a query exits 1
with one line naming the file and the option; inside a dataset it is skipped and listed once.

The memory bombs run ``cbr`` in a subprocess under ``RLIMIT_DATA`` (heap and anonymous memory):
a regression then fails the test instead of taking the machine down. ``RLIMIT_AS`` cannot be
used: torch's libraries alone map about 5.7 GB of address space in a normal query, while its data
stays near 1 GB. Each run's peak RSS is printed (``pytest -s``) for the README figures.
"""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

import bombs
from badfiles import make_good
from conftest import TINY, invoke
from test_reliability_corruption import assert_one_line_error

DATA_LIMIT = 3 * 2**30  # a normal query needs about 1 GB of data; each bomb needed 3.6 to 8 GB before the fix


# ``cbr`` run so that it writes its own peak resident memory (VmHWM) when it exits. The child's
# ru_maxrss cannot serve: Linux carries the high-water mark of the forked pytest process (gigabytes
# late in a full run) across exec, while VmHWM belongs to the new program's memory alone.
PEAK_WRAPPER = (
    "import atexit, os, runpy, sys\n"
    "def peak():\n"
    "    with open('/proc/self/status') as st, open(os.environ['CBR_TEST_PEAK'], 'w') as out:\n"
    "        out.write(next(line.split()[1] for line in st if line.startswith('VmHWM:')))\n"
    "atexit.register(peak)\n"
    "sys.argv = ['cbr', *sys.argv[1:]]\n"
    "runpy.run_module('cbr', run_name='__main__')\n"
)


def run_cbr(args, cwd, *, limit: int = DATA_LIMIT, timeout: float = 300):
    """``cbr ARGS`` in a subprocess with its data segment capped: (exit code, stdout, stderr, peak RSS MiB)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    peak_file = cwd / "cbr.peak"
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CBR_TEST_PEAK=str(peak_file))
    out, err = cwd / "cbr.out", cwd / "cbr.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        p = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], cwd=cwd, stdout=fo, stderr=fe,
                             preexec_fn=cap, env=env)
        watchdog = threading.Timer(timeout, p.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            watchdog.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    # Killed before its exit handler ran: the inherited figure is all there is (an upper bound).
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else usage.ru_maxrss / 1024
    print(f"\n  cbr {' '.join(map(str, args[:2]))}: exit {p.returncode}, peak RSS {peak:.0f} MiB")
    return p.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), peak


def assert_refused(rc, out, err, *needles):
    """Exit 1, no traceback, one ``Error: ...`` line holding every needle."""
    assert "Traceback" not in out + err, err[-3000:]
    assert rc == 1, (rc, out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bombs")


@pytest.fixture(scope="module")
def casebase(tmp_path_factory, _indexed_template):
    """A copy of the suite's small indexed case base, to query the bombs against."""
    dest = tmp_path_factory.mktemp("bomb-cb")
    shutil.copytree(_indexed_template, dest, dirs_exist_ok=True)
    return dest / "cases.db"


# -- PNG (and every Pillow format) -------------------------------------------------------------


@pytest.mark.slow
def test_16bit_png_bomb_is_refused_from_its_header_under_1gb(bomb_dir, casebase, tmp_path):
    """194 KB declaring 10000x10000 16-bit pixels: it cost 3.6 GB, then 1.5 GB once decoded without
    float64 copies; the pixel limit now refuses it before torch or a pixel is loaded."""
    png = bombs.png16(bomb_dir / "big16.png")
    assert png.stat().st_size < 250_000
    rc, out, err, peak = run_cbr(["query", png, "--db", casebase, "--no-record"], tmp_path)
    assert_refused(rc, out, err, "big16.png", "image too large", "1e8", "5e7")
    assert peak < 1024


@pytest.mark.slow
def test_16bit_png_just_under_the_pixel_limit_decodes_in_bounded_memory(bomb_dir, casebase, tmp_path):
    """7000x7000 16-bit (4.9e7 pixels) is accepted and answered without float64 copies."""
    png = bombs.png16(bomb_dir / "big16-ok.png", 7000, 7000)
    rc, out, err, _ = run_cbr(["query", png, "--db", casebase, "--no-record"], tmp_path)
    assert rc == 0 and "Traceback" not in err, err[-3000:]


def test_16bit_png_over_the_budget_is_refused_in_one_line(bomb_dir, casebase, runner, monkeypatch):
    png = bombs.png16(bomb_dir / "big16-budget.png", 10000, 4000)
    monkeypatch.setenv("CBR_MAX_DECODED_MB", "512")  # the option sets it; restored after the test
    result = invoke(runner, "--max-decoded-mb", "50", "query", png, "--db", casebase, "--no-record")
    assert_one_line_error(result, "big16-budget.png", "decoded size too large", "--max-decoded-mb", "76.29 MiB")


def test_budget_applies_to_every_pillow_format(tmp_path, monkeypatch):
    from PIL import Image

    from cbr.data.image import read_image
    from cbr.errors import ImageError

    monkeypatch.setenv("CBR_MAX_DECODED_MB", "1")
    for name, mode, size in (("rgb.tif", "RGB", (700, 600)), ("grey.jpg", "L", (1100, 1000))):
        Image.new(mode, size).save(tmp_path / name)
        with pytest.raises(ImageError, match=r"decoded size too large: \d+x\d+(x3)? x 1 bytes"):
            read_image(tmp_path / name)
    Image.new("RGB", (500, 600)).save(tmp_path / "ok.tif")  # 0.86 MiB: within
    assert read_image(tmp_path / "ok.tif")[0].size == (500, 600)


def test_16bit_decoding_matches_the_float_reference(tmp_path):
    """The bounded (blockwise) scaling gives exactly what the float64 formula gave."""
    from PIL import Image

    from cbr.data.image import read_image

    rng = np.random.default_rng(0)
    a = rng.integers(300, 4000, (37, 53), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    got = np.asarray(read_image(tmp_path / "a.png")[0])[..., 0]
    lo, hi = float(a.min()), float(a.max())
    want = np.clip(np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    assert np.array_equal(got, want)


# -- DICOM ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_deflated_dicom_bomb_query_is_refused(bomb_dir, casebase, tmp_path):
    """2 MB, deflated (1.2.840.10008.1.2.1.99), 8192x8192x16 frames of 16 bits: 2 GiB inflated."""
    dcm = bombs.deflated_dicom(bomb_dir / "bomb.dcm")
    assert dcm.stat().st_size < 3_000_000
    rc, out, err, _ = run_cbr(["query", dcm, "--db", casebase, "--no-record"], tmp_path)
    assert_refused(rc, out, err, "bomb.dcm", "decoded size too large", "8192x8192x16", "--max-decoded-mb")


def test_deflated_dicom_within_the_budget_still_decodes(tmp_path):
    from cbr.data.sources import read_source

    dcm = bombs.deflated_dicom(tmp_path / "small.dcm", 64, 48, 3)
    img, _, src = read_source(dcm)
    assert img.size == (48, 64) and src.frame == 2


def test_deflated_dicom_that_inflates_past_its_header_is_refused(tmp_path, monkeypatch):
    """The header may lie: the inflated dataset itself is counted too, in bounded memory."""
    from cbr.data.sources import read_source
    from cbr.errors import ImageError

    dcm = bombs.deflated_dicom(tmp_path / "liar.dcm", 8, 8, 1, pixel_bytes=64 * 2**20)  # says 128 bytes
    padded = bombs.deflated_dicom(tmp_path / "padded.dcm", 8, 8, 1, pixel_bytes=64 * 2**20, padding=2 * 2**20)
    monkeypatch.setenv("CBR_MAX_DECODED_MB", "16")
    for path in (dcm, padded):
        with pytest.raises(ImageError, match="the deflated dataset inflates past the limit of 16 MiB"):
            read_source(path)


# -- NIfTI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_bombs_in_a_dataset_are_skipped_and_listed_once(bomb_dir, tmp_path):
    """A 644-byte NIfTI-2 header declaring 8x8x50,000,000 (7.5 GB and 50M slices before the fix), a
    1024^3 .nii.gz and the deflated DICOM, beside good images: each is one problem, the rest is indexed."""
    data = tmp_path / "data"
    make_good(data / "tumour", "tumour", 3, seed=1)
    make_good(data / "normal", "normal", 3, seed=2)
    header = bombs.nifti_header_only(data / "tumour" / "long.nii")
    assert header.stat().st_size == 644
    bombs.nifti_gz(data / "tumour" / "cube.nii.gz")
    bombs.deflated_dicom(data / "normal" / "frames.dcm")
    db = tmp_path / "cases.db"
    rc, out, err, _ = run_cbr(["index", data, "--db", db, *TINY, "--workers", "0"], tmp_path)
    assert rc == 0 and "Traceback" not in err, (out[-3000:], err[-3000:])
    assert "cases added:   6" in out and "skipped:       3" in out, out
    listed = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(listed) == 3 and all("decoded size too large" in line for line in listed), out
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT path, reason FROM ingest_problems").fetchall()
    assert sorted(os.path.basename(p) for p, _ in rows) == ["cube.nii.gz", "frames.dcm", "long.nii"]


@pytest.mark.slow
def test_nifti_gz_query_bomb_is_refused(bomb_dir, casebase, tmp_path):
    """1 MB .nii.gz of 1024^3 uint8: `cbr query` went past 8 GB."""
    cube = bombs.nifti_gz(bomb_dir / "cube.nii.gz")
    assert cube.stat().st_size < 1_500_000
    rc, out, err, _ = run_cbr(["query", cube, "--db", casebase, "--no-record"], tmp_path)
    assert_refused(rc, out, err, "cube.nii.gz", "decoded size too large", "1024x1024x1024", "--max-decoded-mb")


def test_huge_nifti_header_is_one_problem_not_one_per_slice(tmp_path):
    from cbr.data.dataset import read_dataset

    (tmp_path / "d" / "a").mkdir(parents=True)
    bombs.nifti_header_only(tmp_path / "d" / "a" / "big.nii", (30000, 30000, 30000), version=1)
    scan = read_dataset(tmp_path / "d")
    assert not scan.records
    assert [p.reason.split(":")[0] for p in scan.problems] == ["decoded size too large"]


def test_nan_affine_skips_that_volume_and_indexes_the_rest(tmp_path, runner):
    nan = np.eye(4)
    nan[0, 0] = np.nan
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    bombs.nifti(data / "a" / "good.nii.gz", rng.normal(100, 30, (12, 12, 4)).astype(np.float32))
    bombs.nifti(data / "a" / "nan.nii", np.ones((12, 12, 4), np.float32), nan)
    make_good(data / "normal", "normal", 2, seed=3)
    result = invoke(runner, "index", data, "--db", tmp_path / "cases.db", *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   6" in result.output  # 4 slices + 2 images
    (line,) = [x for x in result.output.splitlines() if "nan.nii" in x]
    assert "affine" in line and "not finite" in line


def test_zero_dimension_volume_is_listed_not_dropped(tmp_path):
    from cbr.data.dataset import read_dataset

    data = tmp_path / "d"
    bombs.nifti(data / "a" / "empty.nii", np.zeros((12, 0, 4), np.float32))
    bombs.nifti(data / "a" / "good.nii", np.ones((12, 12, 2), np.float32))
    scan = read_dataset(data)
    assert len(scan.records) == 2
    (p,) = scan.problems
    assert p.path.endswith("empty.nii") and "zero" in p.reason and "(12, 0, 4)" in p.reason


def test_truncated_volume_is_one_problem_at_scan_time(tmp_path):
    from cbr.data.dataset import read_dataset

    data = tmp_path / "d"
    path = bombs.nifti(data / "a" / "cut.nii", np.ones((12, 12, 30), np.float32))
    path.write_bytes(path.read_bytes()[:-5000])
    gz = bombs.nifti(data / "a" / "cut.nii.gz", np.ones((12, 12, 30), np.float32))
    import gzip

    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes())[:-5000]))
    scan = read_dataset(data)
    assert not scan.records
    assert sorted(p.reason.split(" (")[0] for p in scan.problems) == ["truncated volume data"] * 2


def test_volume_decoding_matches_nibabel(tmp_path):
    """Slices read without nibabel's full load equal nibabel's canonical volume, windowed."""
    import nibabel as nib

    from cbr.data.sources import read_source
    from cbr.data.windows import minmax_to_uint8

    rng = np.random.default_rng(5)
    v = rng.integers(-1000, 3000, (10, 14, 6)).astype(np.int16)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS storage: flipped to RAS on reading
    img = nib.Nifti1Image(v, affine)
    img.header.set_slope_inter(0.5, -20.0)
    nib.save(img, str(tmp_path / "v.nii.gz"))
    canonical = np.asarray(nib.as_closest_canonical(nib.load(str(tmp_path / "v.nii.gz"))).get_fdata(),
                           dtype=np.float32)
    lo, hi = float(canonical.min()), float(canonical.max())
    for k in (0, 3, 5):
        got = np.asarray(read_source(f"{tmp_path / 'v.nii.gz'}#axis=axial&slice={k}")[0])[..., 0]
        want = minmax_to_uint8(np.rot90(canonical[:, :, k]), lo, hi)
        assert np.array_equal(got, want), k


# -- npz -----------------------------------------------------------------------------------


def test_npz_header_bomb_is_refused_in_one_line(bomb_dir, casebase, runner, tmp_path):
    """526 bytes whose .npy header declares (10**7, 1000, 1000): a traceback from index and query."""
    npz = bombs.npz_header_bomb(bomb_dir / "header.npz")
    assert npz.stat().st_size < 1000
    result = invoke(runner, "index", npz, "--db", tmp_path / "x.db", *TINY, "--workers", "0")
    assert_one_line_error(result, "header.npz", "decoded size too large", "10000000x1000x1000", "--max-decoded-mb")
    result = invoke(runner, "query", f"{npz}#split=train&index=0", "--db", casebase, "--no-record")
    assert_one_line_error(result, "header.npz", "decoded size too large", "--max-decoded-mb")


@pytest.mark.slow
def test_npz_zip_bomb_is_refused(bomb_dir, casebase, tmp_path):
    """3.4 MB archive of 3.5 GB zeros (the issue's was 5.8 MB to 6.6 GB)."""
    npz = bombs.npz_zip_bomb(bomb_dir / "zip.npz")
    assert npz.stat().st_size < 5_000_000
    rc, out, err, _ = run_cbr(["index", npz, "--db", tmp_path / "x.db", *TINY, "--workers", "0"], tmp_path)
    assert_refused(rc, out, err, "zip.npz", "decoded size too large", "--max-decoded-mb")
    rc, out, err, _ = run_cbr(["query", f"{npz}#split=train&index=0", "--db", casebase, "--no-record"], tmp_path)
    assert_refused(rc, out, err, "zip.npz", "decoded size too large", "--max-decoded-mb")


def test_npz_member_that_inflates_past_its_header_is_refused(tmp_path):
    """A member whose zip entry declares more bytes than its .npy header says is refused too."""
    import io
    import zipfile

    from cbr.data.npz import load_npz
    from cbr.errors import ImageError

    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 8, 8), np.uint8))
    with zipfile.ZipFile(tmp_path / "pad.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", buf.getvalue() + bytes(10_000_000))
    with pytest.raises(ImageError, match="train_images.npy holds 10000.* bytes but its header declares"):
        load_npz((tmp_path / "pad.npz").read_bytes(), "pad.npz")


def test_stored_npz_reads_only_the_images_needed(tmp_path):
    """An uncompressed (np.savez) member is not copied: its array is a view of the file's pages."""
    from cbr.data.npz import load_npz

    images = np.arange(4 * 9 * 9, dtype=np.uint8).reshape(4, 9, 9)
    np.savez(tmp_path / "s.npz", train_images=images, train_labels=np.array([0, 1, 0, 1]),
             test_images=images[:2], test_labels=np.array([1, 0]))
    data = (tmp_path / "s.npz").read_bytes()
    arrays = load_npz(data, "s.npz", keys=("test_images",))
    assert list(arrays) == ["test_images"]
    assert np.array_equal(arrays["test_images"], images[:2])
    assert not arrays["test_images"].flags.owndata  # a view of the archive's bytes


def test_reading_a_small_file_does_not_reserve_the_whole_size_cap(tmp_path):
    """read_regular used to ask for a buffer of the cap (2 GiB) for every file: under a memory limit
    (a container, RLIMIT_DATA) even a 10-byte read failed, and a query of a large image with it."""
    (tmp_path / "small.bin").write_bytes(b"0123456789")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30)); "
            "from cbr.data.guard import read_regular; sys.stdout.write(read_regular(sys.argv[1]).decode())")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "small.bin")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "0123456789", done.stderr[-2000:]


def test_mask_images_are_held_to_the_budget(tmp_path, monkeypatch):
    from cbr.data.mask import lesion_mask

    mask = bombs.png16(tmp_path / "mask.png", 1000, 1000)  # 1.9 MiB decoded
    assert lesion_mask(str(mask), 32).shape == (32, 32)
    monkeypatch.setenv("CBR_MAX_DECODED_MB", "1")
    with pytest.raises(OSError, match="mask.png: decoded size too large: 1000x1000 x 2 bytes"):
        lesion_mask(str(mask), 32)
