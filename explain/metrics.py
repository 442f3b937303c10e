"""How good is an explanation: localisation against a mask, deletion curves, sanity checks.

Raw maps are upsampled (explain.overlay.upsample) to the mask's or the image's shape inside.
"""

import copy
import warnings

import numpy as np

from .cam import maps_from_activations
from .overlay import upsample


def box_mask(box, shape):
    """A bool mask of `shape` (height, width) that is True inside box (x0, y0, x1, y1).

    Pixel coordinates, x1 and y1 excluded; the box is clipped to the image.
    """
    height, width = shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = True
    return mask


def _mask(mask):
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask is a 2-D bool array, got shape {mask.shape}; see box_mask for boxes")
    return mask


def _upsampled(raw, mask):
    return np.maximum(upsample(raw, mask.shape), 0)


def pointing_game(raw, mask):
    """True if the map's maximum lies inside the mask (an all-zero map never hits)."""
    mask = _mask(mask)
    values = _upsampled(raw, mask)
    if not values.max() > 0:
        return False
    return bool(mask.flat[int(np.argmax(values))])


def energy_pointing_game(raw, mask):
    """The share of the map's mass that lies inside the mask (0 for an all-zero map)."""
    mask = _mask(mask)
    values = _upsampled(raw, mask)
    total = float(values.sum())
    return float(values[mask].sum()) / total if total > 0 else 0.0


def iou(raw, mask, threshold=0.5):
    """IoU between the mask and the region where the min-max normalised map is >= threshold.

    A constant map selects nothing; an empty union gives 0.
    """
    mask = _mask(mask)
    values = upsample(raw, mask.shape)
    low, high = float(values.min()), float(values.max())
    if high > low:
        selected = (values - low) / (high - low) >= threshold
    else:
        selected = np.zeros_like(mask)
    union = np.logical_or(selected, mask).sum()
    return float(np.logical_and(selected, mask).sum() / union) if union else 0.0


def iou_top(raw, mask, fraction=0.2):
    """IoU between the mask and the map's top `fraction` of pixels (a fixed share, not a level).

    A share rather than a threshold on the normalised map: every map selects the same area, so
    maps of different sharpness (a 7x7 CAM and a fused 28x28 one) compare fairly. An all-zero
    map selects nothing and scores 0.
    """
    mask = _mask(mask)
    values = _upsampled(raw, mask)
    if not values.max() > 0:
        return 0.0
    count = max(1, int(round(fraction * values.size)))
    order = np.argsort(-values.ravel(), kind="stable")[:count]
    selected = np.zeros(values.size, dtype=bool)
    selected[order] = True
    selected = selected.reshape(mask.shape)
    union = np.logical_or(selected, mask).sum()
    return float(np.logical_and(selected, mask).sum() / union) if union else 0.0


def score_curve(score_fn, image, saliency, *, steps=20, baseline=0.0):
    """The raw scores behind deletion_curve, not normalised (same arguments).

    Returns:
        (fractions, scores): two (steps + 1,) arrays; scores[0] is the intact image's score and
        scores[-1] the fully deleted image's, whatever the saliency map.
    """
    import torch

    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError("deletion_curve takes one image")
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    height, width = image.shape[-2:]
    values = upsample(saliency, (height, width)).ravel()
    # Stable order: equal saliency is removed in raster order.
    order = np.argsort(-values, kind="stable")
    rank = np.empty(values.size, dtype=np.int64)
    rank[order] = np.arange(values.size)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * values.size).astype(np.int64)
    removed = torch.from_numpy(rank[None, :] < counts[:, None]).reshape(steps + 1, 1, height, width)
    removed = removed.to(image.device)
    fill = torch.as_tensor(baseline, dtype=image.dtype, device=image.device)
    with torch.no_grad():
        batch = torch.where(removed, fill, image.unsqueeze(0))
        scores = score_fn(batch)
    scores = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).reshape(-1)
    if scores.shape != (steps + 1,):
        raise ValueError(f"score_fn returned {scores.size} scores for a batch of {steps + 1}")
    return fractions, scores


