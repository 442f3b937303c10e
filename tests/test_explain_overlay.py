"""explain.overlay: upsampling, colours, overlays on a shared or per-image scale, panels."""

import numpy as np
import pytest
from PIL import Image

from explain.overlay import colorize, render_overlay, render_panel, shared_vmax, upsample
from explain_models import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _image(size=64, value=100):
    return Image.new("RGB", (size, size), (value, value, value))


def _peak(scale=1.0):
    raw = np.zeros((8, 8), dtype=np.float32)
    raw[2, 5] = 1.0
    raw[3, 5] = 0.5
    return raw * scale


def _change(image, overlay):
    return np.abs(np.asarray(overlay, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean()


def test_upsample_shapes_and_values():
    raw = _peak(3.0)
    square = upsample(raw, 32)
    assert square.shape == (32, 32) and square.dtype == np.float32
    assert upsample(raw, (16, 24)).shape == (16, 24)
    # Bilinear keeps the magnitude of a constant map and does not overshoot.
    np.testing.assert_allclose(upsample(np.full((7, 7), 2.5), 224), 2.5, rtol=1e-6)
    assert 0 <= square.min() and square.max() <= 3.0
    np.testing.assert_array_equal(upsample(raw, 8), raw)


def test_colorize_is_jet_like():
    colours = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    low, mid, high = colours[0].astype(int)
    assert low[2] > low[0] and low[1] == 0  # dark blue
    assert mid[1] == 255  # green in the middle
    assert high[0] > high[2] and high[1] == 0  # dark red
    np.testing.assert_array_equal(colorize(np.array([[-3.0, 7.0]])), colorize(np.array([[0.0, 1.0]])))


def test_overlay_size_and_zero_map():
    image = _image(64)
    overlay = render_overlay(image, _peak())
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    assert _change(image, overlay) > 0
    np.testing.assert_array_equal(np.asarray(render_overlay(image, np.zeros((8, 8)))), np.asarray(image))


def test_per_image_and_shared_scales():
    image = _image(64)
    strong, weak = _peak(1.0), _peak(0.5)
    # Each map scaled by its own maximum: a map and half of it look the same.
    np.testing.assert_array_equal(np.asarray(render_overlay(image, strong)),
                                  np.asarray(render_overlay(image, weak)))
    # On the shared scale, the weaker map renders dimmer.
    vmax = shared_vmax([strong, weak])
    assert vmax == pytest.approx(1.0)
    strong_on_shared = render_overlay(image, strong, vmax=vmax)
    weak_on_shared = render_overlay(image, weak, vmax=vmax)
    assert _change(image, weak_on_shared) < _change(image, strong_on_shared)
    np.testing.assert_array_equal(np.asarray(strong_on_shared), np.asarray(render_overlay(image, strong)))


def test_shared_vmax_of_nothing():
    assert shared_vmax([]) == 0.0
    assert shared_vmax([np.zeros((7, 7)), np.full((7, 7), 0.25)]) == 0.25


@pytest.mark.parametrize("count", [1, 3, 20])
def test_panel_width(count):
    tiles = [(_image(40 + i), f"#{i} tumour 0.93") for i in range(count)]
    panel = render_panel(tiles, tile_size=48)
    assert panel.width == 48 * count
    assert panel.height > 48


def test_panel_captions_stay_in_their_tile():
    long = "#1 " + "glioblastoma-multiforme " * 20
    panel = render_panel([(_image(64), long), (_image(64), "")], tile_size=64)
    pixels = np.asarray(panel)
    first, second = pixels[64:, :64], pixels[64:, 64:]
    assert (first < 128).any()  # some text was drawn under the first tile
    assert (second == 255).all()  # and it did not spill into the second


def test_panel_pads_non_square_images():
    panel = render_panel([(Image.new("RGB", (100, 50), "red"), "wide")], tile_size=64)
    assert panel.width == 64
    with pytest.raises(ValueError):
        render_panel([])
