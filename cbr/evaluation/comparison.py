"""Which explanation to trust: every method scored on the same images (``cbr evaluate --explain a,b|all``).

For each method and each target, on the same few images:

* localisation, where the records carry lesion masks (non-empty ones only): the pointing game
  (the map's maximum lies in the lesion) and the energy pointing game (the share of the map's mass
  in the lesion; a uniform map scores the lesion's area share);
* faithfulness: deletion AUC (the most-attributed pixels removed first; lower is better) and
  insertion AUC (they are put back first onto the baseline; higher is better), with a random
  map's AUCs beside them. Removed pixels take the value 0 of the normalised input, the baseline
  of the attribution methods too. Each image's curve is normalised by its own gap between the
  intact and the fully deleted score and the images are pooled as a ratio of sums (a gap-weighted
  mean, explain.metrics.pooled_auc); ``non_positive_gaps`` counts the images whose score did not
  fall when every pixel was removed;
* sanity (Adebayo et al., 2018): the Spearman correlation between each map and the map of the
  same method on a copy of the model whose last block is re-initialised (near 1: the map does not
  depend on what the model learnt, so it cannot explain it);
* cost: seconds per map, and model evaluations per map for the attribution methods.

Targets: ``class`` (the labelled class's logit; its score curve is the class probability) when the
model has a classification head, and ``similarity`` always: the cosine to the image's nearest
other image in the sample (another patient's when patients are known): "why this neighbour".
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
import time

import numpy as np
from tqdm import tqdm

from cbr.data.crop import model_view
from cbr.data.mask import lesion_mask
from cbr.data.sources import read_source
from cbr.errors import UnknownNameError
from cbr.models.maps import compute_maps
from cbr.reporting.comparison_table import format_comparison  # re-exported: every caller prints the table
from cbr.reporting.explanation_grid import write_explanation_grid
from explain.methods import is_attribution, METHOD_NAMES
from cbr.store.reliability import guess_verdict
from explain.finding import centre_map
from explain.metrics import energy_pointing_game, pointing_game, pooled_auc, score_curve, spearman
from explain.spec import resolve_spec
from explain.targets import ClassTarget, SimilarityTarget

__all__ = ["COMPARISON_IMAGES", "curve_figures", "parse_methods", "compare_explanations", "comparison_report",
           "format_comparison"]

LOG = logging.getLogger(__name__)
COMPARISON_IMAGES = 8  # images scored per method and target
RANDOMISED_IMAGES = 4  # of those, re-explained with the randomised model (it costs as many maps again)
CURVE_STEPS = 20  # deletion and insertion steps (each curve costs steps + 1 forward passes)
RANDOM = "random"  # the chance row: a uniformly random map on a coarse grid, upsampled
# The chance map is random on an 8x8 grid, upsampled like the methods' maps: deleting scattered single
# pixels (a per-pixel random map) wrecks a CNN's features faster than deleting any coherent region,
# so a per-pixel chance row would "beat" every method on deletion for the wrong reason.
RANDOM_GRID = 8


def parse_methods(text: str) -> tuple[str, ...]:
    """``a,b,c`` or ``all`` -> method names (in the registry's order for ``all``); ``none`` -> ().

    Example:
        >>> parse_methods("gradcam, lime")
        ('gradcam', 'lime')
    """
    text = str(text).strip()
    if text in ("", "none"):
        return ()
    if text == "all":
        return METHOD_NAMES
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in METHOD_NAMES:
            raise UnknownNameError("explanation method", name, (*METHOD_NAMES, "all", "none"))
    return names


def pick_round_robin(records, classes, n, seed):
    """Up to n records, round-robin over the labels (shuffled with seed), so every class shows."""
    rng = np.random.default_rng(seed)
    by_label = {}
    for r in records:
        if not classes or r.label in classes:
            by_label.setdefault(r.label, []).append(r)
    queues = []
    for label in sorted(by_label):
        items = list(by_label[label])
        rng.shuffle(items)
        queues.append(items)
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def nearest_other(vectors, groups):
    """Index of each image's most similar other image (another group's when groups are known)."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    for i, g in enumerate(groups):
        same = [j for j, h in enumerate(groups) if h == g and j != i]
        if g is not None and len(same) + 1 < len(groups):
            sims[i, same] = -np.inf
    return sims.argmax(axis=1)


def _last_block(trunk):
    """Dotted name of the trunk's last block: through single-child wrappers (mobilenet's
    ``features``) down to the last of several children (``features.18``)."""
    module, path = trunk, []
    while True:
        kids = list(module.named_children())
        if not kids:
            return ".".join(path)
        name, module = kids[-1]
        path.append(name)
        if len(kids) > 1:
            return ".".join(path)