def _flat(gap, intact):
    return abs(gap) <= 1e-12 * max(1.0, abs(intact))


def deletion_curve(score_fn, image, saliency, *, steps=20, baseline=0.0):
    """Scores as the most-attributed pixels are removed first (Petsiuk et al., RISE).

    The image with the first round(f * H * W) pixels of the saliency order set to `baseline`
    is scored for f in linspace(0, 1, steps + 1), all steps as one batch.

    Scores are normalised as (s - s_deleted) / (s_intact - s_deleted): the intact and the fully
    deleted image are the same for every saliency map, so every curve runs from 1 to 0 and the
    AUCs of different maps (and of random_deletion_auc) compare directly; lower is better.
    If s_intact == s_deleted the normalised scores and the AUC are NaN. One image's AUC is
    unbounded when that gap is small or negative: average several images with pooled_auc on
    score_curve's raw scores, not by averaging these AUCs.

    Args:
        score_fn: maps a (N, C, H, W) batch to (N,) scores, e.g. a class probability or the
            cosine to a neighbour's embedding; called under torch.no_grad.
        image: (C, H, W) or (1, C, H, W) tensor.
        saliency: a raw map of any resolution; upsampled to (H, W).
        steps: number of deletion steps.
        baseline: the value of removed pixels, a float or a tensor broadcastable to the image.

    Returns:
        (fractions, normalised scores, auc): two (steps + 1,) arrays and the trapezoid AUC.

    Example:
        >>> _, _, auc = deletion_curve(lambda x: model(x).softmax(1)[:, 0], image, raw)
        >>> auc < random_deletion_auc(lambda x: model(x).softmax(1)[:, 0], image)
    """
    from sklearn.metrics import auc

    fractions, scores = score_curve(score_fn, image, saliency, steps=steps, baseline=baseline)
    span = scores[0] - scores[-1]
    if _flat(span, scores[0]):
        normalised = np.full_like(scores, np.nan)
        return fractions, normalised, float("nan")
    normalised = (scores - scores[-1]) / span
    return fractions, normalised, float(auc(fractions, normalised))


def random_saliency(image, seed=0):
    """A uniformly random (H, W) map for `image`: the chance map of random_deletion_auc."""
    height, width = image.shape[-2:]
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def random_deletion_auc(score_fn, image, *, steps=20, seed=0, baseline=0.0):
    """deletion_curve's AUC for a uniformly random map: the chance level to compare with."""
    return deletion_curve(score_fn, image, random_saliency(image, seed), steps=steps, baseline=baseline)[2]


def normalised_auc(raw_auc, intact, deleted):
    """(raw_auc - deleted) / (intact - deleted): an AUC on the scale where intact is 1 and deleted 0.

    NaN unless intact > deleted: when removing every pixel does not lower the score, a curve
    that falls fast means nothing.
    """
    gap = intact - deleted
    if not np.isfinite(gap) or gap <= 0 or _flat(gap, intact):
        return float("nan")
    return float((raw_auc - deleted) / gap)


