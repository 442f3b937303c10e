"""Fine-tuning: checkpoint contents, determinism, grouped validation split, clear errors."""

import csv
from dataclasses import replace

import pytest
import torch

from cbr.data.dataset import read_dataset
from cbr.models.embedder import load_checkpoint
from cbr.errors import CbrError, DatasetError, UnknownNameError
from cbr.data.phantom import make_phantoms
from cbr.learn.train import TrainConfig, TrainError, is_grayscale, make_augmentation, train_model, trunk_stages

FAST = TrainConfig(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("ph"), patients=9, slices=2, size=48)


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model.pt"
    return train_model(phantoms, out, replace(FAST, epochs=2, val_fraction=0.34))


@pytest.mark.slow
def test_checkpoint_has_classes_training_images_and_fingerprint(trained, phantoms):
    emb, rest = load_checkpoint(trained.path)
    scan = read_dataset(phantoms)
    assert emb.config.class_names == ("cyst", "normal", "tumour") == tuple(trained.class_names)
    assert emb.config.backbone == "tinycnn" and emb.config.input_size == 32
    assert emb.head is not None and emb.head.out_features == 3
    assert set(rest["train_sha256"]) == {r.sha256 for r in scan.records}
    assert emb.fingerprint == trained.fingerprint
    assert rest["extra"]["history"] == trained.history
    assert trained.train_size + trained.val_size == len(scan.records)
    assert trained.epochs_run == len(trained.history) == 2
    assert 1 <= trained.best_epoch <= trained.epochs_run
    assert trained.grayscale  # phantoms are grey: no colour jitter
    for row in trained.history:
        assert set(row) >= {"epoch", "loss", "val_accuracy", "val_balanced_accuracy"}
        assert 0 <= row["val_balanced_accuracy"] <= 1


def test_validation_split_is_grouped_by_patient(trained):
    assert trained.grouped  # the phantoms' manifest has a patient column
    assert trained.val_size > 0
    assert trained.train_groups and trained.val_groups
    assert not set(trained.train_groups) & set(trained.val_groups)


