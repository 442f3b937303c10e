"""Mask-guided fine-tuning (``--mask-guidance``): the loss, the shared augmentation, training, the CLI."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cbr.cli import cli
from cbr.data.dataset import read_dataset
from cbr.learn.augmentation import Augmented, decode_all, make_augmentation
from cbr.learn.config import TrainConfig, TrainError
from cbr.learn.guidance import guidance_penalty, guided_logits, layercam, lesion_masks, outside_share
from cbr.learn.train import train_model
from cbr.models.embedder import create_embedder, load_checkpoint

FAST = TrainConfig(backbone="tinycnn", weights="none", img_size=64, batch_size=8, num_workers=0, val_fraction=0,
                   patience=0)


def _lesions(root, n, *, seed, masks=True):
    """Two classes told apart by the lesion's grey level, with a stronger shortcut outside it:
    a corner block, bright for class a and dark for class b. A classifier can use either; only
    guidance says which one the map should show."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    rows = []
    for i in range(n):
        label = "ab"[i % 2]
        img = rng.normal(60, 8, (64, 64)).clip(0, 255)
        cx, cy = rng.integers(27, 53, 2)
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
        img[lesion] = 170 if label == "a" else 110
        img[2:16, 2:16] = 250 if label == "a" else 20
        Image.fromarray(img.astype(np.uint8)).convert("RGB").save(root / f"{i}.png")
        Image.fromarray((lesion * 255).astype(np.uint8)).save(root / f"{i}_mask.png")
        rows.append({"path": f"{i}.png", "label": label, "patient": f"p{i}", **({"mask": f"{i}_mask.png"} if masks else {})})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


def _head_logits(acts):
    """A pooled linear head: class 0 weighs channel 0 up and channel 1 down, class 1 the reverse."""
    w = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    return acts.mean((2, 3)) @ w.T


def _two_spots():
    """Activations (1, 2, 4, 4): channel 0 in cell (1, 1), channel 1 in cell (3, 3); the mask
    (8 x 8 pixels, 2 x 2 per cell) covers cell (1, 1) only."""
    acts = torch.zeros(1, 2, 4, 4)
    acts[0, 0, 1, 1], acts[0, 1, 3, 3] = 2.0, 3.0
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    mask[0, 0, 2:4, 2:4] = 1
    return acts.requires_grad_(), mask


def test_outside_share_is_zero_inside_the_mask_and_one_outside():
    acts, mask = _two_spots()
    logits = _head_logits(acts)
    inside = layercam(acts, logits, torch.tensor([0]))  # class 0's evidence: channel 0, inside
    outside = layercam(acts, _head_logits(acts), torch.tensor([1]))  # class 1's: channel 1, outside
    assert inside[0, 1, 1] > 0 and inside.sum() == inside[0, 1, 1]
    assert outside_share(inside, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert outside_share(outside, mask).item() == pytest.approx(1.0, abs=1e-4)
    half = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    half[0, 0, 2:3, 2:4] = 1  # half of cell (1, 1): half of its mass counts as outside
    assert outside_share(inside, half).item() == pytest.approx(0.5, abs=1e-4)


def test_the_penalty_has_a_gradient_towards_the_mask():
    acts, mask = _two_spots()
    acts = acts.detach()
    acts[0, 1, 1, 1] = 1.0  # a quarter of class 1's map inside the lesion
    acts.requires_grad_()
    share = outside_share(layercam(acts, _head_logits(acts), torch.tensor([1])), mask)
    assert share.item() == pytest.approx(0.75, abs=1e-4)
    share.sum().backward()
    g = acts.grad
    assert torch.isfinite(g).all()
    # lowering the share: less of channel 1 outside, more of it inside the lesion
    assert g[0, 1, 3, 3] > 0 and g[0, 1, 1, 1] < 0


def test_the_penalty_trains_the_trunk_and_the_head():
    model = create_embedder("tinycnn", weights="none", input_size=32, class_names=["a", "b"], seed=0, device="cpu")
    x = torch.randn(4, 3, 32, 32)
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 4:12, 4:12] = 1
    _, penalty = guidance_penalty(model, x, torch.tensor([0, 1, 0, 1]), masks, torch.ones(4, dtype=torch.bool))
    assert 0 < penalty.item() <= 1
    penalty.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("trunk."))
    assert grads["head.weight"] is not None and grads["head.weight"].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_images_without_a_mask_add_nothing():
    model = create_embedder("tinycnn", weights="none", input_size=32, class_names=["a", "b"], seed=0, device="cpu")
    model.eval()  # BatchNorm in training mode would couple the images of a batch
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks[0, :, 4:12, 4:12] = 1
    has = torch.tensor([True, False])
    _, both = guidance_penalty(model, x, y, masks, has)
    _, alone = guidance_penalty(model, x[:1], y[:1], masks[:1], has[:1])
    assert both.item() == pytest.approx(alone.item() / 2, rel=1e-5)  # a mean over the batch: the second adds 0
    masks[1] = 1 - masks[1]  # whatever the unflagged image's mask holds, it is not used
    assert guidance_penalty(model, x, y, masks, has)[1].item() == pytest.approx(both.item(), rel=1e-6)
    _, none = guidance_penalty(model, x, y, masks, torch.tensor([False, False]))
    assert none.item() == 0


