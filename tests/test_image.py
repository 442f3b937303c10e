"""cbr.data.image: decoding every awkward input to upright RGB, and clear errors for the bad ones."""

import hashlib
import io
import os
import warnings

import badfiles
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import cbr.data.image
from cbr.errors import ImageError
from cbr.data.image import MAX_PIXELS, decode_image, letterbox, read_image, sha256_file


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(img) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# -- inputs that must decode -------------------------------------------------------------------


def test_png_named_jpg_decodes_by_content(tmp_path):
    path = badfiles.make_png_as_jpg(tmp_path)
    img, digest = read_image(path)
    original = np.asarray(Image.open(path).convert("L"))
    assert img.size == (48, 48)
    np.testing.assert_array_equal(_rgb(img), np.repeat(original[..., None], 3, axis=2))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_16bit_gradient_is_scaled_not_clipped(tmp_path):
    img, _ = read_image(badfiles.make_png16(tmp_path))
    row = _rgb(img)[0, :, 0]
    assert img.size == (64, 32)
    # 12-bit data spans the full 8-bit range, linearly: every level is value * 255 / 4095, rounded
    source = np.linspace(0, badfiles.GRADIENT_MAX, 64).round()
    assert row.tolist() == np.round(source * 255 / badfiles.GRADIENT_MAX).astype(int).tolist()
    assert row[0] == 0 and row[32] == 130 and row[-1] == 255


def _gradient(mode: str) -> Image.Image:
    a = np.arange(64 * 16).reshape(16, 64)
    if mode == "I;16B":
        return Image.frombytes("I;16B", (64, 16), (a * 4).astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray((a * 1000 - 70000).astype(np.int32))  # negative values too
    if mode == "F":
        f = (a / 10.0 - 3).astype(np.float32)
        f[0, 1] = np.nan  # non-finite pixels must not poison the scaling
        return Image.fromarray(f)
    return Image.fromarray((a * 4).astype(np.uint16))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_depth_modes_scale_min_to_max(mode):
    src = _gradient(mode)
    assert src.mode == mode
    img = decode_image(_encode(src, "TIFF"))
    a = _rgb(img)[..., 0]
    assert a.min() == 0 and a.max() == 255
    assert a[-1, -1] == 255 and a[0, 0] == 0


def test_constant_16bit_image_is_black():
    src = Image.fromarray(np.full((16, 16), 3000, np.uint16))
    assert _rgb(decode_image(_encode(src, "PNG"))).max() == 0


def test_cmyk_jpeg_colours_roughly_right(tmp_path):
    img, _ = read_image(badfiles.make_cmyk_jpeg(tmp_path))
    a = _rgb(img)
    left, right = a[32, 8], a[32, 56]
    assert left[0] > 200 and left[1] < 60 and left[2] < 60, left  # red
    assert right[2] > 200 and right[0] < 60 and right[1] < 60, right  # blue


def test_palette_transparency_composited_on_black(tmp_path):
    img, _ = read_image(badfiles.make_palette_transparent_png(tmp_path))
    a = _rgb(img)
    assert a[16, 4].tolist() == [0, 0, 0]  # transparent white -> black background
    assert a[16, 28].tolist() == [255, 0, 0]


def test_exif_orientation_applied(tmp_path):
    img, _ = read_image(badfiles.make_exif_rotated_jpeg(tmp_path))
    w, h = badfiles.ROTATED_STORED
    assert img.size == (h, w)  # landscape stored, portrait shown
    a = _rgb(img)
    top_right, top_left, bottom_left = a[3, h - 4], a[3, 3], a[w - 4, 3]
    assert top_right[0] > 200 and top_right[1] < 60, top_right  # the marker moved here
    assert abs(top_left - 128).max() < 20 and abs(bottom_left - 128).max() < 20


@pytest.mark.parametrize(
    "src, expected",
    [
        (Image.new("L", (16, 16), 200), [200, 200, 200]),
        (Image.new("1", (16, 16), 1), [255, 255, 255]),
        (Image.new("LA", (16, 16), (200, 128)), [100, 100, 100]),
        (Image.new("RGBA", (16, 16), (200, 100, 50, 0)), [0, 0, 0]),
        (Image.new("RGBA", (16, 16), (200, 100, 50, 255)), [200, 100, 50]),
        (Image.new("RGBA", (16, 16), (200, 100, 50, 128)), [100, 50, 25]),
        (Image.new("P", (16, 16), 0).convert("P"), [0, 0, 0]),
    ],
    ids=["L", "1", "LA", "RGBA-clear", "RGBA-opaque", "RGBA-half", "P"],
)
def test_modes_convert_to_rgb(src, expected):
    img = decode_image(_encode(src, "PNG"))
    assert np.abs(_rgb(img)[8, 8] - expected).max() <= 1


def test_palette_without_transparency():
    src = Image.new("P", (16, 16), 1)
    src.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _rgb(decode_image(_encode(src, "PNG")))[0, 0].tolist() == [10, 200, 30]


def test_multi_frame_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    a = _rgb(decode_image(data))
    assert a[8, 8, 0] > 200 and a[8, 8, 2] < 60


# -- inputs that must fail, each with its reason -----------------------------------------------


@pytest.mark.parametrize(
    "make, reason",
    [
        (badfiles.make_zero_byte, "empty file (0 bytes)"),
        (badfiles.make_truncated_jpeg, "truncated or corrupt image data"),
        (badfiles.make_truncated_png, "truncated or corrupt image data"),
        (badfiles.make_text_as_png, "not an image (text or unsupported format)"),
        (badfiles.make_tiny, "image is 1x1 pixels; too small (minimum 8x8)"),
        (
            badfiles.make_pixel_bomb,
            "image too large: 50000x50000 = 2.5e9 pixels exceeds the limit of 5e7",
        ),
    ],
)
def test_bad_files_raise_image_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError) as e:
        read_image(path)
    assert e.value.reason == reason
    assert e.value.path == str(path)
    assert str(e.value) == f"{path}: {reason}"


