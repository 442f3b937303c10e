"""The two evaluation protocols (``cbr evaluate``), their metrics, table and report folder.

1. :func:`cross_validate`: patient-grouped, stratified k-fold cross-validation of the whole
   pipeline. Each fold trains a model on the other folds (or takes the backbone as it is),
   indexes them into a temporary case base and queries every held-out image, as a new patient's
   image would be queried. The figures are pooled over the folds.
2. :func:`evaluate_casebase`: a held-out test set against an existing case base. Leakage is
   checked first (the same image, an image a member model was trained on, or a patient already
   in the case base); ``strict`` leaves those images out of the figures.

Decisions:

* Queries go through :class:`cbr.pipeline.query.Searcher` with ``record=False``: evaluation answers
  exactly as ``cbr query`` would, but never writes to the audit trail. Each query passes its
  patient id, so the patient's own cases are never retrieved.
* An abstention counts as a wrong answer in every classification figure (see cbr.evaluation.metrics).
* ``softmax``: when the (first) model has a classification head, its plain softmax predictions on
  the same images get the same classification figures, so the case-based vote can be compared
  with the classifier it came from.
* ``localisation``: when records carry a ``mask`` (metadata) and ``explain`` is not ``none``, the
  query's map (the class map of the predicted class when the model has a head, else the
  similarity map to its neighbours) is scored against the mask, letterboxed like the image.
  Images with an empty mask (no lesion) are left out: there is nothing to point at.
* Figures that are undefined (no sample) are ``null`` in ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbr.data.dataset import ManifestSpec, Problem, Record, read_dataset
from cbr.files import atomic_write
from cbr.errors import CbrError, ImageError

__all__ = ["cross_validate", "evaluate_casebase", "score", "format_table", "write_report", "Outcome"]

LOG = logging.getLogger(__name__)
LEAKAGE_EXAMPLES = 20


@dataclass
class Outcome:
    """One evaluated query."""

    record: Record
    prediction: dict  # Answer.prediction: label, confidence, probabilities, abstained, credibility
    neighbours: list[str]  # the first member's neighbour labels, best first
    softmax: list[float] | None = None  # head probabilities in ``softmax_classes`` order
    maps: dict = field(default_factory=dict, repr=False)  # raw query maps by target
    fold: int | None = None


# ---------------------------------------------------------------------------------------------
# helpers shared by both protocols


def _records(source, records, manifest, progress):
    if records is not None:
        return list(records), [], str(source) if source is not None else "<records>"
    if source is None:
        raise CbrError("give a dataset (a folder of class folders or a CSV manifest) or records")
    scan = read_dataset(source, manifest, progress=progress)
    if not scan.records:
        raise CbrError(f"{source}: no usable images; see the problems listed by `cbr index`")
    return list(scan.records), list(scan.problems), scan.source


def _run_queries(searcher, records, *, fold=None, progress=False, desc="querying"):
    """Query every record (its patient excluded, nothing recorded): outcomes and problems."""
    from tqdm import tqdm

    outcomes, problems = [], []
    for r in tqdm(records, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            a = searcher.query(r.path, patient=r.group, record=False, render=False)
        except ImageError as e:
            problems.append(Problem(r.path, e.reason))
            continue
        outcomes.append(Outcome(record=r, prediction=a.prediction,
                                neighbours=[n["label"] for n in a.neighbours],
                                maps=dict(a.raw_maps), fold=fold))
    return outcomes, problems


def _add_softmax(embedder, outcomes, *, batch_size=32, num_workers=None, device="cpu") -> list[str] | None:
    """Fill ``outcome.softmax`` from the model's head; returns the head's classes (None: no head)."""
    import torch

    from cbr.data.batches import iter_batches

    if embedder is None or embedder.head is None or not outcomes:
        return None
    records = [o.record for o in outcomes]
    embedder.eval()
    for idx, tensors, _bad in iter_batches(records, [embedder.preprocess], batch_size, num_workers):
        if not idx:
            continue
        with torch.no_grad():
            proba = torch.softmax(embedder.logits(tensors[0].to(device)).float(), dim=1).cpu().numpy()
        for i, p in zip(idx, proba):
            outcomes[i].softmax = [float(v) for v in p]
    return list(embedder.config.class_names)


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        return _nan_to_none(x.item())
    return x


def _classification(truth, pred, proba, confidence, classes) -> dict:
    from cbr.evaluation.metrics import classification_report, expected_calibration_error, reliability_bins

    out = classification_report(truth, pred, proba, classes)
    correct = [p is not None and p == t for t, p in zip(truth, pred)]
    out["ece"] = expected_calibration_error(confidence, correct)
    out["reliability"] = reliability_bins(confidence, correct)
    return out


FAITHFULNESS_IMAGES = 8  # per model: deletion curves cost (steps + 1) forward passes per image


def explanation_checks(embedder, records, method: str, *, n: int = FAITHFULNESS_IMAGES, seed: int = 0) -> dict | None:
    """Faithfulness and sanity of a model's maps on up to ``n`` images.

    * deletion: remove the most-attributed pixels first and track the target score (the labelled
      class's probability with a head, else the cosine to the image's own embedding); the AUC is
      compared with a random map's (lower is better: a faithful map makes the score fall fast);
    * model randomisation (Adebayo et al.): Spearman correlation between the maps of the model
      and of a copy whose last block is re-initialised (low: the maps depend on the weights).
    """
    import torch

    from cbr.data.image import read_image
    from cbr.models.maps import compute_maps
    from explain.metrics import deletion_curve, random_deletion_auc, randomisation_check
    from explain.targets import ClassTarget, EmbeddingNormTarget

    if method == "none" or not records:
        return None
    names = embedder.config.class_names
    pick = [r for r in records if embedder.head is None or r.label in names][:n]
    if not pick:
        return None
    x = torch.stack([embedder.preprocess(read_image(r.path)[0]) for r in pick])
    classifier = embedder.head is not None
    targets = [ClassTarget(names.index(r.label)) if classifier else EmbeddingNormTarget() for r in pick]
    with torch.no_grad():
        acts, ref = embedder.cam_features(x)
    maps = compute_maps(embedder, x, acts, targets, classifier, method)
    deletion, chance = [], []
    for i, r in enumerate(pick):
        if classifier:
            c = names.index(r.label)

            def score(batch, c=c):
                with torch.no_grad():
                    return torch.softmax(embedder.logits(batch).float(), dim=1)[:, c]
        else:
            def score(batch, e=ref[i]):
                with torch.no_grad():
                    return embedder(batch) @ e
        deletion.append(deletion_curve(score, x[i], maps[i])[2])
        chance.append(random_deletion_auc(score, x[i], seed=seed + i))
    last_block = [name for name, _ in embedder.trunk.named_children()][-1]
    head = embedder.classifier_head() if classifier else embedder.neck
    rho = randomisation_check(embedder.trunk, head, last_block, x, targets, method if method != "scorecam" else "gradcam")
    return {"n": len(pick), "target": "class probability" if classifier else "self-similarity",
            "deletion_auc": float(np.nanmean(deletion)), "random_deletion_auc": float(np.nanmean(chance)),
            "randomisation_spearman": float(rho), "randomised_block": last_block}


def lesion_mask(path: str, size: int) -> np.ndarray:
    """A mask image letterboxed like the model's input, as a bool array (size, size)."""
    from PIL import Image

    from cbr.data.image import letterbox

    with Image.open(path) as m:
        boxed = letterbox(m.convert("L").convert("RGB"), size)
    return np.asarray(boxed)[:, :, 0] > 127


