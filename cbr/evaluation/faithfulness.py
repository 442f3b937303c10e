"""Do a model's maps explain it? Deletion curves against chance, and the randomisation check."""

from __future__ import annotations

import numpy as np

from cbr.data.sources import read_source
from cbr.models.maps import compute_maps
from explain.metrics import normalised_auc, pooled_auc, random_saliency, randomisation_check, score_curve
from explain.targets import ClassTarget, EmbeddingNormTarget

__all__ = ["FAITHFULNESS_IMAGES", "explanation_checks", "pool_checks"]

FAITHFULNESS_IMAGES = 8  # per model: deletion curves cost (steps + 1) forward passes per image
# Pooled over folds as n-weighted means; the normalised AUCs are then recomputed from the pooled
# raw figures (a ratio of sums over all images), never averaged themselves.
POOLED = ("deletion_raw_auc", "random_deletion_raw_auc", "intact_score", "deleted_score", "randomisation_spearman")


def _score_fn(embedder, classifier: bool, label_index: int | None, reference):
    """The target score of one image: its labelled class's probability, else the cosine to itself."""
    import torch

    if classifier:
        def score(batch):
            with torch.no_grad():
                return torch.softmax(embedder.logits(batch).float(), dim=1)[:, label_index]
    else:
        def score(batch):
            with torch.no_grad():
                return embedder(batch) @ reference
    return score


def explanation_checks(embedder, records, method: str, *, n: int = FAITHFULNESS_IMAGES, seed: int = 0) -> dict | None:
    """Faithfulness and sanity of a model's maps on up to ``n`` images.

    * deletion: remove the most-attributed pixels first and track the target score (the labelled
      class's probability with a head, else the cosine to the image's own embedding); the AUC is
      compared with a random map's (lower is better: a faithful map makes the score fall fast).
      Each image's curve is normalised by its own gap between the intact and the fully deleted
      score, and the images are pooled as a ratio of sums (explain.metrics.pooled_auc), so an
      image that barely loses score when fully deleted cannot blow the figure up; the
      un-normalised AUCs (RISE's figure), the mean end scores and the count of images whose score
      did not fall (``non_positive_gaps``) are reported beside it;
    * model randomisation (Adebayo et al.): Spearman correlation between the maps of the model
      and of a copy whose last block is re-initialised (low: the maps depend on the weights).
    """
    import torch

    if method == "none" or not records:
        return None
    names = embedder.config.class_names
    pick = [r for r in records if embedder.head is None or r.label in names][:n]
    if not pick:
        return None
    window = embedder.config.window  # a DICOM frame, NIfTI slice or .npz index, as the model sees it
    x = torch.stack([embedder.preprocess(read_source(r.path, window=window)[0]) for r in pick])
    classifier = embedder.head is not None
    targets = [ClassTarget(names.index(r.label)) if classifier else EmbeddingNormTarget() for r in pick]
    with torch.no_grad():
        acts, ref = embedder.cam_features(x)
    maps = compute_maps(embedder, x, acts, targets, classifier, method)
    deletion, chance = [], []
    for i, r in enumerate(pick):
        score = _score_fn(embedder, classifier, names.index(r.label) if classifier else None, ref[i])
        fractions, curve = score_curve(score, x[i], maps[i])
        deletion.append(curve)
        chance.append(score_curve(score, x[i], random_saliency(x[i], seed + i))[1])
    mapped, random = pooled_auc(fractions, deletion), pooled_auc(fractions, chance)
    last_block = [name for name, _ in embedder.trunk.named_children()][-1]
    head = embedder.classifier_head() if classifier else embedder.neck
    rho = randomisation_check(embedder.trunk, head, last_block, x, targets, method if method != "scorecam" else "gradcam")
    return {"n": len(pick), "target": "class probability" if classifier else "self-similarity",
            "deletion_auc": mapped["auc"], "random_deletion_auc": random["auc"],
            "deletion_raw_auc": mapped["raw_auc"], "random_deletion_raw_auc": random["raw_auc"],
            "intact_score": mapped["intact"], "deleted_score": mapped["deleted"],
            "non_positive_gaps": mapped["non_positive_gaps"],
            "randomisation_spearman": float(rho), "randomised_block": last_block}


def _weighted_mean(pairs) -> float:
    """The mean of the finite values weighted by their counts (NaN if none is finite)."""
    pairs = [(v, n) for v, n in pairs if v is not None and np.isfinite(v) and n > 0]
    if not pairs:
        return float("nan")
    return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))


def pool_checks(rows: list[dict]) -> dict | None:
    """Explanation checks of several folds, weighted by their image counts.

    The deletion AUCs are normalised once, from the pooled mean curves' raw area and end scores:
    the ratio of sums over every image of every fold, as within a fold.
    """
    if not rows:
        return None
    out = {key: _weighted_mean([(r[key], r["n"]) for r in rows]) for key in POOLED}
    for key in ("deletion", "random_deletion"):
        out[f"{key}_auc"] = normalised_auc(out[f"{key}_raw_auc"], out["intact_score"], out["deleted_score"])
    return dict(out, n=sum(r["n"] for r in rows), non_positive_gaps=sum(r["non_positive_gaps"] for r in rows),
                target=rows[0]["target"], randomised_block=rows[0]["randomised_block"])
