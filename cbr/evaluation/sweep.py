"""Which map to show: CAM methods x target layers, scored against lesion masks (``cbr evaluate
--explain METHODS --target-layer LAYERS``).

For every method, every layer spec and every target, on the same images:

* localisation against the records' ``mask`` (non-empty masks only): the pointing game (the
  map's maximum lies in the lesion), the energy pointing game (the share of the map's mass in it)
  and the IoU of the map's top ``top`` share of pixels with the lesion;
* faithfulness: the deletion AUC (most-attributed pixels removed first; lower is better) on the
  first ``deletion_images`` images, pooled as a ratio of sums (explain.metrics.pooled_auc), with
  its raw parts (``deletion_raw_auc``, ``intact_score``, ``deleted_score``) so folds pool alike;
* cost: seconds per map, after the one trunk pass every method shares.

Targets: ``class`` (the labelled class's logit) when the model has a head, ``similarity`` (the
cosine of the global embeddings to the image's nearest other image in the sample, another
patient's where patients are known; a CAM of it) and ``similarity-matching`` (the same pair, by
region matching at the layer: explain.matching; it needs no CAM method, so its rows carry the
method ``matching``). A layer spec is a dotted module path in the trunk, ``last`` (the trunk
output) or stages joined by ``+`` (maps fused across them: explain.fusion).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from cbr.data.mask import lesion_mask
from cbr.data.sources import read_source
from cbr.errors import CbrError
from cbr.evaluation.comparison import nearest_other, pick_round_robin, score_functions
from cbr.models.maps import at_layer as copy_at, compute_maps
from cbr.reporting.sweep_table import write_sweep
from explain.fusion import fuse_maps, split_layers
from explain.matching import matching_maps
from explain.methods import FUSED_METHODS, get_cam_method
from cbr.store.reliability import guess_verdict
from explain.finding import centre_map
from explain.metrics import energy_pointing_game, iou_top, normalised_auc, pointing_game, pooled_auc, score_curve
from explain.targets import ClassTarget, SimilarityTarget

__all__ = ["SweepSettings", "LAST", "GUESS", "parse_layers", "sweep_maps", "guess_rows", "pool_sweeps", "best_rows",
           "run_sweep", "finish_sweep"]

LAST = "last"  # the trunk output, the layer an empty target_layer means
MATCHING = "matching"  # the method name of region-matching rows
GUESS = "guess"  # the method name of the trivial guesses' rows
CENTRE_GUESS, MEAN_MASK_GUESS = "centre guess", "mean-mask guess"
SWEEP_IMAGES = 48
TARGETS = ("class", "similarity", "similarity-matching")
STATS = ("pointing_game", "energy_pointing_game", "iou_top")
# pooled_auc's figures as row fields: the rows keep the raw parts so that folds pool as a ratio of sums.
CURVE_FIELDS = {"auc": "deletion_auc", "raw_auc": "deletion_raw_auc", "intact": "intact_score",
                "deleted": "deleted_score"}


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep scores (see the module docstring)."""

    methods: tuple[str, ...]  # CAM methods (explain.methods); attribution methods have no layer
    layers: tuple[str, ...]  # layer specs: "features.14", "last", "features.17+last"
    images: int = SWEEP_IMAGES  # images scored, round-robin over the classes
    top: float = 0.2  # share of pixels the IoU selects
    deletion_images: int = 4  # deletion curves cost 11 forward passes per map
    prior: object = None  # the training masks' mean map (S, S): the mean-mask guess row; None: centre guess only
    seed: int = 0


def parse_layers(text) -> tuple[str, ...]:
    """``"features.14, last, features.17+last"`` -> the layer specs, in order, without repeats."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(dict.fromkeys(i.strip() for i in items if str(i).strip()))


def _stage_name(stage: str) -> str:
    return "" if stage in (LAST, "") else stage


def at_layer(embedder, stage: str):
    """A copy of ``embedder`` (same modules) whose CAM layer is ``stage``; an unknown layer is a CbrError."""
    layer = _stage_name(stage)
    if layer:
        try:
            embedder.trunk.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in embedder.trunk.named_children()]
            raise CbrError(f"--target-layer {stage!r}: no such layer in the {embedder.config.backbone} trunk; "
                           f"write a dotted path such as {names[-1]!r}.0 or {LAST!r}") from None
    return copy_at(embedder, layer)


def _masks(pick, config):
    """Each picked record's non-empty mask in the model's view (``config``: its size, crop, window), or None."""
    out = []
    for r in pick:
        path, mask = (r.metadata or {}).get("mask"), None
        if path:
            try:
                mask = lesion_mask(path, config.input_size, crop=config.crop, image=r.path, window=config.window)
            except OSError as e:
                logging.getLogger(__name__).warning("%s: mask unreadable (%s); left out", path, e)
        out.append(mask if mask is not None and mask.any() else None)
    return out


def _row(method, layer, kind, raws, masks, seconds, deletions, top):
    scored = [(float(pointing_game(raws[i], m)), energy_pointing_game(raws[i], m), iou_top(raws[i], m, top))
              for i, m in enumerate(masks) if m is not None]
    stats = {k: (float(np.mean([s[j] for s in scored])) if scored else None) for j, k in enumerate(STATS)}
    deleted = deletions["n"] if deletions else 0
    curve = {field: _finite(deletions[k]) if deleted else None for k, field in CURVE_FIELDS.items()}
    return {"method": method, "layer": layer, "target": kind, "n": len(raws), "localised": len(scored), **stats,
            **curve, "deleted": deleted, "seconds_per_map": seconds / max(1, len(raws))}


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


def _deletions(scores, x, raws, count):
    """The first ``count`` images' deletion curves pooled as a ratio of sums (None without any)."""
    count = min(count, len(raws))
    if count < 1:
        return None
    curves = [score_curve(scores[i], x[i], raws[i], steps=10) for i in range(count)]
    return pooled_auc(curves[0][0], [c for _, c in curves])


