"""explain.metrics on synthetic maps with known answers, and the randomisation check."""

import numpy as np
import pytest
import torch

from explain import ClassTarget, EmbeddingNormTarget
from explain.metrics import (
    box_mask,
    deletion_curve,
    energy_pointing_game,
    iou,
    pointing_game,
    pooled_auc,
    random_deletion_auc,
    randomisation_check,
    score_curve,
    spearman,
)
from explain_models import make_classifier_head, make_embedder_head, make_images, make_trunk, one_thread

BOX = (0, 0, 16, 16)  # the top-left quarter of a 32x32 image


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _peak_at(row, col):
    raw = np.zeros((8, 8), dtype=np.float32)
    raw[row, col] = 2.0
    return raw


def test_box_mask():
    mask = box_mask((2, 1, 5, 3), (4, 6))
    assert mask.shape == (4, 6) and mask.sum() == 6
    assert mask[1, 2] and mask[2, 4] and not mask[3, 2] and not mask[1, 5]
    assert box_mask((-5, -5, 100, 100), (4, 6)).all()


def test_pointing_game():
    mask = box_mask(BOX, (32, 32))
    assert pointing_game(_peak_at(1, 2), mask)
    assert not pointing_game(_peak_at(6, 6), mask)
    assert not pointing_game(np.zeros((8, 8)), mask)


def test_energy_pointing_game():
    mask = box_mask(BOX, (32, 32))
    assert energy_pointing_game(mask.astype(np.float32) * 5, mask) == pytest.approx(1.0)
    half = np.zeros((32, 32), dtype=np.float32)
    half[0, 0] = half[31, 31] = 1.0
    assert energy_pointing_game(half, mask) == pytest.approx(0.5)
    assert energy_pointing_game(_peak_at(6, 6), mask) == pytest.approx(0.0)
    assert energy_pointing_game(np.zeros((8, 8)), mask) == 0.0


def test_iou():
    mask = box_mask(BOX, (32, 32))
    assert iou(mask.astype(np.float32) * 0.01, mask) == pytest.approx(1.0)
    assert iou(~mask * 1.0, mask) == 0.0
    assert 0 < iou(_peak_at(1, 1), mask) < 1
    assert iou(np.ones((8, 8)), mask) == 0.0


def _region_score(batch):
    return batch[:, :, 4:12, 4:12].mean(dim=(1, 2, 3))


@pytest.mark.slow
def test_deletion_informative_map_beats_random():
    image = make_images(1, seed=4)[0] + 0.5
    saliency = np.zeros((8, 8), dtype=np.float32)
    saliency[1:3, 1:3] = 1.0  # the scored region, at the map's resolution
    calls = []

    def score(batch):
        calls.append(len(batch))
        return _region_score(batch)

    fractions, scores, auc = deletion_curve(score, image, saliency, steps=20)
    assert calls == [21]  # every step in one batch
    np.testing.assert_allclose(fractions, np.linspace(0, 1, 21))
    assert scores[0] == pytest.approx(1.0) and scores[-1] == pytest.approx(0.0)
    chance = random_deletion_auc(_region_score, image, steps=20)
    assert auc < 0.2 < 0.3 < chance
    assert random_deletion_auc(_region_score, image, steps=20) == chance


def test_deletion_auc_is_the_trapezoid_of_the_normalised_curve():
    image = torch.ones(1, 4, 4)
    saliency = np.arange(16, dtype=np.float32).reshape(4, 4)  # 4 more pixels deleted at each step
    fractions, scores, auc = deletion_curve(lambda b: b.mean(dim=(1, 2, 3)) ** 2, image, saliency, steps=4)
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert scores.tolist() == [1.0, 0.5625, 0.25, 0.0625, 0.0]  # (1 - f)^2
    assert auc == 0.34375  # 0.25 * (1/2 + 0.5625 + 0.25 + 0.0625 + 0/2)


def test_deletion_of_an_irrelevant_image_is_nan():
    image = torch.zeros(3, 32, 32)
    _, scores, auc = deletion_curve(_region_score, image[None], np.ones((8, 8)), steps=4)
    assert np.isnan(auc) and np.isnan(scores).all()


def _nearly_flat_score(batch):
    """An image whose fully deleted version scores about as high as the intact one: the region's
    mean barely moves the score, and the middle of the curve dips well below both ends."""
    region = batch[:, :, 4:12, 4:12].mean(dim=(1, 2, 3))
    mean = batch.mean(dim=(1, 2, 3))
    return 0.5 + 1e-3 * region - 0.2 * mean * (1 - mean)


