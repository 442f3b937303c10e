"""Generators of bad and awkward inputs, shared by the image, dataset, CLI and reliability tests.

Each ``make_*`` function writes one kind of file into ``folder`` and returns its path.
:func:`make_bad_corpus` builds a whole class-folder dataset with all of them, and
:data:`EXPECTED` says what must happen to each; :func:`make_bad_manifests` and
:data:`MANIFEST_EXPECTED` do the same for CSV manifests.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbr.data.dicom import write_dicom
from cbr.data.phantom import CLASSES, phantom

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CANNOT_DROP = 77  # a child's exit status: it could not become an unprivileged user


def as_unprivileged(body, tmp_path) -> None:
    """Run ``body(folder)`` as a user without privileges, in an empty folder that user owns.

    Root reads mode-000 files, so a permission test run as root (CI) runs ``body`` in a forked
    child that has become ``nobody``. That user may not read Python itself (a Python under /root),
    so the child imports nothing: ``body`` first runs here, as root, in a scratch folder, only to
    import what it needs (its outcome as root is meaningless and ignored). It skips only where root
    cannot drop privileges (no CAP_SETUID), and fails there too when CBR_REQUIRE_UNPRIVILEGED is
    set, as CI does. Not root: runs in-process.
    """
    import pwd
    import tempfile
    import traceback

    import pytest

    if not IS_ROOT:
        body(tmp_path)
        return
    Image.init()
    try:
        body(Path(tempfile.mkdtemp(dir=tmp_path)))
    except (Exception, pytest.fail.Exception):  # root reads what the body expects to be refused
        pass
    user = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="cbr-unprivileged-"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            try:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            except PermissionError:
                status = CANNOT_DROP
                raise
            body(folder)
            status = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        report = fh.read().decode(errors="replace")
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    for path in folder.rglob("*"):  # the body may leave mode-000 files and folders behind
        path.chmod(0o700)
    shutil.rmtree(folder, ignore_errors=True)
    if status == CANNOT_DROP and not os.environ.get("CBR_REQUIRE_UNPRIVILEGED"):
        pytest.skip("running as root and unable to become 'nobody' (no CAP_SETUID)")
    assert status == 0, f"as 'nobody' (exit {status}):\n{report}"


@dataclass(frozen=True)
class Expect:
    """What must happen to one input.

    ``scan``: what ``read_dataset`` does with it: "record" (indexed), "problem" (skipped with a
    reason), "ignored" (skipped silently) or, for manifests, "error" (``DatasetError``).
    ``reason``: a substring of the Problem's reason (for "problem"/"error"), or of the
    ``ImageError`` reason that decoding a "record" raises; None: it decodes fine.
    ``records``: for manifests, how many records the scan must hold.
    """

    scan: str
    reason: str | None = None
    records: int | None = None


# -- single files ----------------------------------------------------------------------------


def _phantom_image(seed: int, label: str = "tumour", size: int = 48) -> Image.Image:
    return phantom(np.random.default_rng(seed), label, size)[0]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_good(folder, label: str, n: int = 3, *, size: int = 48, seed: int = 0) -> list[Path]:
    """``n`` distinct phantoms of class ``label`` as PNG (and every third one as JPEG)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = _phantom_image(seed * 1000 + CLASSES.index(label) * 100 + i, label, size)
        if i % 3 == 2:
            p = folder / f"{label}_{i}.jpg"
            p.write_bytes(_jpeg_bytes(img))
        else:
            p = folder / f"{label}_{i}.png"
            p.write_bytes(_png_bytes(img))
        paths.append(p)
    return paths


def make_zero_byte(folder) -> Path:
    p = Path(folder) / "empty.png"
    p.write_bytes(b"")
    return p


def make_truncated_jpeg(folder) -> Path:
    data = _jpeg_bytes(_phantom_image(11, size=64))
    p = Path(folder) / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    return p