@pytest.mark.slow
def test_mask_and_image_get_the_same_flip_and_warp():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, :16] = 255  # left half bright
    mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
    mask[:, :, :16] = 1  # the left half is the lesion
    data = Augmented(img[None].repeat(40, 1, 1, 1), [0] * 40, make_augmentation(False), mask[None].repeat(40, 1, 1, 1),
                     torch.ones(40, dtype=torch.bool))
    torch.manual_seed(0)
    flipped = 0
    for i in range(len(data)):
        x, y, m, has = data[i]
        assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32) and y == 0 and has
        assert set(m.unique().tolist()) <= {0, 1}  # nearest neighbour: still a mask
        bright = x.float().mean(0) > 100
        assert (bright == m[0].bool()).float().mean() > 0.95  # the lesion moved with its pixels
        flipped += m[0, :, :16].float().mean().item() < 0.5
    assert 5 < flipped < 35  # half of them mirrored, so the check above could fail


def test_lesion_masks_flags_empty_and_unreadable_masks(tmp_path):
    manifest = _lesions(tmp_path / "d", 4, seed=0)
    (tmp_path / "d" / "1_mask.png").write_bytes(b"not a png")
    Image.new("L", (64, 64)).save(tmp_path / "d" / "2_mask.png")  # empty: no lesion to point at
    records = read_dataset(manifest).records
    masks, has, problems = lesion_masks(records, 32)
    assert masks.shape == (4, 1, 32, 32) and has.tolist() == [True, False, False, True]
    assert [p.path.endswith("1_mask.png") and not p.skipped for p in problems] == [True]


def _outside_share(path, manifest):
    """Mean outside-lesion share of the true class's LayerCAM over ``manifest``'s images."""
    model, _ = load_checkpoint(path)
    model.eval()
    records = read_dataset(manifest).records
    size = model.config.input_size
    kept, cache, _ = decode_all(records, size, num_workers=0)
    masks, _, _ = lesion_masks([records[i] for i in kept], size)
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.config.std).view(1, 3, 1, 1) * 255
    y = torch.tensor([model.config.class_names.index(records[i].label) for i in kept])
    logits, acts = guided_logits(model, (cache.float() - mean) / std)
    right = (logits.argmax(1) == y).float().mean().item()
    return outside_share(layercam(acts, logits, y, create_graph=False), masks).mean().item(), right


@pytest.mark.slow
def test_guidance_moves_the_map_into_the_lesion(tmp_path):
    train = _lesions(tmp_path / "train", 24, seed=0)
    test = _lesions(tmp_path / "test", 16, seed=1)
    plain = train_model(train, tmp_path / "plain.pt", replace(FAST, epochs=15))
    guided = train_model(train, tmp_path / "guided.pt", replace(FAST, epochs=15, mask_guidance=5.0))
    out_plain, acc_plain = _outside_share(plain.path, test)
    out_guided, acc_guided = _outside_share(guided.path, test)
    assert out_guided < out_plain - 0.2, (out_plain, out_guided)
    assert acc_guided >= 0.9 and acc_plain >= 0.9
    assert guided.history[-1]["guidance"] < guided.history[0]["guidance"]


def test_checkpoint_records_the_guidance(tmp_path):
    manifest = _lesions(tmp_path / "d", 8, seed=0)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    for row in rows[::2]:
        row["mask"] = ""  # half the images have no mask
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = train_model(manifest, tmp_path / "m.pt", replace(FAST, img_size=32, epochs=1, mask_guidance=0.5))
    options = load_checkpoint(r.path)[1]["extra"]["options"]
    assert options["mask_guidance"] == 0.5 and options["masked_images"] == r.masked_images == 4
    off = train_model(manifest, tmp_path / "off.pt", replace(FAST, img_size=32, epochs=1))
    options = load_checkpoint(off.path)[1]["extra"]["options"]
    assert options["mask_guidance"] == 0 and options["masked_images"] is None and "guidance" not in off.history[0]


