"""Embedder registry, trunk/neck/head split, fingerprints and checkpoints, on random weights.

Timing note (not a test): mobilenet_v2, 224 px, batch 32, inference_mode, torch 2.14.1, 2 CPU cores
shared with other jobs, interleaved runs, best time: contiguous 1.44-1.56 s (20-22 img/s),
channels_last 1.09 s (29 img/s); under heavier load 3.9 vs 2.4 s and 7.7 vs 5.7 s. Hence
CHANNELS_LAST_ON_CPU in cbr/embedder.py.
"""

import dataclasses
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cbr.models.backbones import BACKBONES
from cbr.models.checkpoint import CheckpointError, save_checkpoint
from cbr.models.config import ModelConfig
from cbr.models.embedder import Embedder, UnknownLayerError, create_embedder, default_device, load_checkpoint
from cbr.errors import CbrError, ModelMismatchError, NotFoundError, UnknownNameError, WeightsNotFoundError

_CACHE = {}


def small_size(name):
    return max(64, BACKBONES[name].min_input_size)


def random_model(name, seed=0):
    """Random-init models at a small input size, built once per (name, seed) for speed."""
    key = (name, seed)
    if key not in _CACHE:
        _CACHE[key] = create_embedder(name, weights="none", input_size=small_size(name), seed=seed)
    return _CACHE[key]


@pytest.fixture(scope="module", autouse=True)
def _clear_cache():
    yield
    _CACHE.clear()


