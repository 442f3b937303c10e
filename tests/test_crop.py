"""The foreground crop (``--crop foreground``): the box, the model's config and fingerprint, and the
geometry every map and mask must share with the model's input."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from cbr.data.crop import CROPS, MARGIN, crop_box, foreground_box, mask_view, model_view
from cbr.data.image import letterbox
from cbr.errors import UnknownNameError
from conftest import TINY, invoke

W, H = 320, 240
INNER = (90, 50, 250, 190)  # the "anatomy" inside a wide border


def _scan(border, noise=2.0, seed=0, inner=INNER, size=(W, H), colour=False):
    """A textured rectangle ``inner`` on a flat ``border`` colour, with sensor-like noise everywhere."""
    rng = np.random.default_rng(seed)
    a = np.full((size[1], size[0], 3), border, np.float64)
    x0, y0, x1, y1 = inner
    # anatomy: far from the border colour whichever it is (dark on white, bright on black or grey)
    far = 40.0 if np.mean(border) > 127 else 215.0
    tissue = far + rng.normal(0, 25, (y1 - y0, x1 - x0, 1))
    if colour:
        tissue = tissue * np.array([1.0, 0.6, 0.4])
    a[y0:y1, x0:x1] = tissue
    a += rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _close_to(box, inner, tol=3):
    """``box`` is ``inner`` plus the margin, within ``tol`` pixels on every side."""
    x0, y0, x1, y1 = inner
    mx, my = MARGIN * (x1 - x0), MARGIN * (y1 - y0)
    want = (x0 - mx, y0 - my, x1 + mx, y1 + my)
    return all(abs(b - w) <= tol for b, w in zip(box, want))


@pytest.mark.parametrize("border", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (30, 60, 90)],
                         ids=["black", "white", "grey", "tinted"])
@pytest.mark.parametrize("noise", [0.0, 2.5])
def test_box_is_the_foreground_plus_margin_on_any_border(border, noise):
    box = foreground_box(_scan(border, noise))
    assert box is not None and _close_to(box, INNER), box


def test_box_of_a_large_scan_and_of_a_colour_one():
    big = _scan((0, 0, 0), inner=(600, 300, 1500, 1100), size=(2000, 1400), seed=3)
    assert _close_to(foreground_box(big), (600, 300, 1500, 1100), tol=10)  # found on a reduced copy
    assert _close_to(foreground_box(_scan((255, 255, 255), colour=True)), INNER)


def test_a_burnt_in_marker_in_the_border_does_not_stretch_the_box():
    a = np.asarray(_scan((0, 0, 0))).copy()
    a[10:16, 10:16] = 255  # an "R" marker in the corner, as on X-ray exports
    assert _close_to(foreground_box(Image.fromarray(a)), INNER)


def test_flat_speck_whole_and_textured_images_are_not_cropped():
    assert foreground_box(Image.new("RGB", (200, 150), (80, 80, 80))) is None  # flat
    assert foreground_box(_scan((80, 80, 80), inner=(0, 0, 0, 0))) is None  # flat with noise
    speck = _scan((0, 0, 0), inner=(100, 100, 110, 110))  # 0.13% of the image: not the anatomy
    assert foreground_box(speck) is None
    assert foreground_box(_scan((0, 0, 0), inner=(4, 3, W - 4, H - 3))) is None  # fills the image
    # no uniform border: the edges vary like tissue (skin around a lesion is the image itself)
    skin = _scan((180, 140, 120), noise=20.0)
    assert foreground_box(skin) is None


def test_model_view_without_crop_is_the_letterbox_byte_for_byte():
    img = _scan((0, 0, 0), noise=2.0)
    assert model_view(img, 64).tobytes() == letterbox(img, 64).tobytes()
    assert model_view(img, 64, "none", "none").tobytes() == letterbox(img, 64).tobytes()
    flat = Image.new("RGB", (50, 30), (9, 9, 9))  # foreground asked for, nothing to cut: the letterbox
    assert model_view(flat, 32, "foreground").tobytes() == letterbox(flat, 32).tobytes()
    cut = model_view(img, 64, "foreground")
    assert cut.size == (64, 64)
    assert np.asarray(cut).astype(float).mean() > 2 * np.asarray(letterbox(img, 64)).astype(float).mean()
    assert crop_box(img, "none") is None
    with pytest.raises(UnknownNameError, match="unknown crop 'tight'; choose from foreground, none"):
        crop_box(img, "tight")
    assert set(CROPS) == {"none", "foreground"}


def test_mask_of_another_size_gets_the_box_scaled():
    img = _scan((0, 0, 0))
    mask = Image.new("L", (W, H))
    mask.paste(255, (150, 100, 190, 140))
    box = crop_box(img, "foreground")
    full = np.asarray(mask_view(mask.convert("RGB"), 32, box, img.size))[..., 0] > 127
    half = mask.resize((W // 2, H // 2), Image.NEAREST).convert("RGB")
    scaled = np.asarray(mask_view(half, 32, box, img.size))[..., 0] > 127
    assert full.sum() > 0 and (full != scaled).sum() <= 0.1 * full.sum()


@pytest.mark.slow
def test_fingerprint_unchanged_without_crop_and_changed_with_it():
    from cbr.models.embedder import create_embedder
    from test_contrast import _old_fingerprint  # the recipe from before contrast, tta and crop

    plain = create_embedder("tinycnn", weights="none", input_size=32)
    assert plain.config.crop == "none" and plain.fingerprint == _old_fingerprint(plain)
    cropped = create_embedder("tinycnn", weights="none", input_size=32, crop="foreground")
    assert cropped.config.crop == "foreground" and cropped.fingerprint != plain.fingerprint
    img = _scan((0, 0, 0))
    assert not np.allclose(plain.preprocess(img).numpy(), cropped.preprocess(img).numpy())
    # without a crop the model's input is exactly the letterbox, normalised, as before crops existed
    before = (np.asarray(letterbox(img, 32), np.float32).transpose(2, 0, 1) / 255.0
              - np.array(plain.config.mean, np.float32)[:, None, None]) / np.array(plain.config.std, np.float32)[:, None, None]
    np.testing.assert_allclose(plain.preprocess(img).numpy(), before, atol=1e-5)
    with pytest.raises(UnknownNameError, match="unknown crop"):
        create_embedder("tinycnn", weights="none", crop="tight")


def _redness(x, grid=8):
    """A grid x grid 'map' that points where the model's input is red: computed in the model's geometry."""
    r, g = x[0].numpy(), x[1].numpy()
    red = np.clip(r - g, 0, None)
    s = red.shape[0] // grid
    return red[: s * grid, : s * grid].reshape(grid, s, grid, s).mean(axis=(1, 3)).astype(np.float32)


def _padded_phantom(tmp_path):
    """A tumour phantom (its lesion painted red) far off-centre on a wide black canvas, and its mask."""
    from cbr.data.phantom import phantom

    img, mask = phantom(np.random.default_rng(4), "tumour", 96)
    rgb = np.asarray(img.convert("RGB")).copy()
    rgb[mask] = (255, 0, 0)
    canvas = Image.new("RGB", (420, 160))
    canvas.paste(Image.fromarray(rgb), (300, 30))
    mcanvas = Image.new("L", canvas.size)
    mcanvas.paste(Image.fromarray(mask.astype(np.uint8) * 255), (300, 30))
    canvas.save(tmp_path / "scan.png")
    mcanvas.save(tmp_path / "mask.png")
    return tmp_path / "scan.png", tmp_path / "mask.png"


def test_masks_line_up_with_the_maps_of_a_cropped_model(tmp_path):
    from cbr.data.dataset import Record
    from cbr.data.mask import lesion_mask
    from cbr.evaluation.localisation import localisation
    from cbr.evaluation.outcome import Outcome
    from cbr.models.embedder import create_embedder
    from explain.metrics import pointing_game

    scan, mask_path = _padded_phantom(tmp_path)
    emb = create_embedder("tinycnn", weights="none", input_size=64, crop="foreground")
    img = Image.open(scan).convert("RGB")
    assert crop_box(img, "foreground") is not None
    raw = _redness(emb.preprocess(img))  # where the lesion is in what the model sees
    aligned = lesion_mask(str(mask_path), 64, crop="foreground", image=str(scan))
    assert pointing_game(raw, aligned)
    # the mask letterboxed without the image's crop lies elsewhere: the map would miss it
    assert not pointing_game(raw, lesion_mask(str(mask_path), 64))
    assert (lesion_mask(str(mask_path), 64, crop="foreground", image=img) == aligned).all()
    with pytest.raises(ValueError, match="needs the mask's image"):
        lesion_mask(str(mask_path), 64, crop="foreground")
    # the evaluation's localisation figures place the masks by the model's crop
    rec = Record(path=str(scan), label="tumour", group=None, metadata={"mask": str(mask_path)}, sha256="x")
    out = Outcome(record=rec, prediction={"abstained": False, "label": "tumour"}, neighbours=[],
                  maps={"class:tumour": raw})
    assert localisation([out], 64, emb.config)["pointing_game"] == 1.0
    assert localisation([out], 64, None)["pointing_game"] == 0.0
    # with the crop off, the old geometry: the mask is the plain letterbox, and the map of a
    # no-crop model lines up with it
    plain = create_embedder("tinycnn", weights="none", input_size=256)  # the lesion stays a few pixels wide
    assert pointing_game(_redness(plain.preprocess(img), 32), lesion_mask(str(mask_path), 256, crop="none", image=img))


@pytest.mark.slow
def test_report_overlays_use_the_models_crop(runner, tmp_path):
    from cbr.data.phantom import make_phantoms
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder
    from explain.overlay import render_overlay

    manifest = make_phantoms(tmp_path / "ph", patients=6, slices=1, size=48, seed=0)
    padded = tmp_path / "padded"
    (padded / "images").mkdir(parents=True)
    rows = [",".join(row.split(",")[:3]) for row in manifest.read_text().splitlines()]  # path,label,patient_id
    for row in rows[1:]:
        rel = row.split(",")[0]
        canvas = Image.new("L", (200, 80))  # the phantom far right on a wide black border
        canvas.paste(Image.open(manifest.parent / rel), (140, 16))
        canvas.save(padded / rel)
    (padded / "manifest.csv").write_text("\n".join(rows) + "\n")
    ckpt = tmp_path / "crop.pt"
    save_checkpoint(create_embedder("tinycnn", weights="none", input_size=32, crop="foreground"), ckpt)
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", padded / "manifest.csv", "--db", db, "--model", ckpt, "--workers", "0",
                    "--explain", "gradcam")
    assert result.exit_code == 0, result.output
    query = padded / rows[1].split(",")[0]
    result = invoke(runner, "query", query, "--db", db, "--explain", "gradcam", "--json", "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    shown = np.asarray(Image.open(answer["explanation"]).convert("RGB")).astype(float)
    from cbr.reporting.report import load_record
    from cbr.store.casebase import open_casebase

    cb = open_casebase(db, create=False)
    rec = load_record(cb, answer["query_id"])
    cb.close()
    assert rec["members"][0]["crop"] == "foreground"
    qmap = next(m for m in rec["members"][0]["query_maps"] if m["target"].startswith("similarity"))
    img = Image.open(query).convert("RGB")
    views = {c: np.asarray(render_overlay(model_view(img, 224, c), qmap["map"])).astype(float) for c in CROPS}
    err = {c: np.abs(shown - v).mean() for c, v in views.items()}
    assert err["foreground"] < 6 < err["none"], err  # JPEG noise only, against another geometry


def test_checkpoint_records_the_crop_and_index_applies_it(runner, phantom_set, tmp_path):
    from sqlalchemy import select

    from cbr.models.embedder import load_checkpoint
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Model

    out = tmp_path / "m.pt"
    result = invoke(runner, "train", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1",
                    "--img-size", "32", "--workers", "0", "--crop", "foreground", "--out", out)
    assert result.exit_code == 0, result.output
    emb, _ = load_checkpoint(out)
    assert emb.config.crop == "foreground"
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, "--model", out, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        model = s.scalar(select(Model))
        assert model.config["crop"] == "foreground" and model.fingerprint == emb.fingerprint
    cb.close()
    bad = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--crop", "tight")
    assert bad.exit_code == 2 and "'tight' is not one of 'none', 'foreground'" in bad.output


@pytest.mark.slow
def test_crop_option_on_every_command_and_its_checks(runner, phantom_set, tmp_path):
    for command in ("train", "evaluate", "index"):
        result = invoke(runner, command, "--help")
        assert result.exit_code == 0 and "--crop [none|foreground]" in result.output
    # guidance masks follow the crop (tests/test_mask_guidance.py checks the geometry), so the two combine
    result = invoke(runner, "train", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1",
                    "--crop", "foreground", "--mask-guidance", "1", "--out", tmp_path / "g.pt")
    assert result.exit_code == 0, result.output
    assert "mask guidance: weight 1" in result.output
    out = tmp_path / "rep"
    result = invoke(runner, "evaluate", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--no-train",
                    "--img-size", "32", "--folds", "2", "--workers", "0", "--explain", "gradcam", "--crop", "foreground",
                    "--out", out, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["crop"] == "foreground"
    assert metrics["localisation"] is not None and metrics["localisation"]["n"] > 0


def test_a_region_drawn_on_the_served_square_maps_back_through_the_crop(tmp_path):
    from types import SimpleNamespace

    from cbr.serve.workbench import Workbench

    scan = tmp_path / "scan.png"
    _scan((0, 0, 0)).save(scan)
    box = crop_box(Image.open(scan), "foreground")
    from cbr.pipeline.finding_search import NoFindingsError

    saved, asked = [], []

    def no_findings(image, **kw):  # a case base without findings: the box's pixels become an image
        asked.append(kw)
        if kw.get("region") is not None:
            raise NoFindingsError("no findings")
        return SimpleNamespace(notes=[])

    for crop, whole in (("foreground", box), ("none", (0, 0, W, H))):
        wb = SimpleNamespace(window="auto", crop=crop, _parent=lambda qid: (str(scan), None, 5, "weighted", "none"),
                             decode=lambda path: (Image.open(path).convert("RGB"), None, None),
                             save_upload=lambda data, name: saved.append(Image.open(io.BytesIO(data))),
                             query=no_findings, _link=lambda answer, detail: None)
        _, detail = Workbench.refine_region(wb, 1, (0, 0, 1, 1))  # the whole square the page shows
        assert tuple(detail["pixels"]) == whole and saved[-1].size == (whole[2] - whole[0], whole[3] - whole[1])
        assert asked[-2]["region"] == list(whole)  # searched by finding first
    wb.query = lambda image, **kw: asked.append(dict(kw, image=image)) or SimpleNamespace(notes=[])
    Workbench.refine_region(wb, 1, (0, 0, 1, 1))  # with findings: the parent's image, its box searched
    assert asked[-1]["image"] == str(scan) and asked[-1]["region"] == [0, 0, W, H] and len(saved) == 2
    # the left half of the square, in the cropped view: the left half of the box
    wb.crop = "foreground"
    _, detail = Workbench.refine_region(wb, 1, (0, 0, 0.5, 1))
    side = max(box[2] - box[0], box[3] - box[1])
    pad_x = (side - (box[2] - box[0])) / 2
    assert abs(detail["pixels"][2] - (box[0] + side / 2 - pad_x)) <= 1 and detail["pixels"][0] == box[0]
