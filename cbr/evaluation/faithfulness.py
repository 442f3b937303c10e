"""Do a model's maps explain it? Deletion curves against chance, and the randomisation check."""

from __future__ import annotations

import numpy as np

from cbr.data.sources import read_source
from cbr.models.maps import compute_maps
from explain.metrics import deletion_curve, random_deletion_auc, randomisation_check
from explain.targets import ClassTarget, EmbeddingNormTarget

__all__ = ["FAITHFULNESS_IMAGES", "explanation_checks", "pool_checks"]

FAITHFULNESS_IMAGES = 8  # per model: deletion curves cost (steps + 1) forward passes per image
POOLED = ("deletion_auc", "random_deletion_auc", "randomisation_spearman")


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
      compared with a random map's (lower is better: a faithful map makes the score fall fast);
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
        deletion.append(deletion_curve(score, x[i], maps[i])[2])
        chance.append(random_deletion_auc(score, x[i], seed=seed + i))
    last_block = [name for name, _ in embedder.trunk.named_children()][-1]
    head = embedder.classifier_head() if classifier else embedder.neck
    rho = randomisation_check(embedder.trunk, head, last_block, x, targets, method if method != "scorecam" else "gradcam")
    return {"n": len(pick), "target": "class probability" if classifier else "self-similarity",
            "deletion_auc": float(np.nanmean(deletion)), "random_deletion_auc": float(np.nanmean(chance)),
            "randomisation_spearman": float(rho), "randomised_block": last_block}


def pool_checks(rows: list[dict]) -> dict | None:
    """Explanation checks of several folds, weighted by their image counts."""
    if not rows:
        return None
    n = sum(r["n"] for r in rows)
    out = {key: float(sum(r[key] * r["n"] for r in rows) / n) for key in POOLED}
    return dict(out, n=n, target=rows[0]["target"], randomised_block=rows[0]["randomised_block"])