def _check(settings: SweepSettings) -> None:
    """CAM methods only, and an IoU share inside (0, 1); CbrError otherwise, before any work."""
    for m in settings.methods:
        try:
            get_cam_method(FUSED_METHODS.get(m, m))
        except ValueError as e:
            raise CbrError(f"{e}; --target-layer sweeps CAM methods only") from None
    if not 0 < settings.top < 1:
        raise CbrError(f"the IoU share must lie between 0 and 1, got {settings.top}")


def sweep_maps(embedder, records, settings: SweepSettings, *, progress: bool = False) -> dict | None:
    """Score every method x layer x target on the same images.

    Args:
        embedder: the model explained (a head adds the class target).
        records: labelled records; a ``mask`` in their metadata adds the localisation columns.
        settings: methods, layers, images, the IoU share, deletion images and seed.
        progress: a progress bar over the rows.

    Returns:
        {"n", "masks", "layers", "methods", "rows": [one dict per method x layer x target]}, or
        None without images. Rows carry n, localised (images with a mask), pointing_game,
        energy_pointing_game, iou_top, deletion_auc (on ``deleted`` images) and seconds_per_map.

    Example:
        >>> sweep_maps(emb, records, SweepSettings(("gradcam", "layercam"), ("features.14", "last")))
    """
    import torch

    _check(settings)
    names = embedder.config.class_names
    classifier = embedder.head is not None
    pick = pick_round_robin(records, names if classifier else (), settings.images, settings.seed)
    if not pick or not settings.layers:
        return None
    x = torch.stack([embedder.preprocess(read_source(r.path, window=embedder.config.window)[0]) for r in pick])
    stages = {s for spec in settings.layers for s in split_layers(spec)}
    clones = {s: at_layer(embedder, s) for s in stages}
    with torch.no_grad():
        vectors = embedder.cam_features(x)[1]
        acts = {s: clones[s].cam_features(x)[0] for s in stages}
    nearest = nearest_other(vectors.numpy(), [r.group for r in pick])
    references = [vectors[j].clone() for j in nearest]
    labels = [names.index(r.label) if classifier else None for r in pick]
    targets = {"similarity": [SimilarityTarget(ref) for ref in references]}
    if classifier:
        targets = {"class": [ClassTarget(c) for c in labels], **targets}
    masks = _masks(pick, embedder.config)
    rows = []
    total = len(targets) * len(settings.methods) * len(settings.layers) + len(settings.layers)
    bar = tqdm(total=total, desc="sweeping maps", unit="row", disable=not progress)
    for kind, tgs in targets.items():
        scores = score_functions(embedder, x, kind, labels, references)
        for method in settings.methods:
            if method in FUSED_METHODS:  # its own stages, whatever the layers asked for
                t0 = time.perf_counter()
                raws = compute_maps(embedder, x, None, tgs, kind == "class", method)
                seconds = time.perf_counter() - t0
                stages = "+".join(embedder.__dict__.get("_fusion_stages") or ())
                rows.append(_row(method, stages, kind, raws, masks, seconds,
                                 _deletions(scores, x, raws, settings.deletion_images), settings.top))
                bar.update(len(settings.layers))
                continue
            for spec in settings.layers:
                t0 = time.perf_counter()
                per_stage = [compute_maps(clones[s], x, acts[s], tgs, kind == "class", method)
                             for s in split_layers(spec)]
                raws = per_stage[0] if len(per_stage) == 1 else fuse_maps(per_stage)
                seconds = time.perf_counter() - t0
                rows.append(_row(method, spec, kind, raws, masks, seconds,
                                 _deletions(scores, x, raws, settings.deletion_images), settings.top))
                bar.update(1)
    scores = score_functions(embedder, x, "similarity", labels, references)
    for spec in settings.layers:
        t0 = time.perf_counter()
        per_stage = [matching_maps(clones[s].grid(acts[s]).float().numpy(),  # a ViT's tokens: its patch grid
                                   clones[s].grid(acts[s][nearest]).float().numpy())
                     for s in split_layers(spec)]
        raws = per_stage[0] if len(per_stage) == 1 else fuse_maps(per_stage)
        seconds = time.perf_counter() - t0
        rows.append(_row(MATCHING, spec, "similarity-matching", raws, masks, seconds,
                         _deletions(scores, x, raws, settings.deletion_images), settings.top))
        bar.update(1)
    bar.close()
    rows += guess_rows(masks, embedder.config.input_size, settings.prior, settings.top)
    return {"n": len(pick), "masks": sum(m is not None for m in masks), "top": settings.top,
            "layers": list(settings.layers), "methods": list(settings.methods), "rows": rows}