def _localisation(outcomes, input_size: int) -> dict | None:
    """Pointing game, energy pointing game and IoU of the query maps against the masks."""
    from explain.metrics import energy_pointing_game, iou, pointing_game

    scored: dict[str, list[tuple[str, bool, float, float]]] = {}
    for o in outcomes:
        mask_path = o.record.metadata.get("mask") if o.record.metadata else None
        if not mask_path or not o.maps:
            continue
        try:
            mask = lesion_mask(mask_path, input_size)
        except OSError as e:
            LOG.warning("%s: mask unreadable (%s); left out of the localisation figures", mask_path, e)
            continue
        if not mask.any():
            continue
        for target, raw in o.maps.items():
            kind = target.split(":", 1)[0]
            scored.setdefault(kind, []).append(
                (o.record.label, pointing_game(raw, mask), energy_pointing_game(raw, mask), iou(raw, mask)))
    if not scored:
        return None

    def block(rows):
        return {"n": len(rows), "pointing_game": float(np.mean([r[1] for r in rows])),
                "energy_pointing_game": float(np.mean([r[2] for r in rows])),
                "iou": float(np.mean([r[3] for r in rows]))}

    by_map = {}
    for kind, rows in scored.items():
        b = block(rows)
        b["per_class"] = {c: block([r for r in rows if r[0] == c]) for c in sorted({r[0] for r in rows})}
        by_map[kind] = b
    primary = "class" if "class" in by_map else sorted(by_map)[0]
    return {"map": primary, **by_map[primary], "by_map": by_map}