def _randomised(embedder, block, seed):
    """A deep copy of the embedder whose trunk block `block` is re-initialised (torch seeded)."""
    import torch

    clone = copy.deepcopy(embedder)
    target = clone.trunk.get_submodule(block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in target.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
    return clone.eval()


def score_functions(embedder, x, kind, labels, references):
    """One (N, C, H, W) -> (N,) score function per image: class probability or cosine."""
    import torch

    fns = []
    for i in range(len(x)):
        if kind == "class":
            def fn(batch, c=labels[i]):
                with torch.no_grad():
                    return torch.softmax(embedder.logits(batch).float(), dim=1)[:, c]
        else:
            def fn(batch, ref=references[i]):
                with torch.no_grad():
                    return embedder(batch) @ ref
        fns.append(fn)
    return fns


def curve_figures(scores, images, raws) -> dict:
    """Deletion and insertion AUCs of one map per image, pooled over the images.

    Each image's curve is normalised by its own gap s_intact - s_deleted; pooled as a ratio of
    sums (explain.metrics.pooled_auc), so an image whose fully deleted version scores about as high
    as the intact one weighs by that tiny gap instead of blowing the mean up.

    Args:
        scores: one (N, C, H, W) -> (N,) score function per image (see score_functions).
        images: (N, C, H, W) tensor.
        raws: one raw map per image.

    Returns:
        {"deletion_auc", "insertion_auc" (NaN without a positive total gap), "non_positive_gaps":
        images that did not score lower fully deleted}.
    """
    deleted, inserted, fractions = [], [], None
    for score, image, raw in zip(scores, images, raws):
        fractions, curve = score_curve(score, image, raw, steps=CURVE_STEPS)
        deleted.append(curve)
        # Insertion = deletion of the least-attributed pixels first, read backwards: the image with
        # the top f of the map kept is the image with the bottom 1 - f deleted; the normalised curve
        # and its area are the same, with higher now better.
        inserted.append(score_curve(score, image, -np.asarray(raw, dtype=np.float32), steps=CURVE_STEPS)[1])
    if fractions is None:
        return {"deletion_auc": float("nan"), "insertion_auc": float("nan"), "non_positive_gaps": 0}
    deletion = pooled_auc(fractions, deleted)
    return {"deletion_auc": deletion["auc"], "insertion_auc": pooled_auc(fractions, inserted)["auc"],
            "non_positive_gaps": deletion["non_positive_gaps"]}


def _nanmean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _row(method, kind, raws, x, scores, masks, seconds, evaluations, rhos):
    curves = curve_figures(scores, x, raws)
    located = [(pointing_game(raws[i], m), energy_pointing_game(raws[i], m)) for i, m in enumerate(masks) if m is not None]
    return {"method": method, "target": kind, "n": len(raws),
            "pointing_game": _nanmean([float(p) for p, _ in located]) if located else None,
            "energy_pointing_game": _nanmean([e for _, e in located]) if located else None,
            "localised": len(located),
            "deletion_auc": _nanmean([curves["deletion_auc"]]), "insertion_auc": _nanmean([curves["insertion_auc"]]),
            "non_positive_gaps": curves["non_positive_gaps"],
            "randomisation_spearman": _nanmean(rhos) if rhos is not None else None,
            "seconds_per_map": None if seconds is None else seconds / len(raws),
            "evaluations_per_map": None if evaluations is None else evaluations / len(raws)}


def _guesses(rows, masks, size: int) -> dict:
    """The centre guess's pointing game on the same masks (None without one); each row gets its verdict."""
    located = [m for m in masks if m is not None]
    if not located:
        return {"centre": None}
    centre = float(np.mean([pointing_game(centre_map(size), m) for m in located]))
    for row in rows:
        if row["pointing_game"] is not None:
            row.update(guess_verdict(row["pointing_game"], {"centre": centre}))
    return {"centre": centre}


def _lesion_masks(pick, decoded, size: int, crop: str) -> list:
    """Each picked record's lesion mask in its model view, or None (no mask, an empty or unreadable one)."""
    masks = []
    for r, img in zip(pick, decoded):
        path = (r.metadata or {}).get("mask")
        mask = None
        if path:
            try:
                mask = lesion_mask(path, size, crop=crop, image=img)
            except OSError as e:
                LOG.warning("%s: mask unreadable (%s); left out of the localisation columns", path, e)
        masks.append(mask if mask is not None and mask.any() else None)
    return masks


def compare_explanations(embedder, records, methods, *, images: int = COMPARISON_IMAGES, budget: int | None = None,
                         seed: int = 0, progress: bool = False, targets=("class", "similarity")) -> dict | None:
    """Score each method on the same images, for the class and the similarity target.

    Args:
        embedder: the model explained (a head adds the class target).
        records: labelled records (a ``mask`` in their metadata adds the localisation columns).
        methods: names from explain.methods.METHOD_NAMES (see parse_methods).
        images: how many images (round-robin over the classes, shuffled with ``seed``).
        budget: cap on the model evaluations per attribution map (as ``cbr query --explain-budget``).
        progress: a progress bar over methods x targets.
        targets: the targets to score ("class" needs a head and is skipped without one).

    Returns:
        {"n", "images", "targets", "randomised_block", "rows": [one dict per method x target, plus
        the "random" rows], "maps": {(method, target): (n, h, w) raw maps} (not JSON; for the
        figure)}, or None without methods or images.

    Example:
        >>> result = compare_explanations(embedder, test_records, parse_methods("all"), images=6)
        >>> print(format_comparison(result))
    """
    import torch

    names = embedder.config.class_names
    classifier = embedder.head is not None
    pick = pick_round_robin(records, names if classifier else (), images, seed)
    if not methods or not pick:
        return None
    size = embedder.config.input_size
    decoded = [read_source(r.path, window=embedder.config.window)[0] for r in pick]  # frames/slices too
    x = torch.stack([embedder.preprocess(img) for img in decoded])
    with torch.no_grad():
        acts, vectors = embedder.cam_features(x)
    nearest = nearest_other(vectors.numpy(), [r.group for r in pick])
    references = [vectors[j].clone() for j in nearest]
    labels = [names.index(r.label) if classifier else None for r in pick]
    wanted = targets
    targets = {"similarity": [SimilarityTarget(ref) for ref in references]}
    if classifier:
        targets = {"class": [ClassTarget(c) for c in labels], **targets}
    targets = {kind: tgs for kind, tgs in targets.items() if kind in wanted}
    masks = _lesion_masks(pick, decoded, size, embedder.config.crop)
    block = _last_block(embedder.trunk)
    shuffled = _randomised(embedder, block, seed + 12345)
    n_random = min(RANDOMISED_IMAGES, len(pick))
    with torch.no_grad():
        shuffled_acts = shuffled.cam_features(x[:n_random])[0]
    if any(is_attribution(m) for m in methods):
        import captum.attr  # noqa: F401  (imported before the clock starts: seconds per map exclude it)
    rng = np.random.default_rng(seed)
    rows, maps = [], {}
    bar = tqdm(total=len(methods) * len(targets), desc="comparing explanations", unit="method", disable=not progress)
    for kind, tgs in targets.items():
        scores = score_functions(embedder, x, kind, labels, references)
        noise = [rng.random((RANDOM_GRID, RANDOM_GRID), dtype=np.float32) for _ in pick]
        rows.append(_row(RANDOM, kind, noise, x, scores, masks, None, None, None))
        for method in methods:
            spec = resolve_spec(method, size, budget)
            count = {"evaluations": 0}
            track = (lambda done, total, ev: count.update(evaluations=ev)) if is_attribution(spec) else None
            t0 = time.perf_counter()
            raws = compute_maps(embedder, x, acts, tgs, kind == "class", spec, progress=track)
            seconds = time.perf_counter() - t0
            again = compute_maps(shuffled, x[:n_random], shuffled_acts, tgs[:n_random], kind == "class", spec)
            rhos = [spearman(a, b) for a, b in zip(raws[:n_random], again)]
            evaluations = count["evaluations"] if track else None
            rows.append(_row(spec, kind, raws, x, scores, masks, seconds, evaluations, rhos))
            maps[(spec, kind)] = raws
            bar.update(1)
    bar.close()
    shown = [model_view(img, size, embedder.config.crop) for img in decoded]  # the maps' geometry
    return {"n": len(pick), "images": [r.path for r in pick], "labels": [r.label for r in pick],
            "targets": list(targets), "randomised_block": block, "rows": rows, "maps": maps, "pictures": shown,
            "masks": sum(m is not None for m in masks), "guesses": _guesses(rows, masks, size)}


def comparison_report(embedder, records, methods, *, out_dir=None, images: int = COMPARISON_IMAGES,
                      budget: int | None = None, seed: int = 0, progress: bool = False,
                      targets=("class", "similarity")) -> dict | None:
    """compare_explanations as JSON-ready figures, with ``explanations.png`` written into ``out_dir``.

    Returns None without methods or images; else {"n", "masks", "targets", "randomised_block",
    "images", "rows", "figure" (its path or None)}. Print it with format_comparison.
    """
    result = compare_explanations(embedder, records, methods, images=images, budget=budget, seed=seed,
                                  progress=progress, targets=targets)
    if result is None:
        return None
    figure = None
    if out_dir is not None:
        figure = str(write_explanation_grid(result, Path(out_dir) / "explanations.png"))
    keep = ("n", "masks", "targets", "randomised_block", "images", "rows")
    return dict({k: result[k] for k in keep}, figure=figure)