def guess_rows(masks, size: int, prior, top: float) -> list[dict]:
    """The trivial guesses scored on the same masks, as sweep rows (method ``guess``): a point at the
    centre and, given ``prior``, the training masks' mean map."""
    guesses = {CENTRE_GUESS: centre_map(size), **({MEAN_MASK_GUESS: prior} if prior is not None else {})}
    return [_row(GUESS, "-", name, [m] * len(masks), masks, 0.0, None, top) for name, m in guesses.items()]


def _pooled_deletion(mean) -> dict:
    """The folds' deletion figures: raw area and end scores averaged, then normalised once (a ratio of
    sums over every fold's images, as within a fold)."""
    out = {field: mean(field, "deleted") for field in ("deletion_raw_auc", "intact_score", "deleted_score")}
    if any(v is None for v in out.values()):
        return dict(out, deletion_auc=None)
    return dict(out, deletion_auc=_finite(normalised_auc(out["deletion_raw_auc"], out["intact_score"],
                                                         out["deleted_score"])))


def pool_sweeps(results: list[dict]) -> dict | None:
    """Sweeps of several folds as one: each figure averaged with its image counts as weights."""
    results = [r for r in results if r]
    if not results:
        return None
    pooled = {}
    for res in results:
        for row in res["rows"]:
            key = (row["method"], row["layer"], row["target"])
            pooled.setdefault(key, []).append(row)
    rows = []
    for (method, layer, target), parts in pooled.items():
        def mean(field, weight):
            pairs = [(p[field], p[weight]) for p in parts if p[field] is not None and p[weight]]
            total = sum(w for _, w in pairs)
            return float(sum(v * w for v, w in pairs) / total) if total else None

        rows.append({"method": method, "layer": layer, "target": target, "n": sum(p["n"] for p in parts),
                     "localised": sum(p["localised"] for p in parts),
                     **{k: mean(k, "localised") for k in STATS},
                     **_pooled_deletion(mean), "deleted": sum(p["deleted"] for p in parts),
                     "seconds_per_map": mean("seconds_per_map", "n")})
    first = results[0]
    return {"n": sum(r["n"] for r in results), "masks": sum(r["masks"] for r in results), "top": first["top"],
            "layers": first["layers"], "methods": first["methods"], "rows": rows, "folds": len(results)}


def best_rows(result: dict) -> dict:
    """Per target, the row with the highest pointing game (ties: energy pointing game, then cost); the
    guesses' rows are the yardstick, not maps to show, so they have no best."""
    best = {}
    for row in result["rows"]:
        if row["pointing_game"] is None or row["method"] == GUESS:
            continue
        key = (row["pointing_game"], row["energy_pointing_game"] or 0.0, -row["seconds_per_map"])
        current = best.get(row["target"])
        if current is None or key > current[0]:
            best[row["target"]] = (key, row)
    return {target: row for target, (_, row) in best.items()}


def run_sweep(embedder, records, config, *, seed: int = 0, progress: bool = False, prior=None) -> dict | None:
    """The sweep an ``EvalConfig`` asks for (its sweep_methods x target_layers), or None; ``prior``: the
    training masks' mean map (the mean-mask guess row)."""
    if not config.target_layers or not config.sweep_methods:
        return None
    settings = SweepSettings(tuple(config.sweep_methods), tuple(config.target_layers), images=config.map_images,
                             seed=seed, prior=prior)
    return sweep_maps(embedder, records, settings, progress=progress)


def finish_sweep(result: dict | None, out_dir=None) -> dict | None:
    """The sweep as the report gives it: the rows, the best row per target, and its files."""
    if result is None:
        return None
    guesses = {r["target"]: r["pointing_game"] for r in result["rows"] if r["method"] == GUESS}
    for row in result["rows"]:
        if row["method"] != GUESS and row["pointing_game"] is not None:
            row.update(guess_verdict(row["pointing_game"], guesses))
    out = dict(result, best=best_rows(result), files=None)
    if out_dir is not None:
        out["files"] = write_sweep(result, out_dir)
    return out
