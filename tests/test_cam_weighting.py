"""explain.weighting: the fast path's own CAM weighting is EQUAL to pytorch-grad-cam's, method by
method, and the fast path runs without importing grad-cam."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from explain import FAST_METHODS, ClassTarget, SimilarityTarget, maps_from_activations
from explain.methods import CAM_METHODS
from explain.weighting import CAM_WEIGHTING, USES_GRADIENTS
from explain_models import CHANNELS, make_classifier_head, make_embedder_head, make_images, make_trunk, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _grad_cam(name, acts, grads):
    """grad-cam's own get_cam_image of method `name`, before its ReLU."""
    anchor = nn.Linear(1, 1)  # BaseCAM wants a model with parameters; no hooks (no target layers)
    with CAM_METHODS[name](model=anchor, target_layers=[]) as cam:
        return cam.get_cam_image(None, None, None, acts, grads, eigen_smooth=False)


def _random(shape, seed, *, zeros=False, negative=True):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape).astype(np.float32)
    if not negative:
        a = np.abs(a)
    if zeros:
        a[rng.random(shape) < 0.3] = 0  # grad-cam++ treats zero gradients apart
    return a


def test_registry_is_the_fast_methods():
    assert set(CAM_WEIGHTING) == FAST_METHODS
    for name in FAST_METHODS:
        assert (name in USES_GRADIENTS) == CAM_METHODS[name](model=nn.Linear(1, 1), target_layers=[]).uses_gradients


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_weighting_equals_grad_cam(name, seed):
    # Post-ReLU activations (non-negative, some zero) and signed gradients, as a CNN gives them.
    acts = _random((3, CHANNELS, 7, 7), seed, zeros=True, negative=False)
    grads = _random((3, CHANNELS, 7, 7), seed + 10, zeros=True)
    ours = CAM_WEIGHTING[name](acts, grads if name in USES_GRADIENTS else None)
    theirs = _grad_cam(name, acts, grads)
    assert ours.shape == (3, 7, 7) and np.asarray(theirs).shape == (3, 7, 7)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["class", "similarity"])
@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_fast_path_equals_grad_cam_on_real_gradients(name, kind):
    """maps_from_activations against grad-cam's get_cam_image on the very same activations and
    gradients: equal to the last bit, ReLU included."""
    trunk = make_trunk()
    images = make_images(4, seed=7)
    if kind == "class":
        head, targets = make_classifier_head(), [ClassTarget(i % 3) for i in range(4)]
    else:
        rng = np.random.default_rng(3)
        head, targets = make_embedder_head(), [SimilarityTarget(rng.normal(size=CHANNELS)) for _ in range(4)]
    with torch.no_grad():
        acts = trunk(images)
    x = acts.clone().requires_grad_()
    score = sum(t(o) for t, o in zip(targets, head(x)))
    (grads,) = torch.autograd.grad(score, x)
    expected = np.maximum(np.asarray(_grad_cam(name, acts.numpy(), grads.numpy()), dtype=np.float32), 0)
    fast = maps_from_activations(head, acts, targets, method=name)
    assert fast.max() > 0
    np.testing.assert_array_equal(fast, expected)


@pytest.mark.slow
def test_fast_path_does_not_import_grad_cam():
    """grad-cam's package __init__ imports sklearn, scipy, matplotlib and cv2: seconds of a cold
    query. The fast path must not need it."""
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from explain.cam import maps_from_activations
        from explain.targets import EmbeddingNormTarget
        torch.manual_seed(0)
        acts = torch.rand(2, 4, 5, 5)
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for name in ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"):
            assert maps_from_activations(head, acts, [EmbeddingNormTarget()] * 2, method=name).shape == (2, 5, 5)
        heavy = [m for m in ("pytorch_grad_cam", "sklearn", "scipy", "matplotlib", "cv2") if m in sys.modules]
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