def test_same_seed_same_weights(phantoms, tmp_path):
    a = train_model(phantoms, tmp_path / "a.pt", replace(FAST, epochs=1, seed=3))
    b = train_model(phantoms, tmp_path / "b.pt", replace(FAST, epochs=1, seed=3))
    assert a.fingerprint == b.fingerprint
    assert a.history == [dict(r, seconds=r2["seconds"]) for r, r2 in zip(b.history, a.history)]
    sa = load_checkpoint(a.path)[0].state_dict()
    sb = load_checkpoint(b.path)[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_seed_holds_out_the_same_images_for_another_seed(phantoms, tmp_path):
    """A deep ensemble's members: other weights, one validation split (it calibrates the ensemble)."""
    cfg = replace(FAST, epochs=1, val_fraction=0.34)
    a = train_model(phantoms, tmp_path / "a.pt", cfg)
    b = train_model(phantoms, tmp_path / "b.pt", replace(cfg, seed=1, split_seed=0))
    c = train_model(phantoms, tmp_path / "c.pt", replace(cfg, seed=1))
    assert a.fingerprint != b.fingerprint
    assert a.val_groups == b.val_groups and a.val_groups != c.val_groups
    val = {n: load_checkpoint(r.path)[1]["extra"]["val_sha256"] for n, r in zip("abc", (a, b, c))}
    assert val["a"] == val["b"] and set(val["a"]) != set(val["c"])
    assert load_checkpoint(b.path)[1]["extra"]["options"]["split_seed"] == 0


@pytest.mark.parametrize("field", ["seed", "split_seed"])
def test_negative_seed_is_refused_before_any_work(field):
    """numpy's generators take no negative seed: refused by name, not by a traceback after decoding."""
    with pytest.raises(TrainError, match=f"--{field.replace('_', '-')} -1"):
        replace(FAST, **{field: -1}).check()


def test_train_layers_freezes_the_leading_blocks(phantoms, tmp_path):
    from cbr.models.embedder import create_embedder

    # tinycnn's stages end with block4's conv, BatchNorm and ReLU: the last 3 stages hold one conv
    r = train_model(phantoms, tmp_path / "m.pt", replace(FAST, epochs=1, train_layers=3))
    before = create_embedder("tinycnn", weights="none", input_size=32, class_names=r.class_names)
    after = load_checkpoint(r.path)[0]
    stages_before, stages_after = trunk_stages(before.trunk), trunk_stages(after.trunk)
    conv = [i for i, m in enumerate(stages_before) if isinstance(m, torch.nn.Conv2d)]
    assert conv[-1] == len(stages_before) - 3
    for i in conv[:-1]:  # every earlier conv is frozen
        assert torch.equal(stages_before[i].weight, stages_after[i].weight), i
    assert not torch.equal(stages_before[conv[-1]].weight, stages_after[conv[-1]].weight)  # the last one learnt
    assert not torch.equal(before.head.weight, after.head.weight)  # the head learnt


def test_bad_file_is_skipped_and_listed(tmp_path):
    manifest = make_phantoms(tmp_path / "ph", patients=6, slices=2, size=40)
    (tmp_path / "ph" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with open(manifest, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["images/broken.png", "normal", "P999", "", "0"])
    r = train_model(manifest, tmp_path / "m.pt", replace(FAST, epochs=1))
    assert [p.path for p in r.problems if p.path.endswith("broken.png")]
    assert r.train_size + r.val_size == 12


def test_single_class_is_a_clear_error(tmp_path):
    manifest = make_phantoms(tmp_path / "ph", patients=3, slices=1, size=32, classes=("tumour",))
    with pytest.raises(DatasetError, match="only one class .*at least 2 classes"):
        train_model(manifest, tmp_path / "m.pt", FAST)


def test_unknown_backbone_and_unwritable_out(phantoms, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown backbone 'nope'; choose from .*mobilenet_v2"):
        train_model(phantoms, tmp_path / "m.pt", TrainConfig(backbone="nope"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainError, match="cannot create the folder"):
        train_model(phantoms, blocker / "m.pt", FAST)
    with pytest.raises(TrainError, match="is a folder"):
        train_model(phantoms, tmp_path, FAST)
    with pytest.raises(CbrError, match="--epochs 0"):
        train_model(phantoms, tmp_path / "m.pt", replace(FAST, epochs=0))


def test_grayscale_detection_and_colour_jitter():
    grey = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8).expand(4, 3, 16, 16).contiguous()
    colour = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert is_grayscale(grey) and not is_grayscale(colour)
    mostly_grey = torch.cat([grey.repeat(5, 1, 1, 1), colour[:1]])  # 1 tinted image in 21
    assert is_grayscale(mostly_grey)
    jitter = [t for t in make_augmentation(True).transforms if type(t).__name__ == "ColorJitter"][0]
    assert jitter.saturation is None and jitter.hue is None
    jitter = [t for t in make_augmentation(False).transforms if type(t).__name__ == "ColorJitter"][0]
    assert jitter.saturation is not None and jitter.hue is not None
    # Augmenting a grey image keeps it grey.
    torch.manual_seed(0)
    out = make_augmentation(True)(grey[0])
    assert out.dtype == torch.uint8 and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def _class_folders(root, per_class=4):
    """A class-folder dataset (no patient ids): every image is a group of its own."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_split_by_image_without_patient_ids(tmp_path):
    r = train_model(_class_folders(tmp_path / "data"), tmp_path / "m.pt", replace(FAST, val_fraction=0.5, epochs=1))
    assert not r.grouped and r.val_size > 0
    assert all(g.startswith("<image ") for g in r.train_groups + r.val_groups)
    assert "grouped" not in r.to_dict()  # --json is unchanged


def test_device_selection(tmp_path):
    from cbr.models.device import DeviceError, resolve_device
    from cbr.models.embedder import default_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device() == default_device() == expected
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda: CUDA is not available on this machine; use --device cpu"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="--device cuda"):
            train_model(None, tmp_path / "m.pt", replace(FAST, device="cuda"))