def score(outcomes, classes, *, k: int, softmax_classes=None, input_size: int | None = None,
          localise: bool = False) -> dict:
    """The metrics dict of a list of :class:`Outcome`s (see the module docstring for the keys)."""
    from cbr.evaluation.metrics import abstention, mean_average_precision, precision_at_k

    classes = sorted(set(classes) | {o.record.label for o in outcomes})
    truth = [o.record.label for o in outcomes]
    pred = [None if o.prediction["abstained"] else o.prediction["label"] for o in outcomes]
    proba = np.array([[o.prediction["probabilities"].get(c, 0.0) for c in classes] for o in outcomes],
                     dtype=np.float64).reshape(len(outcomes), len(classes))
    conf = [float(o.prediction["confidence"]) for o in outcomes]
    metrics = _classification(truth, pred, proba if outcomes else None, conf, classes)
    neigh = [o.neighbours for o in outcomes]
    metrics["precision_at_k"] = precision_at_k(truth, neigh, k) if outcomes else math.nan
    metrics["map"] = mean_average_precision(truth, neigh)
    correct = [p is not None and p == t for t, p in zip(truth, pred)]
    metrics["abstention"] = abstention([o.prediction["abstained"] for o in outcomes], correct)
    metrics["softmax"] = None
    with_softmax = [o for o in outcomes if o.softmax is not None]
    if softmax_classes and with_softmax:
        sc = list(softmax_classes)
        col = {c: sc.index(c) for c in sc}
        s_truth = [o.record.label for o in with_softmax]
        s_full = np.array([o.softmax for o in with_softmax], dtype=np.float64)
        s_pred = [sc[int(i)] for i in s_full.argmax(axis=1)]
        s_proba = np.array([[row[col[c]] if c in col else 0.0 for c in classes] for row in s_full])
        metrics["softmax"] = _classification(s_truth, s_pred, s_proba, s_full.max(axis=1).tolist(), classes)
        metrics["softmax"]["n"] = len(with_softmax)
    metrics["localisation"] = _localisation(outcomes, input_size) if localise and input_size else None
    metrics["n"] = len(outcomes)
    metrics["classes"] = classes
    return metrics


def _fold_figures(outcomes, classes) -> dict:
    from cbr.evaluation.metrics import accuracy, balanced_accuracy

    truth = [o.record.label for o in outcomes]
    pred = [None if o.prediction["abstained"] else o.prediction["label"] for o in outcomes]
    return {"n_test": len(outcomes), "accuracy": accuracy(truth, pred),
            "balanced_accuracy": balanced_accuracy(truth, pred, classes)}


def _softmax_bacc(outcomes, head_classes, classes):
    from cbr.evaluation.metrics import balanced_accuracy

    soft = [o for o in outcomes if o.softmax is not None]
    if not head_classes or not soft:
        return None
    return balanced_accuracy([o.record.label for o in soft],
                             [head_classes[int(np.argmax(o.softmax))] for o in soft], classes)


# ---------------------------------------------------------------------------------------------
# reports


