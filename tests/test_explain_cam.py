"""explain.methods, explain.targets and explain.cam: raw maps, fast path vs grad-cam's hooks."""

import copy
import gc
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from explain import (
    FAST_METHODS,
    ClassTarget,
    EmbeddingNormTarget,
    SimilarityTarget,
    UnknownMethodError,
    decode_map,
    encode_map,
    get_cam_method,
    maps_from_activations,
    maps_from_images,
)
from explain.methods import CAM_METHODS
from explain_models import (
    CHANNELS,
    CLASSES,
    make_classifier_head,
    make_embedder_head,
    make_images,
    make_trunk,
    one_thread,
)

TOL = dict(rtol=1e-4, atol=1e-6)
# Methods whose channel weighting is linear in the gradient, so maps scale with the head weights.
LINEAR_IN_GRADIENT = ("gradcam", "hirescam", "xgradcam", "layercam")
TARGET_KINDS = ("class", "similarity", "norm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trunk():
    return make_trunk()


@pytest.fixture(scope="module")
def images():
    return make_images(3)


def _head_and_targets(kind, n):
    rng = np.random.default_rng(1)
    if kind == "class":
        return make_classifier_head(), [ClassTarget(i % CLASSES) for i in range(n)]
    if kind == "similarity":
        return make_embedder_head(), [SimilarityTarget(rng.normal(size=CHANNELS)) for _ in range(n)]
    return make_embedder_head(), [EmbeddingNormTarget() for _ in range(n)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


# --- methods ---------------------------------------------------------------------------------

def test_registry():
    assert FAST_METHODS <= set(CAM_METHODS)
    assert "scorecam" in CAM_METHODS and "scorecam" not in FAST_METHODS
    for cls in CAM_METHODS.values():
        assert issubclass(cls, BaseCAM)


@pytest.mark.parametrize("name", list(CAM_METHODS))
def test_get_cam_method(name):
    assert get_cam_method(name) is CAM_METHODS[name]


def test_unknown_method_message():
    with pytest.raises(UnknownMethodError) as info:
        get_cam_method("gradcam3")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"unknown CAM method 'gradcam3'; choose from {', '.join(CAM_METHODS)}"


# --- targets ---------------------------------------------------------------------------------

def test_targets_accept_one_sample_or_a_batch():
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(4, CHANNELS, generator=generator)
    reference = torch.randn(CHANNELS, generator=generator)
    for target in (ClassTarget(2), SimilarityTarget(reference), EmbeddingNormTarget()):
        scores = target(batch)
        assert scores.shape == (4,)
        torch.testing.assert_close(torch.stack([target(row) for row in batch]), scores)
    torch.testing.assert_close(ClassTarget(2)(batch), batch[:, 2])
    cosine = F.cosine_similarity(batch, reference[None])
    torch.testing.assert_close(SimilarityTarget(reference)(batch), cosine)
    torch.testing.assert_close(SimilarityTarget(reference.numpy() * 7)(batch), cosine)
    torch.testing.assert_close(EmbeddingNormTarget()(batch), batch.norm(dim=1))


def test_similarity_reference_is_a_constant():
    reference = torch.randn(CHANNELS, requires_grad=True)
    output = torch.randn(CHANNELS, requires_grad=True)
    SimilarityTarget(reference)(output).backward()
    assert reference.grad is None and output.grad is not None
    with pytest.raises(ValueError):
        SimilarityTarget(np.zeros((2, CHANNELS)))


def test_embedding_norm_gradient_is_the_embedding_direction():
    output = torch.randn(CHANNELS, requires_grad=True)
    EmbeddingNormTarget()(output).backward()
    torch.testing.assert_close(output.grad, F.normalize(output.detach(), dim=0))


# --- raw maps --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CAM_METHODS))
def test_hooked_maps_are_raw(name, trunk, images):
    head = make_embedder_head()
    model = nn.Sequential(trunk, head)
    maps = maps_from_images(model, trunk, images, [EmbeddingNormTarget()] * len(images), method=name)
    assert maps.shape == (len(images), 8, 8) and maps.dtype == np.float32
    assert np.all(np.isfinite(maps)) and np.all(maps >= 0)
    assert maps.max() > 0
    # Not min-max normalised: grad-cam's scale_cam_image would make every maximum exactly 1.
    assert not np.allclose(maps.max(axis=(1, 2)), 1.0)
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", list(CAM_METHODS))
def test_fast_path_only_for_fast_methods(name, trunk, images):
    with torch.no_grad():
        acts = trunk(images)
    targets = [EmbeddingNormTarget()] * len(images)
    if name in FAST_METHODS:
        assert maps_from_activations(make_embedder_head(), acts, targets, method=name).shape == (3, 8, 8)
    else:
        with pytest.raises(ValueError, match="maps_from_images"):
            maps_from_activations(make_embedder_head(), acts, targets, method=name)


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_fast_path_equals_grad_cam_hooks(name, kind, trunk, images):
    head, targets = _head_and_targets(kind, len(images))
    with torch.no_grad():
        acts = trunk(images)
    fast = maps_from_activations(head, acts, targets, method=name)
    hooked = maps_from_images(nn.Sequential(trunk, head), trunk, images, targets, method=name)
    assert fast.shape == hooked.shape == (len(images), 8, 8)
    assert fast.max() > 0
    np.testing.assert_allclose(fast, hooked, **TOL)


@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_batched_neighbours_equal_one_at_a_time(name, trunk):
    head = make_embedder_head()
    images = make_images(5, seed=3)  # a query and its 4 neighbours
    with torch.no_grad():
        acts = trunk(images)
        embeddings = head(acts)
    query, neighbours = embeddings[0], embeddings[1:]
    targets = [SimilarityTarget(F.normalize(neighbours, dim=1).mean(0))]
    targets += [SimilarityTarget(query) for _ in neighbours]
    batched = maps_from_activations(head, acts, targets, method=name)
    single = np.concatenate([
        maps_from_activations(head, trunk(images[i : i + 1]).detach(), [targets[i]], method=name)
        for i in range(len(images))
    ])
    np.testing.assert_allclose(batched, single, **TOL)


@pytest.mark.parametrize("name", LINEAR_IN_GRADIENT)
def test_raw_magnitude_follows_the_head(name, trunk, images):
    head = make_classifier_head()
    louder = copy.deepcopy(head)
    with torch.no_grad():
        louder[2].weight.mul_(10)
        acts = trunk(images)
    targets = [ClassTarget(i % CLASSES) for i in range(len(images))]
    base = maps_from_activations(head, acts, targets, method=name)
    assert base.max() > 0
    np.testing.assert_allclose(maps_from_activations(louder, acts, targets, method=name), 10 * base,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_similarity_maps_ignore_the_reference_norm(name, trunk, images):
    head = make_embedder_head()
    with torch.no_grad():
        acts = trunk(images)
    reference = np.random.default_rng(2).normal(size=CHANNELS)
    small = maps_from_activations(head, acts, [SimilarityTarget(reference)] * 3, method=name)
    large = maps_from_activations(head, acts, [SimilarityTarget(50 * reference)] * 3, method=name)
    np.testing.assert_allclose(small, large, **TOL)


def test_fast_path_under_inference_mode(trunk, images):
    head = make_embedder_head()
    targets = [EmbeddingNormTarget()] * len(images)
    with torch.inference_mode():
        acts = trunk(images)
        maps = maps_from_activations(head, acts, targets)
    with torch.no_grad():
        expected = maps_from_activations(head, trunk(images), targets)
    np.testing.assert_allclose(maps, expected, **TOL)


def test_fast_path_leaves_parameters_alone(images):
    trunk, head = make_trunk(), make_classifier_head()
    with torch.no_grad():
        acts = trunk(images)
    maps_from_activations(head, acts, [ClassTarget(0)] * len(images))
    assert all(p.grad is None for p in [*trunk.parameters(), *head.parameters()])


def test_hooked_path_with_frozen_parameters(images):
    trunk, head = make_trunk(), make_classifier_head()
    targets = [ClassTarget(1)] * len(images)
    expected = maps_from_images(nn.Sequential(trunk, head), trunk, images, targets)
    model = nn.Sequential(trunk, head).requires_grad_(False)
    np.testing.assert_allclose(maps_from_images(model, trunk, images, targets), expected, **TOL)
    assert all(p.grad is None for p in model.parameters())


def test_hooked_path_at_an_inner_layer(trunk, images):
    model = nn.Sequential(trunk, make_embedder_head())
    maps = maps_from_images(model, trunk[5], images, [EmbeddingNormTarget()] * 3)
    assert maps.shape == (3, 16, 16)


def test_bad_target_raises_and_releases_hooks(trunk, images):
    # grad-cam's __exit__ would print and swallow this IndexError.
    model = nn.Sequential(trunk, make_classifier_head())
    with pytest.raises(IndexError):
        maps_from_images(model, trunk, images, [ClassTarget(CLASSES + 4)] * len(images))
    assert _hooks(model) == 0


def test_one_target_per_sample(trunk, images):
    model = nn.Sequential(trunk, make_embedder_head())
    with pytest.raises(ValueError, match="one per sample"):
        maps_from_images(model, trunk, images, [EmbeddingNormTarget()])
    with torch.no_grad():
        acts = trunk(images)
    with pytest.raises(ValueError, match="one per sample"):
        maps_from_activations(make_embedder_head(), acts, [EmbeddingNormTarget()])


@pytest.mark.slow
def test_many_explanations_do_not_leak(trunk):
    model = nn.Sequential(trunk, make_classifier_head())
    image = make_images(1, seed=5)

    def explain():
        return maps_from_images(model, trunk, image, [ClassTarget(0)])

    for _ in range(5):
        explain()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            explain()
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert _hooks(model) == 0
    assert not [o for o in gc.get_objects() if issubclass(type(o), BaseCAM)]
    assert growth < 200_000, f"{growth} bytes still allocated after 200 explanations"


# --- storage ---------------------------------------------------------------------------------

def test_encode_decode_round_trip(trunk, images):
    model = nn.Sequential(trunk, make_classifier_head())
    raw = maps_from_images(model, trunk, images, [ClassTarget(0)] * 3)[0] * 123.0
    data, shape, scale = encode_map(raw)
    assert shape == (8, 8) and len(data) == 2 * 8 * 8
    assert scale == pytest.approx(float(raw.max()))
    decoded = decode_map(data, shape, scale)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, raw, rtol=1e-3, atol=1e-6 * scale)


def test_encode_7x7_and_zero_maps():
    raw = np.random.default_rng(0).random((7, 7), dtype=np.float32) * 0.003
    data, shape, scale = encode_map(raw)
    assert len(data) == 98
    np.testing.assert_allclose(decode_map(data, shape, scale), raw, rtol=1e-3)
    data, shape, scale = encode_map(np.zeros((7, 7), dtype=np.float32))
    assert scale == 0.0 and len(data) == 98
    assert not decode_map(data, shape, scale).any()
    with pytest.raises(ValueError):
        decode_map(data[:-2], shape, 1.0)