def torchvision_pooled(emb, x):
    """torchvision's own forward up to the classifier, with ``emb``'s weights (None for tinycnn).

    The reference model is built on the meta device and takes emb's tensors by assignment, so
    it costs one forward pass and no initialisation.
    """
    import torchvision.models

    name = emb.config.backbone
    if not hasattr(torchvision.models, name) or name == "tinycnn":
        return None
    kwargs = {}
    if name == "inception_v3":
        kwargs = {"aux_logits": False, "transform_input": True, "init_weights": False}
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)(weights=None, **kwargs)
    sd = {}
    for k, v in emb.state_dict().items():
        k = k.removeprefix("trunk.")
        sd[k.replace("neck.norm.", "classifier.0.")] = v
    missing, unexpected = ref.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and all(k.startswith(("fc.", "classifier.")) for k in missing), missing
    identity = torch.nn.Identity()
    if hasattr(ref, "fc"):
        ref.fc = identity
    elif name == "convnext_tiny":
        ref.classifier[2] = identity  # keep its LayerNorm: our neck includes it
    else:
        ref.classifier = identity
    if name.startswith("vgg"):
        ref.avgpool = torch.nn.AdaptiveAvgPool2d(1)  # torchvision pools to 7x7 for its classifier
    with torch.no_grad():
        return ref.eval()(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_shapes_and_fingerprint(name):
    spec = BACKBONES[name]
    emb = random_model(name)
    assert isinstance(emb, Embedder) and not emb.training
    assert emb.config.embedding_dim == spec.embedding_dim and emb.head is None
    s = emb.config.input_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():  # features() is forward() plus the activations: one pass tests both
        acts, out = emb.features(x)
        pooled = emb.neck(acts)
    assert out.shape == (2, spec.embedding_dim) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert acts.ndim == 4 and acts.shape[:2] == (2, spec.embedding_dim)
    torch.testing.assert_close(pooled / pooled.norm(dim=1, keepdim=True), out)
    reference = torchvision_pooled(emb, x)  # the split loses nothing of torchvision's model
    if reference is not None:
        torch.testing.assert_close(pooled, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())

    assert emb.target_module() is emb.trunk  # default target layer = the trunk output

    # Same seed -> same weights and fingerprint; another seed -> another model.
    again = create_embedder(name, weights="none", input_size=s, seed=0)
    assert again.fingerprint == emb.fingerprint
    assert random_model(name, seed=1).fingerprint != emb.fingerprint


@pytest.mark.slow
def test_fingerprint_same_in_new_process():
    emb = create_embedder("tinycnn", weights="none", seed=3)
    code = (
        "from cbr.models.embedder import create_embedder;"
        "print(create_embedder('tinycnn', weights='none', seed=3).fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == emb.fingerprint


def test_fingerprint_covers_preprocessing_and_classes():
    base = create_embedder("tinycnn", weights="none")
    assert len(base.fingerprint) == 64
    assert create_embedder("tinycnn", weights="none", input_size=32).fingerprint != base.fingerprint
    assert create_embedder("tinycnn", weights="none", target_layer="block3").fingerprint != base.fingerprint
    assert create_embedder("tinycnn", weights="none", class_names=["a", "b"]).fingerprint != base.fingerprint


def test_fingerprint_ignores_memory_format_and_follows_weights():
    emb = create_embedder("tinycnn", weights="none")
    fp = emb.fingerprint
    emb.to(memory_format=torch.contiguous_format)
    assert emb.fingerprint == fp
    emb.train()
    with torch.no_grad():
        emb.trunk.block1[0].weight.add_(1.0)
    emb.eval()
    assert emb.fingerprint != fp


def test_head_logits_and_classifier_head():
    emb = create_embedder("tinycnn", weights="none", class_names=["benign", "malignant", "normal"])
    x = torch.randn(2, 3, 64, 64)
    logits = emb.logits(x)
    assert logits.shape == (2, 3)
    with torch.no_grad():
        acts, _ = emb.features(x)
        torch.testing.assert_close(emb.classifier_head()(acts), logits.detach())
    with pytest.raises(CbrError, match="no classification head"):
        create_embedder("tinycnn", weights="none").logits(x)


def test_embed_and_features_backpropagate_through_neck():
    emb = create_embedder("tinycnn", weights="none")
    x = torch.randn(2, 3, 64, 64)
    out = emb.embed(x)
    assert not out.requires_grad and out.device.type == "cpu"
    torch.testing.assert_close(out, emb(x).detach())
    with torch.no_grad():
        acts, _ = emb.features(torch.randn(1, 3, 64, 64))
    acts = acts.clone().requires_grad_(True)
    emb.neck(acts).sum().backward()
    assert acts.grad is not None and acts.grad.abs().sum() > 0


def test_target_layer():
    emb = create_embedder("resnet18", weights="none", input_size=64, target_layer="layer4.1")
    assert emb.target_module() is emb.trunk.layer4[1]
    with pytest.raises(UnknownLayerError) as exc:
        create_embedder("resnet18", weights="none", input_size=64, target_layer="layer5")
    msg = str(exc.value)
    assert msg.startswith("unknown target layer 'layer5' for resnet18")
    assert "'layer4'" in msg and len(msg) < 300
    assert isinstance(exc.value, CbrError)


def test_unknown_backbone_and_weights():
    with pytest.raises(UnknownNameError) as exc:
        create_embedder("resnet19")
    assert str(exc.value).startswith("unknown backbone 'resnet19'; choose from ")
    assert "tinycnn" in str(exc.value) and "resnet18" in str(exc.value)
    with pytest.raises(UnknownNameError, match="unknown weights 'random'; choose from imagenet, none"):
        create_embedder("tinycnn", weights="random")


def test_tinycnn_has_no_imagenet_weights():
    with pytest.raises(WeightsNotFoundError, match="tinycnn has no ImageNet weights.*--weights none"):
        create_embedder("tinycnn", weights="imagenet")


def test_input_size_too_small():
    with pytest.raises(CbrError, match="too small for inception_v3; use at least 75"):
        create_embedder("inception_v3", weights="none", input_size=64)


def test_none_kwargs_keep_defaults():
    emb = create_embedder("tinycnn", weights="none", input_size=None, target_layer=None, seed=None)
    assert emb.config == ModelConfig(
        backbone="tinycnn", weights="none", input_size=64, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), embedding_dim=64,
    )  # fmt: skip


def test_a_stored_config_rebuilds_the_same_model(tmp_path):
    emb = create_embedder("tinycnn", weights="none", class_names=["a", "b"], seed=5, target_layer="block3",
                          tta="flip", crop="foreground")
    again = create_embedder("tinycnn", config=ModelConfig.from_dict(emb.config.to_dict()))
    assert again.config == emb.config and again.fingerprint == emb.fingerprint
    assert create_embedder("tinycnn", config=emb.config, seed=6).config.seed == 6  # an override wins
    path = tmp_path / "m.pt"
    save_checkpoint(emb, path)
    moved = dataclasses.replace(load_checkpoint(path)[0].config, target_layer="block4")
    assert create_embedder(path, config=moved).config == moved  # a checkpoint takes its settings
    with pytest.raises(CbrError, match="class names and seed are fixed by the checkpoint"):
        create_embedder(path, seed=3)


def test_unknown_setting_names_the_choices():
    with pytest.raises(TypeError, match="unknown settings colour, mean; choose from weights, input_size, "):
        create_embedder("tinycnn", weights="none", mean=(0, 0, 0), colour="red")


def test_config_json_round_trip():
    cfg = create_embedder("tinycnn", weights="none", class_names=["a", "b"], seed=5).config
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_preprocess_letterbox_and_normalise():
    emb = create_embedder("tinycnn", weights="none")  # 64 px
    img = Image.new("RGB", (128, 64), (255, 255, 255))  # wide: padded top and bottom
    x = emb.preprocess(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    mean = torch.tensor(emb.config.mean).view(3, 1, 1)
    std = torch.tensor(emb.config.std).view(3, 1, 1)
    white, black = (1 - mean) / std, (0 - mean) / std
    torch.testing.assert_close(x[:, 20:44, :], white.expand(3, 24, 64))  # content, full width
    torch.testing.assert_close(x[:, :12, :], black.expand(3, 12, 64))  # padding
    torch.testing.assert_close(x[:, -12:, :], black.expand(3, 12, 64))
    gray = emb.preprocess(Image.new("L", (64, 64), 128))
    assert gray.shape == (3, 64, 64)
    torch.testing.assert_close(gray, ((128 / 255 - mean) / std).expand(3, 64, 64))


def test_checkpoint_round_trip(tmp_path):
    emb = create_embedder("tinycnn", weights="none", class_names=["a", "b", "c"], seed=7)
    path = tmp_path / "model.pt"
    fp = save_checkpoint(emb, path, train_sha256=["ab" * 32, "cd" * 32], extra={"epochs": 2, "lr": 0.1})
    assert fp == emb.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left

    raw = torch.load(path, weights_only=True)
    assert raw["fingerprint"] == fp and raw["config"]["class_names"] == ["a", "b", "c"]

    loaded, rest = load_checkpoint(path)
    assert loaded.fingerprint == fp
    assert loaded.config.class_names == ("a", "b", "c") and loaded.config.weights == "checkpoint"
    assert rest["train_sha256"] == ["ab" * 32, "cd" * 32] and rest["extra"] == {"epochs": 2, "lr": 0.1}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), emb(x))
    torch.testing.assert_close(loaded.logits(x), emb.logits(x))

    via_factory = create_embedder(str(path))
    assert via_factory.fingerprint == fp
    moved = create_embedder(path, target_layer="block4")
    assert moved.target_module() is moved.trunk.block4 and moved.fingerprint != fp


def test_checkpoint_rejects_non_primitive_extra(tmp_path):
    emb = create_embedder("tinycnn", weights="none")
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(emb, tmp_path / "m.pt", extra={"x": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_errors(tmp_path):
    with pytest.raises(NotFoundError, match="checkpoint file not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(NotFoundError):
        create_embedder(str(tmp_path / "missing.pt"))

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot be read .*expected a cbr model checkpoint"):
        load_checkpoint(junk)

    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=r"plain.pt: got keys \['weight'\]; expected a cbr"):
        load_checkpoint(plain)

    good = tmp_path / "good.pt"
    save_checkpoint(create_embedder("tinycnn", weights="none"), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)

    tampered = tmp_path / "tampered.pt"
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["trunk.block1.0.weight"] += 1
    torch.save(ckpt, tampered)
    with pytest.raises(ModelMismatchError, match="tampered.pt: .*fingerprint"):
        load_checkpoint(tampered)
    assert zipfile.is_zipfile(good)


def test_default_device():
    assert default_device() in ("cpu", "cuda")