def write_report(metrics: dict, out_dir, outcomes=()) -> Path:
    """Write ``metrics.json`` (atomically), ``confusion_matrix.png``, ``reliability.png`` and
    ``predictions.csv`` into ``out_dir``; returns the folder."""
    import io

    from cbr.evaluation.metrics import plot_confusion, plot_reliability

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbrError(f"--out {out_dir}: cannot create the report folder ({e.strerror or e}); choose another --out") from None
    if metrics.get("n"):
        plot_confusion(metrics["confusion_matrix"], metrics["classes"], out / "confusion_matrix.png")
        plot_reliability(metrics["reliability"], out / "reliability.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "group", "fold", "prediction", "confidence", "abstained", "softmax_prediction",
                "neighbours"])
    classes = metrics.get("softmax_classes") or []
    for o in outcomes:
        sp = classes[int(np.argmax(o.softmax))] if o.softmax is not None and classes else ""
        w.writerow([o.record.path, o.record.label, o.record.group or "", "" if o.fold is None else o.fold,
                    o.prediction["label"] or "", f"{o.prediction['confidence']:.6f}", int(o.prediction["abstained"]),
                    sp, " ".join(o.neighbours)])
    atomic_write(out / "predictions.csv", buf.getvalue())
    atomic_write(out / "metrics.json", json.dumps(_nan_to_none(metrics), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# protocol 1: grouped cross-validation


def cross_validate(
    source=None,
    *,
    records=None,
    folds: int = 5,
    k: int = 5,
    vote: str = "weighted",
    explain: str = "none",
    train: bool = True,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    epochs: int = 10,
    img_size: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    patience: int | None = 3,
    train_layers: int | None = None,
    seed: int = 0,
    device: str | None = None,
    num_workers: int | None = None,
    out_dir=None,
    progress: bool = False,
    manifest: ManifestSpec | None = None,
) -> dict:
    """Patient-grouped, stratified k-fold cross-validation of train -> index -> query.

    Args:
        source: a class-folder dataset or a CSV manifest (or give ``records``).
        records: evaluate these ``Record``s instead of reading ``source``.
        folds: number of folds (no patient spans two).
        k: neighbours per query; vote: a VOTE_RULES name; explain: a CAM method or ``none``
            (a method adds the localisation figures when records have masks).
        train: fine-tune a model per fold (``train_model``); False uses the backbone's weights
            as they are (e.g. frozen ImageNet features).
        backbone, weights, epochs, img_size, batch_size, lr, patience, train_layers, seed,
            device: as for ``train_model`` (``img_size``/``seed`` also apply with ``train=False``).
        num_workers: decoding workers.
        out_dir: write the report folder here (None: no files).
        progress: progress bars.
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).

    Returns:
        The pooled metrics, plus ``folds`` (each fold's figures), ``config``, ``elapsed_s``,
        ``protocol`` and ``report`` (the folder, or None).

    Example:
        >>> m = cross_validate("data/brain_mri", folds=5, epochs=4, img_size=160)
        >>> m["balanced_accuracy"], m["softmax"]["balanced_accuracy"]
    """
    from cbr.store.casebase import open_casebase
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder
    from cbr.pipeline.index import index_dataset
    from cbr.evaluation.metrics import grouped_folds
    from cbr.pipeline.query import Searcher
    from cbr.learn.train import _resolve_device, train_model
    from cbr.pipeline.vote import get_vote_rule

    t0 = time.monotonic()
    get_vote_rule(vote)  # unknown names fail before any work
    _check_explain(explain)
    if k < 1:
        raise CbrError(f"-k {k}: ask for at least 1 neighbour")
    device = _resolve_device(device)
    recs, problems, shown = _records(source, records, manifest, progress)
    classes = sorted({r.label for r in recs})
    if len(classes) < 2:
        raise CbrError(f"{shown}: only one class ({classes[0]!r}); evaluation needs at least 2 classes")
    fold_of = grouped_folds([r.label for r in recs], [r.group for r in recs], folds, seed=seed)
    config = {"protocol": "cross-validation", "source": shown, "folds": folds, "k": k, "vote": vote,
              "explain": explain, "train": train, "backbone": backbone, "weights": weights,
              "epochs": epochs if train else None, "img_size": img_size, "batch_size": batch_size, "lr": lr,
              "patience": patience, "train_layers": train_layers, "seed": seed, "device": device}

    outcomes, fold_rows, softmax_classes, input_size = [], [], None, None
    faithfulness: list[dict] = []
    for f in range(folds):
        tf = time.monotonic()
        train_recs = [r for r, g in zip(recs, fold_of) if g != f]
        test_recs = [r for r, g in zip(recs, fold_of) if g == f]
        shared = {r.group for r in train_recs if r.group is not None} & {r.group for r in test_recs}
        if shared:  # grouped_folds guarantees this; a failure here is a bug, never a figure
            raise CbrError(f"fold {f + 1}: patient(s) {sorted(shared)[:3]} on both sides; refusing to report")
        if progress:
            from tqdm import tqdm

            tqdm.write(f"fold {f + 1}/{folds}: {len(train_recs)} training images, {len(test_recs)} held out")
        row = {"fold": f + 1, "n_train": len(train_recs)}
        with tempfile.TemporaryDirectory(prefix="cbr-cv-") as tmp:
            ckpt = Path(tmp) / "model.pt"
            if train:
                res = train_model(records=train_recs, out=ckpt, backbone=backbone, weights=weights, epochs=epochs,
                                  img_size=img_size, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                  patience=patience, train_layers=train_layers, num_workers=num_workers,
                                  progress=progress)
                problems.extend(res.problems)
                row.update(epochs_run=res.epochs_run, best_epoch=res.best_epoch,
                           best_val_balanced_accuracy=res.best_val_balanced_accuracy,
                           train_seconds=round(res.elapsed, 1))
            else:
                emb = create_embedder(backbone, weights=weights, input_size=img_size, seed=seed)
                save_checkpoint(emb, ckpt, extra={"dataset": shown, "note": "untrained backbone (evaluate --no-train)"})
            cb = open_casebase(Path(tmp) / "cases.db")
            try:
                report = index_dataset(cb, records=train_recs, models=[str(ckpt)], explain="none",
                                       batch_size=batch_size, progress=progress, num_workers=num_workers,
                                       device=device)
                problems.extend(report.problems)
                searcher = Searcher(cb, k=k, vote=vote, explain=explain, device=device)
                got, bad = _run_queries(searcher, test_recs, fold=f + 1, progress=progress,
                                        desc=f"fold {f + 1} queries")
                problems.extend(bad)
                emb = searcher.members[0].embedder
                input_size = emb.config.input_size
                head_classes = _add_softmax(emb, got, batch_size=batch_size, num_workers=num_workers, device=device)
                softmax_classes = head_classes or softmax_classes
                checks = explanation_checks(emb, test_recs, explain, n=max(1, FAITHFULNESS_IMAGES // folds), seed=seed)
                if checks:
                    faithfulness.append(checks)
            finally:
                cb.close()
        row.update(_fold_figures(got, classes))
        row["softmax_balanced_accuracy"] = _softmax_bacc(got, head_classes, classes)
        row["seconds"] = round(time.monotonic() - tf, 1)
        fold_rows.append(row)
        outcomes.extend(got)
        if progress:
            from tqdm import tqdm

            tqdm.write(_fold_line(row))

    metrics = score(outcomes, classes, k=k, softmax_classes=softmax_classes, input_size=input_size,
                    localise=explain != "none")
    metrics["faithfulness"] = _pool_checks(faithfulness)
    metrics.update(protocol="cross-validation", folds=fold_rows, config=config,
                   softmax_classes=softmax_classes,
                   problems=[{"path": p.path, "reason": p.reason} for p in _unique(problems)],
                   elapsed_s=round(time.monotonic() - t0, 1), report=None)
    if out_dir is not None:
        metrics["report"] = str(out_dir)
        write_report(metrics, out_dir, outcomes)
    return _nan_to_none(metrics)


def _pool_checks(rows: list[dict]) -> dict | None:
    """Explanation checks of several folds, weighted by their image counts."""
    if not rows:
        return None
    n = sum(r["n"] for r in rows)
    out = {key: float(sum(r[key] * r["n"] for r in rows) / n)
           for key in ("deletion_auc", "random_deletion_auc", "randomisation_spearman")}
    return dict(out, n=n, target=rows[0]["target"], randomised_block=rows[0]["randomised_block"])


def _unique(problems):
    seen, out = set(), []
    for p in problems:
        if (p.path, p.reason) not in seen:
            seen.add((p.path, p.reason))
            out.append(p)
    return out


def _check_explain(explain: str) -> None:
    if explain == "none":
        return
    from explain.methods import get_cam_method

    try:
        get_cam_method(explain)
    except (KeyError, ValueError) as e:
        raise CbrError(str(e.args[0] if e.args else e)) from None


def _fold_line(row: dict) -> str:
    line = f"fold {row['fold']}: balanced accuracy {row['balanced_accuracy']:.3f} (vote)"
    if row.get("softmax_balanced_accuracy") is not None:
        line += f", {row['softmax_balanced_accuracy']:.3f} (softmax)"
    return line + f", {row['n_test']} images, {row['seconds']:.0f} s"


# ---------------------------------------------------------------------------------------------
# protocol 2: a held-out test set against an existing case base


def _leakage(cb, members, records):
    """Test records that leak: (leakage dict, set of leaking record indices)."""
    from sqlalchemy import select

    from cbr.models.checkpoint import load_checkpoint
    from cbr.store.schema import Case, Model

    with cb.read() as s:
        rows = s.execute(select(Case.sha256, Case.group_id).where(Case.removed_at.is_(None))).all()
        models = s.scalars(select(Model).where(Model.id.in_([m.model_id for m in members]))).all()
    case_sha = {sha for sha, _ in rows}
    case_groups = {g for _, g in rows if g is not None}
    trained: set[str] = set()
    for m in models:
        if m.weights == "checkpoint":
            _, rest = load_checkpoint(m.source)
            trained.update(rest.get("train_sha256", []))
    counts = {"same_image": 0, "in_training_set": 0, "same_group": 0}
    leaking, examples = set(), []
    for i, r in enumerate(records):
        reasons = []
        if r.sha256 in case_sha:
            reasons.append("same_image")
        if r.sha256 in trained:
            reasons.append("in_training_set")
        if r.group is not None and r.group in case_groups:
            reasons.append("same_group")
        for reason in reasons:
            counts[reason] += 1
        if reasons:
            leaking.add(i)
            if len(examples) < LEAKAGE_EXAMPLES:
                examples.append({"path": r.path, "group": r.group, "reasons": reasons})
    return {**counts, "images": len(leaking), "examples": examples}, leaking


def evaluate_casebase(
    cb,
    source=None,
    *,
    records=None,
    k: int = 5,
    vote: str = "weighted",
    models=None,
    strict: bool = False,
    explain: str = "none",
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int | None = None,
    out_dir=None,
    progress: bool = False,
    manifest: ManifestSpec | None = None,
) -> dict:
    """Evaluate a held-out test set against an existing case base, leakage checked first.

    A test image leaks when its sha256 is a case of the case base (``same_image``), when a member
    model was trained on it (``in_training_set``: the checkpoint's ``train_sha256``), or when its
    patient/group id is in the case base (``same_group``). Leaks are counted under ``leakage``;
    with ``strict`` those images are left out of every figure.

    Args:
        cb: an open CaseBase.
        source: the test set, a class-folder dataset or a CSV manifest (or give ``records``).
        k, vote, explain: as for ``cbr query``.
        models: restrict to these members (names, checkpoint paths or fingerprints).
        strict: exclude leaking images from the metrics.
        batch_size, device, num_workers: for the softmax pass.
        out_dir: write the report folder here (None: no files).
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).

    Example:
        >>> m = evaluate_casebase(open_casebase("cases.db"), "data/test.csv", strict=True)
        >>> m["leakage"], m["balanced_accuracy"]
    """
    from sqlalchemy import select

    from cbr.pipeline.query import Searcher
    from cbr.store.schema import Case
    from cbr.learn.train import _resolve_device
    from cbr.pipeline.vote import get_vote_rule

    t0 = time.monotonic()
    get_vote_rule(vote)
    _check_explain(explain)
    device = _resolve_device(device)
    recs, problems, shown = _records(source, records, manifest, progress)
    searcher = Searcher(cb, models=models, k=k, vote=vote, explain=explain, device=device)
    leakage, leaking = _leakage(cb, searcher.members, recs)
    leakage["excluded"] = len(leaking) if strict else 0
    if leaking and not strict:
        LOG.warning("%d test image(s) leak into the case base or a model's training set; "
                    "use --strict to leave them out", len(leaking))
    test = [r for i, r in enumerate(recs) if not (strict and i in leaking)]
    outcomes, bad = _run_queries(searcher, test, progress=progress)
    problems.extend(bad)
    emb = next((m.embedder for m in searcher.members if m.embedder.head is not None), None)
    softmax_classes = _add_softmax(emb, outcomes, batch_size=batch_size, num_workers=num_workers, device=device)
    with cb.read() as s:
        cb_classes = set(s.scalars(select(Case.label).where(Case.removed_at.is_(None)).distinct()))
    input_size = searcher.members[0].embedder.config.input_size
    metrics = score(outcomes, cb_classes | {r.label for r in test}, k=k, softmax_classes=softmax_classes,
                    input_size=input_size, localise=explain != "none")
    metrics["faithfulness"] = explanation_checks(emb or searcher.members[0].embedder, test, explain, seed=0)
    config = {"protocol": "held-out", "casebase": cb.display, "source": shown, "k": k, "vote": vote,
              "explain": explain, "strict": strict, "models": [m.label for m in searcher.members],
              "device": device}
    metrics.update(protocol="held-out", leakage=leakage, config=config, softmax_classes=softmax_classes,
                   problems=[{"path": p.path, "reason": p.reason} for p in _unique(problems)],
                   elapsed_s=round(time.monotonic() - t0, 1), report=None)
    if out_dir is not None:
        metrics["report"] = str(out_dir)
        write_report(metrics, out_dir, outcomes)
    return _nan_to_none(metrics)


# ---------------------------------------------------------------------------------------------
# the terminal table


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def format_table(metrics: dict) -> str:
    """A readable summary of a metrics dict from either protocol."""
    cfg = metrics.get("config", {})
    soft = metrics.get("softmax")
    lines = []
    if metrics.get("protocol") == "cross-validation":
        what = (f"{cfg.get('folds')}-fold patient-grouped cross-validation"
                f" ({'fine-tuned ' + str(cfg.get('backbone')) if cfg.get('train') else str(cfg.get('backbone')) + ' as is'})")
    else:
        what = f"held-out test set against {cfg.get('casebase')}"
    lines.append(f"{what}: {metrics['n']} images, {len(metrics['classes'])} classes, k={cfg.get('k')}, "
                 f"vote {cfg.get('vote')}")
    lines.append("")
    lines.append(f"{'':<22}{'vote':>10}{'softmax' if soft else '':>10}")
    rows = [("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("AUC (macro OvR)", "auc"),
            ("ECE", "ece")]
    for name, key in rows:
        lines.append(f"{name:<22}{_f(metrics.get(key)):>10}{_f(soft.get(key)) if soft else '':>10}")
    lines.append(f"{'precision@' + str(cfg.get('k')):<22}{_f(metrics.get('precision_at_k')):>10}")
    lines.append(f"{'mAP':<22}{_f(metrics.get('map')):>10}")
    ab = metrics.get("abstention") or {}
    lines.append(f"{'abstention rate':<22}{_f(ab.get('rate')):>10}   accuracy on answered {_f(ab.get('accuracy_answered'))}")
    lines.append("")
    lines.append(f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c, v in metrics["per_class"].items():
        lines.append(f"{str(c)[:21]:<22}{_f(v['precision']):>10}{_f(v['recall']):>10}{_f(v['f1']):>10}{v['support']:>9}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    width = max([len(str(c)) for c in metrics["classes"]] + [6])
    lines.append(" " * (width + 2) + "".join(f"{str(c)[:width]:>{width + 2}}" for c in metrics["classes"]))
    for c, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        lines.append(f"{str(c)[:width]:<{width + 2}}" + "".join(f"{v:>{width + 2}}" for v in row))
    loc = metrics.get("localisation")
    if loc:
        lines.append("")
        lines.append(f"localisation ({loc['map']} maps, {loc['n']} images with a lesion mask): pointing game "
                     f"{_f(loc['pointing_game'])}, energy pointing game {_f(loc['energy_pointing_game'])}, "
                     f"IoU {_f(loc['iou'])}")
    faith = metrics.get("faithfulness")
    if faith:
        lines.append(f"faithfulness ({faith['n']} images, {faith['target']}): deletion AUC {_f(faith['deletion_auc'])} "
                     f"vs random map {_f(faith['random_deletion_auc'])} (lower is better); sanity: rank "
                     f"correlation with {faith['randomised_block']} re-initialised {_f(faith['randomisation_spearman'])}")
    if metrics.get("folds"):
        lines.append("")
        parts = []
        for r in metrics["folds"]:
            s = _f(r.get("balanced_accuracy"))
            if r.get("softmax_balanced_accuracy") is not None:
                s += f"/{_f(r['softmax_balanced_accuracy'])}"
            parts.append(s)
        lines.append("balanced accuracy per fold (vote" + ("/softmax" if soft else "") + "): " + "  ".join(parts))
    leak = metrics.get("leakage")
    if leak is not None:
        lines.append("")
        lines.append(f"leakage: {leak['same_image']} same image, {leak['in_training_set']} in a model's training set, "
                     f"{leak['same_group']} same patient/group; {leak['images']} image(s) in all, "
                     + (f"{leak['excluded']} excluded (--strict)" if leak["excluded"] else
                        ("included (use --strict to exclude)" if leak["images"] else "none found")))
    if metrics.get("problems"):
        lines.append(f"skipped {len(metrics['problems'])} file(s); see problems in metrics.json")
    lines.append(f"elapsed {metrics.get('elapsed_s', 0):.1f} s")
    return "\n".join(line.rstrip() for line in lines)
