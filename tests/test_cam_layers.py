"""Maps at any CAM layer: the cut-trunk fast path equals grad-cam's hooked path on the whole model."""

import numpy as np
import pytest
import torch

from cbr.models.backbones import BACKBONES
from cbr.models.embedder import create_embedder
from cbr.models.maps import compute_maps
from explain.cam import maps_from_activations, maps_from_images
from explain.methods import FAST_METHODS
from explain.targets import ClassTarget, EmbeddingNormTarget, SimilarityTarget


def _targets(emb, x, classifier):
    if classifier:
        return [ClassTarget(i % len(emb.config.class_names)) for i in range(len(x))]
    with torch.no_grad():
        ref = emb(x).numpy()
    return [SimilarityTarget(ref[::-1][i]) for i in range(len(x))]


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["", "block3", "block3.0", "block2"])
@pytest.mark.parametrize("method", sorted(FAST_METHODS))
@pytest.mark.parametrize("classifier", [False, True])
def test_cut_trunk_equals_hooked_path(layer, method, classifier):
    emb = create_embedder("tinycnn", weights="none", input_size=32, target_layer=layer or None,
                          class_names=("a", "b", "c"), seed=3)
    assert emb.cam_split() is not None
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = _targets(emb, x, classifier)
    with torch.no_grad():
        acts, e = emb.cam_features(x)
        np.testing.assert_allclose(e.numpy(), emb(x).numpy(), rtol=1e-5, atol=1e-6)  # same embedding
    fast = maps_from_activations(emb.cam_head(classifier), acts.clone(), targets, method)
    head = emb.classifier_head() if classifier else emb.neck
    hooked = maps_from_images(torch.nn.Sequential(emb.trunk, head), emb.target_module(), x, targets, method)
    assert fast.shape == hooked.shape == acts.shape[:1] + acts.shape[2:]
    np.testing.assert_allclose(fast, hooked, rtol=1e-4, atol=1e-6)
    via_cbr = compute_maps(emb, x, acts, targets, classifier, method)
    np.testing.assert_allclose(via_cbr, hooked, rtol=1e-4, atol=1e-6)


def test_uncuttable_layer_uses_the_hooked_path():
    emb = create_embedder("resnet18", weights="none", input_size=32, target_layer="layer4.1.conv2")
    assert emb.cam_split() is None  # inside a BasicBlock: not a Sequential
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        acts, _ = emb.cam_features(x)
    maps = compute_maps(emb, x, acts, [EmbeddingNormTarget()] * 2, False, "gradcam")
    assert maps.shape == (2, 1, 1) and np.isfinite(maps).all()


def _early_layer(trunk) -> str:
    """The dotted name of the trunk's first leaf module, reached through first children that are
    Sequentials (a cut there leaves almost the whole trunk above it)."""
    path, module = [], trunk
    while isinstance(module, torch.nn.Sequential):
        name, module = next(iter(module._modules.items()))
        path.append(name)
    return ".".join(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "tinycnn"])
def test_every_backbone_cuts_at_its_default_layer(name):
    size = BACKBONES[name].min_input_size
    emb = create_embedder(name, weights="none", input_size=size).eval()
    lower, upper = emb.cam_split()
    # the default CAM layer is the trunk's output: nothing with weights is left above the cut
    assert not list(upper.parameters())
    # the measured default method (one rule for every ImageNet backbone) travels in the model config
    assert emb.config.cam_method == BACKBONES[name].cam_method == "layercam"
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acts, embedding = emb.cam_features(x)
        assert acts.ndim == 4  # a spatial map that CAM can weight, not a pooled vector
        torch.testing.assert_close(acts, emb.trunk(x))  # the maps are of the trunk's output
        torch.testing.assert_close(embedding, emb(x))
        # cutting after the trunk's first child instead: both parts compose back to the trunk
        cut = create_embedder(name, weights="none", input_size=size, target_layer=_early_layer(emb.trunk)).eval()
        cut.load_state_dict(emb.state_dict())
        low, high = cut.cam_split()
        assert low is not cut.trunk and list(high.parameters())
        torch.testing.assert_close(high(low(x)), emb.trunk(x))
