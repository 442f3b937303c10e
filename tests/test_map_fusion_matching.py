"""Multi-layer fusion (explain.fusion), region matching (explain.matching) and the top-k% IoU."""

import numpy as np
import pytest

from explain.fusion import fuse_maps, split_layers
from explain.matching import matching_maps, region_matches
from explain.metrics import iou_top, pointing_game


def test_fusion_is_finite_at_the_finest_resolution_and_points_at_the_planted_region():
    coarse = np.zeros((2, 4, 4), np.float32)
    coarse[:, 1, 2] = 50.0  # a deep stage: the right region, coarsely, on a large raw scale
    fine = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32) * 0.01
    fine[:, 5, 9] = 0.02  # a shallow stage: a sharp peak inside the coarse cell, on a tiny raw scale
    fused = fuse_maps([coarse, fine])
    assert fused.shape == (2, 16, 16) and np.isfinite(fused).all()
    assert 0 <= fused.min() and fused.max() <= 1
    planted = np.zeros((16, 16), bool)
    planted[4:8, 8:12] = True  # cell (1, 2) of the 4x4 grid
    assert all(pointing_game(m, planted) for m in fused)
    # both stages agree at the shallow peak: it is the fused maximum, not just anywhere in the cell
    assert np.unravel_index(fused[0].argmax(), (16, 16)) == (5, 9)


def test_fusion_of_an_all_zero_image_stays_zero_and_bad_shapes_are_refused():
    assert not fuse_maps([np.zeros((1, 3, 3)), np.zeros((1, 6, 6))]).any()
    with pytest.raises(ValueError, match="one B"):
        fuse_maps([np.zeros((1, 3, 3)), np.zeros((2, 6, 6))])
    with pytest.raises(ValueError, match="at least one"):
        fuse_maps([])
    assert split_layers("features.14 + last") == ("features.14", "last")


def _planted(rng, where, vector, shape=(8, 6, 6)):
    acts = rng.random(shape).astype(np.float32) * 0.05  # weak, featureless background
    acts[:, where[0], where[1]] = vector
    return acts


def test_region_matching_links_the_planted_regions():
    rng = np.random.default_rng(1)
    lesion = np.zeros(8, np.float32)
    lesion[[1, 4, 6]] = [3.0, 2.0, 1.0]
    query = _planted(rng, (2, 3), lesion)
    neighbour = _planted(rng, (4, 1), lesion * 1.5)
    q, n, match = region_matches(query, neighbour)
    assert q.shape == (6, 6) and n.shape == (6, 6) and np.isfinite(q).all() and np.isfinite(n).all()
    assert np.unravel_index(q.argmax(), q.shape) == (2, 3)
    assert np.unravel_index(n.argmax(), n.shape) == (4, 1)
    assert divmod(int(match[2, 3]), 6) == (4, 1)
    batch = matching_maps(np.stack([query, neighbour]), np.stack([neighbour, query]))
    assert batch.shape == (2, 6, 6) and np.allclose(batch[0], q)


def test_region_matching_refuses_mismatched_channels():
    with pytest.raises(ValueError, match="channel"):
        region_matches(np.ones((4, 3, 3)), np.ones((5, 3, 3)))


def test_iou_top_selects_a_fixed_share():
    mask = np.zeros((10, 10), bool)
    mask[:2] = True  # 20 pixels
    raw = np.zeros((10, 10), np.float32)
    raw[0] = 1.0  # the top 10 pixels lie inside the mask
    raw[1] = 0.5
    assert iou_top(raw, mask, 0.2) == pytest.approx(1.0)
    assert iou_top(raw, mask, 0.1) == pytest.approx(10 / 20)
    assert iou_top(np.zeros((10, 10)), mask) == 0.0


@pytest.mark.slow
def test_stage_ends_find_the_last_three_resolutions():
    import torch

    from cbr.models.embedder import create_embedder
    from explain.fusion import stage_ends

    trunk = create_embedder("tinycnn", weights="none", input_size=48).trunk
    # block3 and block4 share one resolution (block4 does not pool): the stage ends at block4
    assert stage_ends(trunk, torch.zeros(1, 3, 48, 48)) == ["block1", "block2", "block4"]


def test_the_fused_method_is_offered_and_gives_finite_maps_at_the_finest_stage():
    import torch

    from cbr.models.embedder import create_embedder
    from cbr.models.maps import compute_maps, map_layer
    from explain.methods import METHOD_NAMES
    from explain.targets import ClassTarget

    assert "layercam-fused" in METHOD_NAMES
    emb = create_embedder("tinycnn", weights="none", input_size=48, class_names=["a", "b"])
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        acts = emb.cam_features(x)[0]
    raws = compute_maps(emb, x, acts, [ClassTarget(i % 2) for i in range(3)], True, "layercam-fused")
    assert raws.shape == (3, 24, 24) and np.isfinite(raws).all() and raws.max() <= 1
    assert map_layer(emb, "layercam-fused") == "block1+block2+block4"
    assert map_layer(emb, "gradcam") == ""