def test_negative_weight_is_refused():
    with pytest.raises(TrainError, match="--mask-guidance"):
        replace(FAST, mask_guidance=-1.0).check()


CLI_FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8",
            "--workers", "0"]


def test_cli_train_with_mask_guidance(tmp_path):
    manifest = _lesions(tmp_path / "d", 8, seed=0)
    result = CliRunner().invoke(cli, ["train", str(manifest), "--out", str(tmp_path / "m.pt"), "--val-fraction", "0",
                                      "--mask-guidance", "1", *CLI_FAST])
    assert result.exit_code == 0, result.output
    assert "mask guidance: weight 1, 8 of 8 training images with a lesion mask" in result.output


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_cli_mask_guidance_without_a_mask_column_is_one_line(tmp_path, command):
    manifest = _lesions(tmp_path / "d", 8, seed=0, masks=False)
    extra = ["--out", str(tmp_path / "m.pt")] if command == "train" else ["--folds", "2", "--out", str(tmp_path / "ev")]
    result = CliRunner().invoke(cli, [command, str(manifest), *extra, "--mask-guidance", "1", *CLI_FAST])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --mask-guidance 1:") and "'mask' column" in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_cli_evaluate_refuses_mask_guidance_with_db(tmp_path):
    manifest = _lesions(tmp_path / "d", 4, seed=0)
    result = CliRunner().invoke(cli, ["evaluate", str(manifest), "--db", str(tmp_path / "cases.db"),
                                      "--mask-guidance", "1"])
    assert result.exit_code == 2 and "--mask-guidance" in result.output and "only for cross-validation" in result.output


# --- expert boxes from feedback: stored with the verdict, exported as masks for --mask-guidance ---


@pytest.mark.parametrize("bad", ["20,6,5,30", "1,2,3", "a,b,c,d", "-1,0,4,4", "0.5,0,4,4", "nan,0,4,4"])
def test_a_bad_region_is_refused_naming_the_option(bad):
    from cbr.errors import CbrError
    from cbr.pipeline.audit.feedback import parse_region

    with pytest.raises(CbrError, match="--region"):
        parse_region(bad)
    assert parse_region(" 5, 6,20,30") == parse_region([5, 6, 20, 30]) == [5, 6, 20, 30]
    assert parse_region(None) is None and parse_region("") is None


@pytest.mark.slow
def test_feedback_region_is_stored_and_exported_as_a_mask(runner, indexed, query_set, tmp_path):
    import json

    from conftest import invoke
    from sqlalchemy import select

    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Feedback

    image = read_dataset(query_set).records[0].path
    q = invoke(runner, "query", image, "--db", indexed, "--json", "--out", tmp_path / "reports")
    assert q.exit_code == 0, q.output
    qid = json.loads(q.output)["query_id"]
    r = invoke(runner, "feedback", qid, "--label", "tumour", "--region", "5,6,20,30", "--db", indexed)
    assert r.exit_code == 0, r.output
    assert "expert region x 5-20, y 6-30 kept with the verdict" in r.output
    bad = invoke(runner, "feedback", qid, "--label", "tumour", "--region", "20,6,5,30", "--db", indexed)
    assert bad.exit_code == 1 and bad.output.startswith("Error: --region '20,6,5,30': an empty box")
    assert len(bad.output.strip().splitlines()) == 1
    # a later verdict without a box: its label counts, the earlier box stays the query's box
    assert invoke(runner, "feedback", qid, "--label", "cyst", "--db", indexed).exit_code == 0
    with open_casebase(indexed).read() as s:
        assert [f.region for f in s.scalars(select(Feedback).where(Feedback.query_id == qid).order_by(Feedback.id))] \
            == [[5, 6, 20, 30], None]

    table = invoke(runner, "export", "--what", "regions", "--format", "json", "--db", indexed)
    assert table.exit_code == 0, table.output
    assert [(r["query_id"], r["label"], r["region"]) for r in json.loads(table.output)] == [(qid, "cyst", [5, 6, 20, 30])]
    out = tmp_path / "boxes"
    done = invoke(runner, "export", "--what", "regions", "--masks", out, "--db", indexed)
    assert done.exit_code == 0, done.output
    assert done.output == f"wrote 1 mask(s) and the manifest {out / 'regions.csv'}\n"
    (record,) = read_dataset(out / "regions.csv").records  # the manifest cbr train reads
    assert record.label == "cyst" and record.path == image
    mask = np.asarray(Image.open(record.metadata["mask"]))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2]
    expected = np.zeros_like(mask)
    expected[6:30, 5:20] = 255
    assert (mask == expected).all()
    wrong = invoke(runner, "export", "--what", "feedback", "--masks", out, "--db", indexed)
    assert wrong.exit_code == 2 and "--masks is only used with --what regions" in wrong.output