def pooled_auc(fractions, curves):
    """The normalised AUC of several images' score curves, pooled as a ratio of sums.

    sum_i (AUC_i - s_deleted_i) / sum_i (s_intact_i - s_deleted_i), where AUC_i is the trapezoid
    area under image i's raw scores: the normalised AUC of the images' mean curve, i.e. the mean
    of their normalised AUCs weighted by each image's own gap s_intact_i - s_deleted_i. An image
    whose fully deleted version scores about as high as the intact one weighs about nothing,
    instead of making its own normalised AUC (and a plain mean) explode. The denominator is the
    same for every saliency map on the same images, so pooled AUCs of maps compare directly.

    Args:
        fractions: the (steps + 1,) deleted fractions of score_curve.
        curves: raw score arrays of score_curve, one per image; curves with a non-finite score
            are left out.

    Returns:
        {"auc": the pooled normalised AUC (NaN without a positive total gap), "raw_auc": the mean
        un-normalised AUC (RISE's figure), "intact", "deleted": the mean end scores, "n": images
        pooled, "non_positive_gaps": how many of them did not score lower fully deleted}.

    Example:
        >>> fractions, s = score_curve(score, image, raw)
        >>> pooled_auc(fractions, [s, score_curve(score, other, raw2)[1]])["auc"]
    """
    from sklearn.metrics import auc

    kept = [np.asarray(c, dtype=np.float64) for c in curves]
    kept = [c for c in kept if np.isfinite(c).all()]
    if not kept:
        return {"auc": float("nan"), "raw_auc": float("nan"), "intact": float("nan"), "deleted": float("nan"),
                "n": 0, "non_positive_gaps": 0}
    raw = float(np.mean([auc(fractions, c) for c in kept]))
    intact = float(np.mean([c[0] for c in kept]))
    deleted = float(np.mean([c[-1] for c in kept]))
    flat = sum(1 for c in kept if c[0] - c[-1] <= 0 or _flat(c[0] - c[-1], c[0]))
    return {"auc": normalised_auc(raw, intact, deleted), "raw_auc": raw, "intact": intact, "deleted": deleted,
            "n": len(kept), "non_positive_gaps": flat}


def spearman(a, b):
    """Spearman rank correlation of two arrays of the same size (scipy's; NaN if one is constant)."""
    from scipy.stats import ConstantInputWarning, spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"arrays differ in size: {a.size} and {b.size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # a constant map: NaN, skipped by the caller
        return float(spearmanr(a, b).statistic)


def _module_name(trunk, module):
    if isinstance(module, str):
        trunk.get_submodule(module)  # raises AttributeError naming the missing part
        return module
    for name, candidate in trunk.named_modules():
        if candidate is module:
            return name
    raise ValueError("module is not a sub-module of trunk")


def randomisation_check(trunk, head, module, images, targets, method="gradcam", *, seed=12345):
    """Model-randomisation sanity check (Adebayo et al., 2018), on the fast path.

    Maps from the model are compared with maps from a deep copy of `trunk` whose `module` has
    been re-initialised (reset_parameters of it and its children, torch's generator seeded with
    `seed` and restored afterwards).

    Args:
        trunk: image -> activations; it is not modified.
        head: activations -> one 1-D output per sample (shared by both models).
        module: a sub-module of trunk, or its dotted name in trunk.named_modules()
            (e.g. "features.7"); "" randomises the whole trunk.
        images: (B, C, H, W) tensor.
        targets: one target callable per sample.
        method: a name in FAST_METHODS.
        seed: seed of the re-initialisation. Not 0 by default: a model built right after
            torch.manual_seed(0) would get its own weights back.

    Returns:
        The mean Spearman correlation between original and randomised maps over the samples
        where it is defined (NaN if none): low means the explanation depends on the weights.

    Example:
        >>> randomisation_check(trunk, neck, "features.18", images, [EmbeddingNormTarget()] * 4)
    """
    import torch

    name = _module_name(trunk, module)
    randomised = copy.deepcopy(trunk)
    target = randomised.get_submodule(name)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    devices = sorted({p.device.index or 0 for p in target.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in target.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
    after = target.state_dict()
    if not before:
        raise ValueError(f"module {name!r} has no parameters to re-initialise")
    if all(torch.equal(value, after[key]) for key, value in before.items()):
        raise ValueError(
            f"re-initialising {name!r} with seed {seed} gave back its weights; pass another seed"
        )
    with torch.no_grad():
        original = maps_from_activations(head, trunk(images), targets, method)
        changed = maps_from_activations(head, randomised(images), targets, method)
    rhos = np.array([spearman(a, b) for a, b in zip(original, changed)])
    rhos = rhos[np.isfinite(rhos)]
    return float(rhos.mean()) if rhos.size else float("nan")
