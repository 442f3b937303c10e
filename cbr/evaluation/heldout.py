"""Protocol 2 (``cbr evaluate --db``): a held-out test set against an existing case base.

Leakage is checked first (the same image, an image a member model was trained on, or a patient
already in the case base; see :mod:`cbr.evaluation.leakage`); ``strict`` leaves those images
out of the figures.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from cbr.data.dataset import ManifestSpec
from cbr.data.sources import check_window
from cbr.evaluation.by_finding import search_by_finding
from cbr.evaluation.comparison import comparison_report
from cbr.evaluation.config import EvalConfig
from cbr.evaluation.faithfulness import explanation_checks
from cbr.evaluation.leakage import find_leakage
from cbr.evaluation.localisation import reliability_from
from cbr.evaluation.outcome import load_records, run_queries, unique_problems
from cbr.evaluation.scoring import score
from cbr.evaluation.selective import add_selective, foreign_typicality, read_foreign, write_selective
from cbr.evaluation.softmax import add_softmax
from cbr.evaluation.sweep import finish_sweep, run_sweep
from cbr.models.device import resolve_device
from cbr.models.maps import map_layer
from cbr.pipeline.patient import check_key
from cbr.pipeline.query import Searcher
from cbr.reporting.report_folder import json_safe, write_report
from cbr.store.reliability import reliability_of, store_reliability
from cbr.store.schema import Case

__all__ = ["evaluate_casebase"]

LOG = logging.getLogger(__name__)


def _case_classes(cb) -> set[str]:
    with cb.read() as s:
        return set(s.scalars(select(Case.label).where(Case.removed_at.is_(None)).distinct()))


def _keep_reliability(cb, member, method: str, figures):
    """Store the pointing game of ``member``'s query maps with its model; the stored figures, or None."""
    measured = reliability_from(figures, method, map_layer(member.embedder, method))
    if measured is None:
        return None
    if getattr(cb, "readonly", False):
        LOG.warning("case base %s is read-only: the maps' pointing game is not stored with the model", cb.display)
        return None
    store_reliability(cb, member.model_id, measured)
    with cb.read() as s:
        return reliability_of(s, [member.model_id])[member.model_id]


def _map_studies(metrics: dict, embedder, test, config: EvalConfig, progress: bool) -> None:
    """The methods' comparison (``--compare``) and the layer sweep (``--target-layer``), when asked for."""
    if config.compare:
        metrics["comparison"] = comparison_report(embedder, test, config.compare, out_dir=config.out_dir,
                                                  budget=config.explain_budget, progress=progress)
    if config.target_layers:
        metrics["map_sweep"] = finish_sweep(run_sweep(embedder, test, config, progress=progress), config.out_dir)


def _priors(searcher) -> dict:
    """{None: the first member's training masks' mean map} when its localiser carries one (the
    mean-mask guess; held-out outcomes have no fold)."""
    loc = searcher.localisers.get(searcher.members[0].model_id) if searcher.members else None
    mean = getattr(loc, "mean_mask", None)
    return {} if mean is None else {None: mean}


def evaluate_casebase(
    cb,
    source=None,
    config: EvalConfig = EvalConfig(),
    *,
    models=None,
    strict: bool = False,
    records=None,
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
        config: k, vote, explain as for ``cbr query``; batch size, device and workers of the
            softmax pass; the report folder (see ``EvalConfig``).
        models: restrict to these members (names, checkpoint paths or fingerprints).
        strict: exclude leaking images from the metrics.
        records: evaluate these ``Record``s instead of reading ``source``.
        progress: progress bars.
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).

    Example:
        >>> m = evaluate_casebase(open_casebase("cases.db"), "data/test.csv", strict=True)
        >>> m["leakage"], m["balanced_accuracy"]
    """
    t0 = time.monotonic()
    config.check()
    device = resolve_device(config.device)
    # the test set's patient ids must be hashed with the case base's own key to find its patients
    if records is None:
        check_key(cb, config.sources.pseudonymise, "evaluate")
    recs, problems, shown = load_records(source, records, manifest, progress, config.sources)
    # the vote is scored as given; typicality is scored apart (selective, ood)
    searcher = Searcher(cb, models=models, k=config.k, vote=config.vote, explain=config.explain, device=device,
                        answer_anyway=True, where=config.where, temperature=config.temperature,
                        coverage=config.coverage)
    check_window(config.sources.window, [m.embedder.config.window for m in searcher.members], "evaluate")
    leakage, leaking = find_leakage(cb, searcher.members, recs)
    leakage["excluded"] = len(leaking) if strict else 0
    if leaking and not strict:
        LOG.warning("%d test image(s) leak into the case base or a model's training set; "
                    "use --strict to leave them out", len(leaking))
    test = [r for i, r in enumerate(recs) if not (strict and i in leaking)]
    outcomes, bad = run_queries(searcher, test, progress=progress)
    problems.extend(bad)
    emb = next((m.embedder for m in searcher.members if m.embedder.head is not None), None)
    softmax_classes = add_softmax(emb, outcomes, batch_size=config.batch_size, num_workers=config.num_workers,
                                  device=device)
    input_size = searcher.members[0].embedder.config.input_size
    metrics = score(outcomes, _case_classes(cb) | {r.label for r in test}, k=config.k,
                    softmax_classes=softmax_classes, input_size=input_size, localise=config.explain != "none",
                    model=searcher.members[0].embedder.config, priors=_priors(searcher))
    metrics["map_reliability"] = _keep_reliability(cb, searcher.members[0], config.explain, metrics["localisation"])
    metrics["calibration"] = searcher.calibration_info(metrics["classes"])  # where the vote was calibrated
    metrics["faithfulness"] = explanation_checks(emb or searcher.members[0].embedder, test, config.explain, seed=0)
    if "finding" in config.by:  # each lesion queried by region among the findings, beside the whole images
        metrics["finding_search"] = search_by_finding(searcher, test, outcomes, config.k, problems, progress)

    add_selective(metrics, outcomes,
                  foreign_typicality(searcher, read_foreign(config.ood), progress=progress) if config.ood else None)
    _map_studies(metrics, emb or searcher.members[0].embedder, test, config, progress)
    settings = {"protocol": "held-out", "casebase": cb.display, "source": shown, "k": config.k, "vote": config.vote,
                "explain": config.explain, "strict": strict, "models": [m.label for m in searcher.members],
                "device": device, "sources": config.sources.to_dict()}
    metrics.update(protocol="held-out", leakage=leakage, config=settings, softmax_classes=softmax_classes,
                   problems=unique_problems(problems), elapsed_s=round(time.monotonic() - t0, 1), report=None)
    if config.out_dir is not None:
        metrics["report"] = str(config.out_dir)
        write_report(metrics, config.out_dir, outcomes, model=searcher.members[0].embedder.config)
        write_selective(metrics, config.out_dir)
    return json_safe(metrics)