def test_upgrade_from_0005_adds_the_feedback_region(tmp_path):
    from sqlalchemy import inspect

    from cbr.store.casebase import current, open_casebase, upgrade
    from cbr.store.schema import Model

    db = tmp_path / "old.db"
    upgrade(db, "0005")
    cb = open_casebase(db, migrate=False)
    with cb.engine.connect() as conn:
        assert "region" not in {c["name"] for c in inspect(conn).get_columns("feedback")}
    with cb.write() as s:
        s.add(Model(fingerprint="d" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
    cb.close()
    cb = open_casebase(db)
    with cb.engine.connect() as conn:
        assert "region" in {c["name"] for c in inspect(conn).get_columns("feedback")}
    from sqlalchemy import select

    with cb.read() as s:
        assert s.scalar(select(Model.fingerprint)) == "d" * 64
    assert current(db)["up_to_date"]


def test_cli_evaluate_refuses_mask_guidance_without_training(tmp_path):
    manifest = _lesions(tmp_path / "d", 4, seed=0)
    result = CliRunner().invoke(cli, ["evaluate", str(manifest), "--no-train", "--mask-guidance", "1", *CLI_FAST])
    assert result.exit_code == 2 and "--mask-guidance is a training loss; drop --no-train" in result.output


@pytest.mark.slow
def test_cli_evaluate_cross_validates_with_mask_guidance(tmp_path):
    import json

    manifest = _lesions(tmp_path / "d", 12, seed=0)
    result = CliRunner().invoke(cli, ["evaluate", str(manifest), "--folds", "2", "-k", "3", "--mask-guidance", "2",
                                      "--out", str(tmp_path / "ev"), "--json", *CLI_FAST])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["config"]["mask_guidance"] == 2.0 and len(metrics["folds"]) == 2


@pytest.mark.slow
def test_serve_feedback_carries_a_region(indexed, query_set, tmp_path):
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Feedback

    image = read_dataset(query_set).records[0].path
    cb = open_casebase(indexed, create=False)
    try:
        client = TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")), base_url="http://127.0.0.1:8765")
        with open(image, "rb") as fh:
            q = client.post("/api/queries", files={"image": ("q.png", fh, "image/png")}, data={"k": "3"})
        qid = q.json()["query_id"]
        ok = client.post(f"/api/queries/{qid}/feedback", json={"label": "cyst", "region": [1, 2, 30, 40]})
        assert ok.status_code == 200, ok.text
        assert ok.json()["region"] == [1, 2, 30, 40]
        bad = client.post(f"/api/queries/{qid}/feedback", json={"label": "cyst", "region": [30, 2, 1, 40]})
        assert 400 <= bad.status_code < 500 and "--region" in bad.text
        with cb.read() as s:
            assert s.scalars(select(Feedback.region).where(Feedback.query_id == qid)).all() == [[1, 2, 30, 40]]
        page = client.get(f"/queries/{qid}")
        assert page.status_code == 200 and 'name="region"' in page.text  # the form's box field
    finally:
        cb.close()


def test_lesion_masks_follow_the_models_crop(tmp_path):
    from cbr.data.crop import model_view
    from cbr.data.records import Record

    img = np.zeros((64, 96), dtype=np.uint8)
    img[10:54, 30:90] = 90  # the foreground: a crop cuts the black border away
    img[20:30, 40:55] = 230  # the lesion
    mask = np.zeros_like(img)
    mask[20:30, 40:55] = 255
    Image.fromarray(img).convert("RGB").save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    record = Record(str(tmp_path / "x.png"), "a", None, {"mask": str(tmp_path / "m.png")}, "0" * 64)
    view = np.asarray(model_view(Image.open(tmp_path / "x.png").convert("RGB"), 32, "foreground"))[:, :, 0] > 160
    masks, has, _ = lesion_masks([record], 32, crop="foreground")
    plain, _, _ = lesion_masks([record], 32)
    assert has.tolist() == [True]

    def iou(m):
        m = m[0, 0].numpy().astype(bool)
        return (m & view).sum() / (m | view).sum()

    assert iou(masks) > 0.8  # on the lesion's pixels in the cropped view
    assert iou(plain) < 0.5  # letterboxed without the crop, it would be elsewhere