def make_truncated_png(folder) -> Path:
    data = _png_bytes(_phantom_image(12, size=64))
    p = Path(folder) / "truncated.png"
    p.write_bytes(data[: len(data) // 2])
    return p


def make_text_as_png(folder) -> Path:
    p = Path(folder) / "notes.png"
    p.write_text("patient notes, not an image\n")
    return p


def make_png_as_jpg(folder) -> Path:
    """A PNG named ``.jpg``: the format is decided by content, so it must decode."""
    p = Path(folder) / "really_a_png.jpg"
    p.write_bytes(_png_bytes(_phantom_image(13)))
    return p


GRADIENT_MAX = 4095  # 12-bit data in a 16-bit container


def make_png16(folder) -> Path:
    """16-bit greyscale PNG: a horizontal gradient 0..4095 (12-bit data), 64x32."""
    row = np.linspace(0, GRADIENT_MAX, 64).round().astype(np.uint16)
    img = Image.fromarray(np.tile(row, (32, 1)))
    assert img.mode.startswith("I;16")
    p = Path(folder) / "gradient16.png"
    img.save(p)
    return p


CMYK_LEFT, CMYK_RIGHT = (0, 255, 255, 0), (255, 255, 0, 0)  # red | blue


def make_cmyk_jpeg(folder) -> Path:
    """CMYK JPEG, 64x64: left half red, right half blue."""
    img = Image.new("CMYK", (64, 64), CMYK_LEFT)
    img.paste(Image.new("CMYK", (32, 64), CMYK_RIGHT), (32, 0))
    p = Path(folder) / "cmyk.jpg"
    img.save(p, "JPEG", quality=95)
    return p


def make_palette_transparent_png(folder) -> Path:
    """Palette PNG, 32x32: left half a transparent white index, right half opaque red."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 255, 255, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (16, 0, 32, 32))
    p = Path(folder) / "palette_alpha.png"
    img.save(p, transparency=0)
    return p


def make_tiny(folder) -> Path:
    p = Path(folder) / "tiny.png"
    Image.new("L", (1, 1), 128).save(p)
    return p


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_pixel_bomb(folder, width: int = 50000, height: int = 50000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (nothing that size is allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )
    p = Path(folder) / "bomb.png"
    p.write_bytes(data)
    return p


ROTATED_STORED = (64, 32)  # landscape as stored; EXIF orientation 6 shows it as 32x64 portrait


def make_exif_rotated_jpeg(folder) -> Path:
    """A landscape JPEG with orientation tag 6 and a red 8x8 marker at its stored top-left.

    Upright (rotated 90 degrees clockwise) it is portrait with the marker at the top-right.
    """
    img = Image.new("RGB", ROTATED_STORED, (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = Path(folder) / "rotated.jpg"
    img.save(p, "JPEG", quality=95, exif=exif)
    return p


def make_non_utf8_name(folder) -> Path:
    """A valid PNG whose name is not valid UTF-8 (returned surrogate-escaped, as os gives it)."""
    raw = os.path.join(os.fsencode(folder), b"scan_\xff\xfe.png")
    with open(raw, "wb") as f:
        f.write(_png_bytes(_phantom_image(14)))
    return Path(os.fsdecode(raw))


def make_no_permission(folder) -> Path:
    """A valid PNG with mode 000 (still readable when the tests run as root)."""
    p = Path(folder) / "locked.png"
    p.write_bytes(_png_bytes(_phantom_image(15)))
    p.chmod(0)
    return p


def make_symlink_loop(folder) -> Path:
    """A folder link pointing at its own parent folder."""
    p = Path(folder) / "loop"
    os.symlink(".", p, target_is_directory=True)
    return p


def make_dir_like_image(folder) -> Path:
    """A folder named like an image, with an image inside (which must not be indexed)."""
    p = Path(folder) / "series.png"
    p.mkdir()
    (p / "inside.png").write_bytes(_png_bytes(_phantom_image(16)))
    return p


def make_hidden(folder) -> Path:
    p = Path(folder) / ".hidden.png"
    p.write_bytes(_png_bytes(_phantom_image(17)))
    return p


def make_fifo(folder) -> Path:
    """A named pipe called like an image: opening it for reading would wait for a writer forever."""
    p = Path(folder) / "fifo.png"
    os.mkfifo(p)
    return p


def make_device_link(folder) -> Path:
    """A link named like an image to ``/dev/zero``, a device whose reads never end."""
    p = Path(folder) / "zero.png"
    os.symlink("/dev/zero", p)
    return p


HUGE_BYTES = 2 * 1024**3 + 1  # one byte over the default cap (cbr.data.guard.DEFAULT_MAX_FILE_MB)


def make_huge(folder) -> Path:
    """A sparse file one byte over the default size cap: no disk space, but a read would take 2 GiB."""
    p = Path(folder) / "huge.png"
    with open(p, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(HUGE_BYTES)
    return p


NEWLINE_LABEL = "tumour\nnormal"
ESCAPE_LABEL = "\x1b]0;pwned\x07"
NFD_LABEL, NFC_LABEL = "cafe\u0301", "caf\u00e9"


def make_burned_in_dicom(folder) -> Path:
    """A DICOM whose pixels carry burned-in text (BurnedInAnnotation=YES), named as archives name them."""
    path = Path(folder) / "Doe^John_19450317.dcm"
    write_dicom(path, np.asarray(_phantom_image(40).convert("L"), dtype=np.uint8), Modality="OT",
                BurnedInAnnotation="YES")
    return path


def make_label_folder(root, label: str, seed: int) -> Path:
    """A class folder named ``label`` holding one good image."""
    folder = Path(root) / label
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"labelled_{seed}.png"
    p.write_bytes(_png_bytes(_phantom_image(seed)))
    return p


# -- a whole class-folder corpus -------------------------------------------------------------


EXPECTED: dict[str, Expect] = {
    "zero_byte": Expect("problem", "empty file (0 bytes)"),
    "truncated_jpeg": Expect("record", "truncated or corrupt image data"),
    "truncated_png": Expect("record", "truncated or corrupt image data"),
    "text_as_png": Expect("record", "not an image"),
    "png_as_jpg": Expect("record"),
    "png16": Expect("record"),
    "cmyk_jpeg": Expect("record"),
    "palette_transparent_png": Expect("record"),
    "tiny": Expect("record", "too small"),
    "pixel_bomb": Expect("record", "image too large"),
    "exif_rotated_jpeg": Expect("record"),
    "non_utf8_name": Expect("problem", "not valid UTF-8; rename it"),
    # root reads mode-000 files: the reliability of the message is tested with monkeypatch.
    "no_permission": Expect("record") if IS_ROOT else Expect("problem", "permission denied"),
    "symlink_loop": Expect("problem", "symbolic link loop"),
    "dir_like_image": Expect("problem", "is a directory, not an image"),
    "hidden": Expect("ignored"),
    "stray": Expect("problem", "an image outside the class folders"),
    "duplicate": Expect("problem", "duplicate of"),
    "conflict_a": Expect("problem", "label conflict"),
    "conflict_b": Expect("problem", "label conflict"),
    # issue 12: files that would block or never end, and labels that broke rendering
    "fifo": Expect("problem", "not a regular file"),
    "device_link": Expect("problem", "not a regular file"),
    "huge": Expect("problem", "file too large"),
    "burned_in_dicom": Expect("problem", "burned-in annotation (BurnedInAnnotation=YES)"),
    "newline_label": Expect("problem", "label contains a newline"),
    "escape_label": Expect("problem", "label contains an escape character"),
    "nfd_label": Expect("record"),  # stored as NFC: one class with nfc_label
    "nfc_label": Expect("record"),
}
GOOD_PER_CLASS = 3

_MAKERS = {
    "zero_byte": make_zero_byte,
    "truncated_jpeg": make_truncated_jpeg,
    "truncated_png": make_truncated_png,
    "text_as_png": make_text_as_png,
    "png_as_jpg": make_png_as_jpg,
    "png16": make_png16,
    "cmyk_jpeg": make_cmyk_jpeg,
    "palette_transparent_png": make_palette_transparent_png,
    "tiny": make_tiny,
    "pixel_bomb": make_pixel_bomb,
    "exif_rotated_jpeg": make_exif_rotated_jpeg,
    "non_utf8_name": make_non_utf8_name,
    "no_permission": make_no_permission,
    "symlink_loop": make_symlink_loop,
    "dir_like_image": make_dir_like_image,
    "hidden": make_hidden,
    "fifo": make_fifo,
    "device_link": make_device_link,
    "huge": make_huge,
    "burned_in_dicom": make_burned_in_dicom,
}


def make_bad_corpus(root) -> dict[str, Path]:
    """Build ``root/<label>/...``: good phantoms in every class plus every bad kind.

    Returns name -> path; the good images are ``good_<label>_<i>``, and every other name is a
    key of :data:`EXPECTED` (good ones are expected as ``Expect("record")``).
    """
    root = Path(root)
    paths: dict[str, Path] = {}
    for label in CLASSES:
        for i, p in enumerate(make_good(root / label, label, GOOD_PER_CLASS)):
            paths[f"good_{label}_{i}"] = p
    odd = root / CLASSES[0]
    for name, make in _MAKERS.items():
        paths[name] = make(odd)
    stray = root / "stray.png"
    stray.write_bytes(_png_bytes(_phantom_image(18)))
    paths["stray"] = stray
    # The copy's name sorts after the original, so the original is the one kept.
    paths["duplicate"] = odd / "zz_duplicate.png"
    shutil.copyfile(paths[f"good_{CLASSES[0]}_0"], paths["duplicate"])
    conflict = _png_bytes(_phantom_image(19))
    for key, label in (("conflict_a", CLASSES[1]), ("conflict_b", CLASSES[2])):
        paths[key] = root / label / "conflict.png"
        paths[key].write_bytes(conflict)
    for seed, (key, label) in enumerate((("newline_label", NEWLINE_LABEL), ("escape_label", ESCAPE_LABEL),
                                         ("nfd_label", NFD_LABEL), ("nfc_label", NFC_LABEL)), start=30):
        paths[key] = make_label_folder(root, label, seed)
    return paths


def expected(name: str) -> Expect:
    """The expectation for a corpus entry (good images included)."""
    return Expect("record") if name.startswith("good_") else EXPECTED[name]


# -- CSV manifests ---------------------------------------------------------------------------


MANIFEST_EXPECTED: dict[str, Expect] = {
    "missing_column": Expect("error", "has no column 'label'"),
    "blank_label": Expect("problem", "row 3: blank label", records=1),
    "unknown_path": Expect("problem", "row 3: file not found (looked in:", records=1),
    "bom": Expect("record", records=2),
    "quoted_commas": Expect("record", records=2),
    "duplicate_rows": Expect("problem", "row 4: listed again; duplicate of row 2", records=2),
    # issue 12
    "huge_cell": Expect("problem", "row 3: column 'notes' holds 200000 characters", records=1),
    "newline_label": Expect("problem", "row 3: label contains a newline", records=1),
    "control_patient": Expect("problem", "row 3: patient id contains the control character U+0007", records=1),
    "nfc_labels": Expect("record", records=2),
    "formula_labels": Expect("record", records=2),
}
FORMULA_LABELS = ('=HYPERLINK("http://evil","x")', "@SUM(1+1)")
QUOTED_NOTE = 'left frontal, "ring" enhancing, 2 cm'


def make_bad_manifests(root) -> dict[str, Path]:
    """Write ``root/images/img<i>.png`` and one manifest per kind of :data:`MANIFEST_EXPECTED`."""
    root = Path(root)
    images = make_good(root / "images", "tumour", 3)
    names = [p.name for p in images]
    out: dict[str, Path] = {}

    def write(name: str, text: str, encoding: str = "utf-8") -> None:
        out[name] = root / f"{name}.csv"
        out[name].write_bytes(text.encode(encoding))

    write("missing_column", f"path,diagnosis\nimages/{names[0]},tumour\n")
    write("blank_label", f"path,label\nimages/{names[0]},tumour\nimages/{names[1]},  \n")
    write("unknown_path", f"path,label\nimages/{names[0]},tumour\nimages/nothere.png,cyst\n")
    write("bom", f"path,label\nimages/{names[0]},tumour\nimages/{names[1]},cyst\n", "utf-8-sig")
    note = '"' + QUOTED_NOTE.replace('"', '""') + '"'
    write(
        "quoted_commas",
        f"path,label,notes\nimages/{names[0]},tumour,{note}\nimages/{names[1]},cyst,plain\n",
    )
    write(
        "duplicate_rows",
        f"path,label\nimages/{names[0]},tumour\nimages/{names[1]},cyst\nimages/{names[0]},tumour\n",
    )
    write("huge_cell", f"path,label,notes\nimages/{names[0]},tumour,short\nimages/{names[1]},cyst,{'x' * 200000}\n")
    write("newline_label", f'path,label\nimages/{names[0]},tumour\nimages/{names[1]},"{NEWLINE_LABEL}"\n')
    write("control_patient", f"path,label,patient_id\nimages/{names[0]},tumour,P1\nimages/{names[1]},cyst,P\x072\n")
    write("nfc_labels", f"path,label\nimages/{names[0]},{NFD_LABEL}\nimages/{names[1]},{NFC_LABEL}\n")
    quoted = ['"' + label.replace('"', '""') + '"' for label in FORMULA_LABELS]
    write("formula_labels", f"path,label\nimages/{names[0]},{quoted[0]}\nimages/{names[1]},{quoted[1]}\n")
    return out


# -- running something that might hang ------------------------------------------------------


class Hung(Exception):
    """A call did not return within its time limit (it would have blocked the test suite)."""


def within(seconds: float):
    """A context manager that raises :class:`Hung` if its block runs longer than ``seconds``
    (SIGALRM: main thread only), so that a read that blocks fails a test instead of stalling it."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit():
        def ring(signum, frame):
            raise Hung(f"still running after {seconds} s: it would hang")

        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return limit()