def test_pooled_deletion_auc_stays_sane_when_one_gap_is_nearly_zero():
    """One image with a near-zero gap s_intact - s_deleted made the mean of per-image AUCs explode
    (seen as -1.86 and 1.54 on real runs); the ratio of sums weights it by its gap and stays in [0, 1]."""
    image = torch.ones(1, 16, 16)
    saliency = np.arange(256, dtype=np.float32).reshape(16, 16)  # raster order, reversed
    _, _, good = deletion_curve(_region_score, image, saliency, steps=8)
    _, _, bad = deletion_curve(_nearly_flat_score, image, saliency, steps=8)
    assert 0 <= good <= 1 and abs(bad) > 10  # the failure mode: one image's normalised AUC explodes
    assert not 0 <= np.mean([good, bad]) <= 1  # ... and so does the old pooled figure
    fractions, a = score_curve(_region_score, image, saliency, steps=8)
    _, b = score_curve(_nearly_flat_score, image, saliency, steps=8)
    pooled = pooled_auc(fractions, [a, b])
    assert 0 <= pooled["auc"] <= 1 and pooled["n"] == 2 and pooled["non_positive_gaps"] == 0
    gaps = np.array([a[0] - a[-1], b[0] - b[-1]])
    assert pooled["auc"] == pytest.approx(np.dot([good, bad], gaps) / gaps.sum())  # gap-weighted mean
    assert pooled["raw_auc"] == pytest.approx(np.mean([np.trapezoid(a, fractions), np.trapezoid(b, fractions)]))


def test_pooled_deletion_auc_counts_non_positive_gaps_and_is_nan_without_a_positive_total():
    fractions = np.linspace(0, 1, 3)
    rising = np.array([0.2, 0.9, 0.4])  # deleting everything raises the score
    falling = np.array([0.8, 0.5, 0.0])
    pooled = pooled_auc(fractions, [falling, rising, np.array([0.5, np.nan, 0.1])])
    assert pooled["n"] == 2 and pooled["non_positive_gaps"] == 1
    # (0.45 - 0.0 + 0.6 - 0.4) / (0.8 + 0.2 - 0.4): the mean curve's normalised area
    assert pooled["auc"] == pytest.approx(0.65 / 0.6)
    assert np.isnan(pooled_auc(fractions, [rising])["auc"])
    assert pooled_auc(fractions, [])["n"] == 0


def test_spearman():
    rng = np.random.default_rng(0)
    a = rng.random((7, 7))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    # ties share their mean rank: ranks (3, 4.5, 4.5, 6, 1.5, 1.5) and (4, 2.5, 5.5, 5.5, 1, 2.5),
    # whose Pearson correlation is 12.75 / sqrt(16.5 * 16.5) = 17/22
    ties_a, ties_b = np.array([1, 2, 2, 3, 0, 0]), np.array([2, 1, 3, 3, 0, 1])
    assert spearman(ties_a, ties_b) == pytest.approx(17 / 22)
    assert np.isnan(spearman(np.zeros(5), np.arange(5)))
    with pytest.raises(ValueError, match="differ in size"):
        spearman(np.zeros(3), np.zeros(4))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["0", "8", "", "trunk[8]"])
def test_randomisation_check(module):
    trunk, head = make_trunk(), make_classifier_head()
    module = trunk[8] if module == "trunk[8]" else module
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    images = make_images(4, seed=6)
    rho = randomisation_check(trunk, head, module, images, [ClassTarget(i % 3) for i in range(4)])
    assert np.isfinite(rho) and rho < 1
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_randomisation_check_is_seeded_and_validated():
    trunk, head = make_trunk(), make_embedder_head()
    images = make_images(2, seed=7)
    targets = [EmbeddingNormTarget()] * 2
    rho = randomisation_check(trunk, head, "4", images, targets, seed=3)
    assert rho == randomisation_check(trunk, head, "4", images, targets, seed=3)
    with pytest.raises(ValueError, match="no parameters"):
        randomisation_check(trunk, head, "2", images, targets)
    with pytest.raises(ValueError, match="gave back its weights"):
        # make_trunk seeds torch with 0 just before building this first convolution.
        randomisation_check(trunk, head, "0", images, targets, seed=0)
    with pytest.raises(ValueError, match="not a sub-module"):
        randomisation_check(trunk, head, torch.nn.Conv2d(3, 3, 1), images, targets)