def test_own_pixel_limit_checked_before_decoding():
    # A header that claims 100x100 with hardly any data: our limit fires before decoding, so
    # the reason is the size, not the truncation.
    data = _encode(Image.new("L", (100, 100)), "PNG")[:60]
    with pytest.raises(ImageError, match=r"100x100 = 1e4 pixels exceeds the limit of 5e3"):
        decode_image(data, max_pixels=5000)
    assert decode_image(_encode(Image.new("L", (100, 100)), "PNG"), max_pixels=10_000).size == (
        100,
        100,
    )
    assert MAX_PIXELS == 50_000_000


def test_pillow_guard_becomes_image_error_and_its_warning_is_silenced(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's soft warning (1000 < 1600 <= 2000) must not leak
        assert decode_image(_encode(Image.new("L", (40, 40)), "PNG")).size == (40, 40)
    with pytest.raises(ImageError, match=r"50x50 = 2.5e3 pixels exceeds the limit of 2e3$"):
        decode_image(_encode(Image.new("L", (50, 50)), "PNG"))


def test_min_size_is_a_keyword(tmp_path):
    path = badfiles.make_tiny(tmp_path)
    assert read_image(path, min_size=1)[0].size == (1, 1)
    with pytest.raises(ImageError, match=r"image is 16x4 pixels; too small \(minimum 8x8\)"):
        decode_image(_encode(Image.new("L", (16, 4)), "PNG"))


def test_corrupt_header_of_a_known_format():
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    with pytest.raises(ImageError, match="truncated or corrupt image data"):
        decode_image(data)


def test_damaged_dicom_is_named():
    # DICOM is decoded by cbr.data.dicom (tests/test_dicom.py); a damaged one says so
    with pytest.raises(ImageError, match="no pixel data|corrupt DICOM"):
        decode_image(b"\x00" * 128 + b"DICM" + b"\x00" * 64)


def test_file_not_found_and_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "missing.png")
    assert e.value.reason == "file not found"
    with pytest.raises(ImageError) as e:
        read_image(tmp_path)
    assert e.value.reason == "is a directory"
    with pytest.raises(ImageError, match="file not found"):
        sha256_file(tmp_path / "missing.png")


def test_permission_denied_simulated(tmp_path, monkeypatch):
    path = badfiles.make_no_permission(tmp_path)

    real_open = os.open

    def denied(p, *a, **kw):  # every input file is opened by cbr.data.guard, with os.open
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    for call in (read_image, sha256_file):
        with pytest.raises(ImageError) as e:
            call(path)
        assert e.value.reason == "permission denied"


def _permission_denied_real(folder):
    with pytest.raises(ImageError, match="permission denied"):
        read_image(badfiles.make_no_permission(folder))


def test_permission_denied_real(tmp_path):
    badfiles.as_unprivileged(_permission_denied_real, tmp_path)  # root would read a mode-000 file


def test_non_utf8_path_reads_and_errors_print(tmp_path):
    path = badfiles.make_non_utf8_name(tmp_path)
    img, _ = read_image(path)
    assert img.mode == "RGB"
    missing = os.path.join(os.fsencode(tmp_path), b"gone_\xff.png")
    with pytest.raises(ImageError) as e:
        read_image(missing)
    assert e.value.path.endswith("gone_\\xff.png")
    str(e.value).encode("utf-8")  # printable


def test_sha256_file_matches_read_image(tmp_path):
    path = badfiles.make_png_as_jpg(tmp_path)
    assert sha256_file(path) == read_image(path)[1] == hashlib.sha256(path.read_bytes()).hexdigest()


# -- fuzzing: anything but an image gives ImageError -------------------------------------------

_VALID = {
    "png": _encode(Image.new("RGB", (12, 10), (10, 20, 30)), "PNG"),
    "jpeg": _encode(Image.new("RGB", (12, 10), (10, 20, 30)), "JPEG"),
    "gif": _encode(Image.new("P", (12, 10)), "GIF"),
    "bmp": _encode(Image.new("RGB", (12, 10)), "BMP"),
    "tiff": _encode(Image.new("I;16", (12, 10)), "TIFF"),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(_VALID)),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
def test_mutated_images_decode_or_raise_image_error(fmt, cut, flips):
    data = bytearray(_VALID[fmt][: max(1, len(_VALID[fmt]) - cut)])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    try:
        img = decode_image(bytes(data), max_pixels=1_000_000)
    except ImageError as e:
        assert e.reason
    else:
        assert img.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_image(data)


# -- letterbox --------------------------------------------------------------------------------


def test_letterbox_centres_content_in_a_square():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    out = letterbox(img, 64)
    a = _rgb(out)[..., 0]
    assert out.size == (64, 64)
    rows = np.where(a[:, 32] > 128)[0]
    assert rows.min() in (15, 16, 17) and rows.max() in (46, 47, 48)  # 32 rows, centred
    assert (a[:, 0] > 128).sum() >= 30  # full width kept
    assert a[0, 32] == 0 and a[63, 32] == 0


def test_letterbox_square_input_and_fill():
    assert letterbox(Image.new("L", (10, 10), 7), 10).getpixel((5, 5)) == (7, 7, 7)
    out = letterbox(Image.new("RGB", (10, 30), (255, 0, 0)), 30, fill=50)
    assert out.getpixel((0, 15)) == (50, 50, 50) and out.getpixel((15, 15)) == (255, 0, 0)
