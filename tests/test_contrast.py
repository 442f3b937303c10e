"""Contrast normalisation (equalize, CLAHE): the pixels, the model's config and fingerprint, the CLI."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cbr.data.contrast import CONTRASTS, apply_contrast
from cbr.errors import UnknownNameError
from conftest import TINY, invoke


def _dim_grey(seed=0, shape=(120, 90)):
    a = (np.random.default_rng(seed).random(shape) * 60 + 20).astype(np.uint8)  # grey levels 20-80 only
    return Image.fromarray(a).convert("RGB")


@pytest.mark.parametrize("name", [n for n in CONTRASTS if n != "none"])
def test_equalisation_spreads_grey_levels_and_keeps_grey(name):
    out = np.asarray(apply_contrast(_dim_grey(), name, 64)).astype(int)
    assert out.shape == (64, 48, 3)  # shrunk to fit the input side, aspect kept
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.max() - out.min() > 150


def test_colour_keeps_its_hue():
    from skimage import color

    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = np.linspace(40, 90, 40).astype(np.uint8)[None, :]  # dim reds
    rgb[..., 1] = rgb[..., 0] // 3
    out = np.asarray(apply_contrast(Image.fromarray(rgb), "equalize", 64)) / 255.0
    h_in, h_out = color.rgb2hsv(rgb / 255.0)[..., 0], color.rgb2hsv(out)[..., 0]
    assert np.abs(h_in - h_out).max() < 0.02
    assert out[..., 0].max() > 0.9


def test_none_and_flat_images_are_left_alone():
    img = _dim_grey()
    assert apply_contrast(img, "none", 64) is img
    flat = Image.new("RGB", (30, 30), (50, 50, 50))
    assert np.asarray(apply_contrast(flat, "clahe", 64)).max() == 50
    with pytest.raises(UnknownNameError, match="unknown contrast 'gamma'"):
        apply_contrast(img, "gamma", 64)


def _old_fingerprint(emb):
    # The recipe before contrast existed: a model without contrast must keep this fingerprint.
    c, h = emb.config, hashlib.sha256()
    h.update(f"cbr-embedder\0{c.backbone}\0".encode())
    sd = emb.state_dict()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
    h.update(repr((c.class_names, c.input_size, tuple(c.mean), tuple(c.std), c.target_layer)).encode())
    return h.hexdigest()


@pytest.mark.slow
def test_fingerprint_unchanged_without_contrast_and_changed_with_it():
    from cbr.models.embedder import create_embedder

    plain = create_embedder("tinycnn", weights="none", input_size=32)
    assert plain.config.contrast == "none" and plain.fingerprint == _old_fingerprint(plain)
    clahe = create_embedder("tinycnn", weights="none", input_size=32, contrast="clahe")
    assert clahe.fingerprint != plain.fingerprint
    x_plain, x_clahe = plain.preprocess(_dim_grey()), clahe.preprocess(_dim_grey())
    assert x_plain.shape == x_clahe.shape == (3, 32, 32) and x_clahe.std() > x_plain.std()


@pytest.mark.slow
def test_index_with_contrast_then_query(runner, phantom_set, query_set, tmp_path):
    from sqlalchemy import select

    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Model

    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "none",
                    "--contrast", "clahe")
    assert result.exit_code == 0, result.output
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        assert s.scalar(select(Model)).config["contrast"] == "clahe"
    cb.close()
    image = sorted((query_set.parent / "images").iterdir())[0]
    result = invoke(runner, "query", image, "--db", db, "--explain", "none", "--no-record", "--json")
    assert result.exit_code == 0, result.output  # the member was rebuilt with CLAHE: same fingerprint
    assert len(json.loads(result.output.strip().splitlines()[-1])["neighbours"]) == 5
    bad = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--contrast", "gamma")
    assert bad.exit_code == 2 and "gamma" in bad.output


def test_train_records_contrast_in_the_checkpoint(runner, phantom_set, tmp_path):
    from cbr.models.embedder import load_checkpoint

    out = tmp_path / "m.pt"
    result = invoke(runner, "train", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1",
                    "--img-size", "32", "--workers", "0", "--contrast", "equalize", "--out", out)
    assert result.exit_code == 0, result.output
    emb, _ = load_checkpoint(out)
    assert emb.config.contrast == "equalize"
