"""Protocol 1 (``cbr evaluate`` without ``--db``): patient-grouped k-fold cross-validation.

Each fold trains a model on the other folds (or takes the backbone as it is), indexes them into
a temporary case base and queries every held-out image, as a new patient's image would be
queried. The figures are pooled over the folds.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from cbr.data.dataset import ManifestSpec
from cbr.errors import CbrError
from cbr.evaluation.by_finding import finding_figures, finding_outcomes
from cbr.evaluation.comparison import comparison_report
from cbr.evaluation.config import EvalConfig
from cbr.evaluation.faithfulness import explanation_checks, FAITHFULNESS_IMAGES, pool_checks
from cbr.evaluation.members import Member, MemberViews, plan_members
from cbr.evaluation.outcome import load_records, run_queries, unique_problems
from cbr.evaluation.scoring import fold_figures, score
from cbr.evaluation.selective import add_selective, foreign_typicality, read_foreign, write_selective
from cbr.evaluation.softmax import add_softmax
from cbr.data.splits import grouped_folds
from cbr.evaluation.sweep import finish_sweep, pool_sweeps, run_sweep
from cbr.lazy_import import LazyModule
from cbr.learn.config import TrainConfig
from cbr.learn.guidance import check_guidance, lesion_masks
from cbr.learn.segmentation import mean_mask
from cbr.learn.train import train_model
from cbr.models.checkpoint import save_checkpoint
from cbr.models.device import resolve_device
from cbr.pipeline.index import index_dataset
from cbr.pipeline.query import Searcher
from cbr.reporting.report_folder import json_safe, write_report
from cbr.store.casebase import open_casebase

__all__ = ["cross_validate"]
models_embedder = LazyModule("cbr.models.embedder")  # torch-bound: loads on first use


def _fold_line(row: dict) -> str:
    line = f"fold {row['fold']}: balanced accuracy {row['balanced_accuracy']:.3f} (vote)"
    if row.get("softmax_balanced_accuracy") is not None:
        line += f", {row['softmax_balanced_accuracy']:.3f} (softmax)"
    return line + f", {row['n_test']} images, {row['seconds']:.0f} s"


def _say(progress: bool, line: str) -> None:
    if progress:
        tqdm.write(line)


def _fold_model(ckpt: Path, train_recs, training: TrainConfig, train: bool, shown: str, progress: bool):
    """Write the fold's model to ``ckpt``: (fold-row figures, problems)."""
    if not train:
        emb = models_embedder.create_embedder(
            training.backbone, weights=training.weights, input_size=training.img_size, seed=training.seed,
            window=training.sources.window, contrast=training.contrast, tta=training.tta, crop=training.crop)
        save_checkpoint(emb, ckpt, extra={"dataset": shown, "note": "untrained backbone (evaluate --no-train)"})
        return {}, []
    res = train_model(out=ckpt, config=training, records=train_recs, progress=progress)
    return {"epochs_run": res.epochs_run, "kept_epoch": res.kept_epoch, "best_epoch": res.best_epoch,
            "val_balanced_accuracy": res.val_balanced_accuracy,
            "best_val_balanced_accuracy": res.best_val_balanced_accuracy,
            "train_seconds": round(res.elapsed, 1), "history": res.history}, res.problems


class _Folds:
    """Everything the folds add up: outcomes, fold rows, problems, explanation checks."""

    def __init__(self, config: EvalConfig, training: TrainConfig, n_folds: int, train: bool, shown: str,
                 progress: bool):
        self.config, self.training, self.n_folds, self.train = config, training, n_folds, train
        self.shown, self.progress = shown, progress
        self.outcomes, self.rows, self.problems, self.faithfulness = [], [], [], []
        self.softmax_classes, self.input_size = None, None
        self.model_config = None  # the folds' ModelConfig: its crop places the lesion masks
        self.comparison = None  # the explanation methods compared on the first fold
        self.foreign = []  # (typicality, flagged) of the --ood dataset's images, every fold
        self.sweeps = []  # the map sweep of every fold (cbr.evaluation.sweep)
        self.priors = {}  # {fold: the mean of its training masks}: the mean-mask guess (cbr.evaluation.localisation)
        self.views = None  # several backbones: each member and ensemble rule (cbr.evaluation.members)
        self.findings = []  # --by finding: the region queries of every fold (cbr.evaluation.by_finding)

    def _fold_models(self, tmp: Path, train_recs, row: dict) -> list[Path]:
        """Train (or take) the fold's model of every member backbone: their checkpoint files."""
        t = self.training
        plan = self.views.plan if self.views else (Member(t.backbone, t.backbone, t.seed),)
        ckpts = []
        for i, member in enumerate(plan):
            ckpt = tmp / (f"model-{i}.pt" if self.views else "model.pt")
            # every member holds out the same validation images, which calibrate the ensemble
            training = replace(t, backbone=member.backbone, seed=member.seed, split_seed=t.validation_seed)
            figures, bad = _fold_model(ckpt, train_recs, training, self.train, self.shown, self.progress)
            if self.views:
                row.setdefault("members", {})[member.name] = figures
            else:
                row.update(figures)
            self.problems.extend(bad)
            ckpts.append(ckpt)
        return ckpts

    def run(self, f: int, train_recs, test_recs) -> None:
        """Train (or take) fold ``f``'s model, index its training part, query its held-out part."""
        cfg, tf = self.config, time.monotonic()
        _say(self.progress, f"fold {f + 1}/{self.n_folds}: {len(train_recs)} training images, "
                            f"{len(test_recs)} held out")
        row = {"fold": f + 1, "n_train": len(train_recs)}
        with tempfile.TemporaryDirectory(prefix="cbr-cv-") as tmp:
            ckpts = self._fold_models(Path(tmp), train_recs, row)
            cb = open_casebase(Path(tmp) / "cases.db")
            try:
                report = index_dataset(cb, records=train_recs, models=[str(c) for c in ckpts], explain="none",
                                       batch_size=cfg.batch_size, progress=self.progress,
                                       num_workers=cfg.num_workers, device=cfg.device)
                self.problems.extend(report.problems)
                # the vote is scored as given; typicality is scored apart (selective, ood)
                searcher = Searcher(cb, k=cfg.k, vote=cfg.vote, explain=cfg.explain, device=cfg.device,
                                    answer_anyway=True, where=cfg.where, temperature=cfg.temperature,
                                    coverage=cfg.coverage)
                if cfg.vote == "weighted":  # the fold's fitted (or given) temperature, for the report
                    row["temperature"] = searcher.temperatures[searcher.members[0].model_id][0]
                # nested: each fold's vote is calibrated on its own model's validation images
                row["calibration"] = searcher.calibration_info(sorted({r.label for r in train_recs}))
                if cfg.ood:
                    self.foreign.extend(foreign_typicality(searcher, read_foreign(cfg.ood), progress=self.progress))
                got, bad = run_queries(searcher, test_recs, fold=f + 1, progress=self.progress,
                                       desc=f"fold {f + 1} queries")
                self.problems.extend(bad)
                if "finding" in cfg.by:
                    found, bad = finding_outcomes(searcher, test_recs, fold=f + 1, progress=self.progress)
                    self.findings.extend(found)
                    self.problems.extend(bad)
                if self.views:
                    self.views.query_fold(searcher, ckpts, test_recs, f + 1, self.progress, done=got)
                emb = searcher.members[0].embedder
                self.input_size, self.model_config = emb.config.input_size, emb.config
                if cfg.explain != "none" or cfg.target_layers:
                    self.priors[f + 1] = _prior(train_recs, emb.config)
                head_classes = add_softmax(emb, got, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                           device=cfg.device)
                self.softmax_classes = head_classes or self.softmax_classes
                checks = explanation_checks(emb, test_recs, cfg.explain,
                                            n=max(1, FAITHFULNESS_IMAGES // self.n_folds), seed=self.training.seed)
                if checks:
                    self.faithfulness.append(checks)
                if cfg.target_layers:
                    self.sweeps.append(run_sweep(emb, test_recs, cfg, seed=self.training.seed + f,
                                                 progress=self.progress, prior=self.priors.get(f + 1)))
                if f == 0 and cfg.compare:
                    self.comparison = comparison_report(emb, test_recs, cfg.compare, out_dir=cfg.out_dir,
                                                        budget=cfg.explain_budget, seed=self.training.seed,
                                                        progress=self.progress)
            finally:
                cb.close()
        row.update(fold_figures(got, head_classes))
        row["seconds"] = round(time.monotonic() - tf, 1)
        self.rows.append(row)
        self.outcomes.extend(got)
        _say(self.progress, _fold_line(row))


def _prior(records, model_config):
    """The mean of the records' non-empty lesion masks in the model's view (None: no mask)."""
    if not any((r.metadata or {}).get("mask") for r in records):
        return None
    masks, has, _ = lesion_masks(records, model_config.input_size, crop=model_config.crop,
                                 window=model_config.window)
    return mean_mask(masks, has)


def _settings(config: EvalConfig, t: TrainConfig, shown: str, folds: int, train: bool, plan=()) -> dict:
    """The run's settings as the report's ``config`` records them (with several members, their
    backbones and names)."""
    members = ({"backbones": [m.backbone for m in plan], "members": [m.name for m in plan]} if len(plan) > 1
               else {})
    return members | {
            "protocol": "cross-validation", "source": shown, "folds": folds, "k": config.k, "vote": config.vote,
            "explain": config.explain, "train": train, "backbone": t.backbone, "weights": t.weights,
            "epochs": t.epochs if train else None, "img_size": t.img_size, "batch_size": config.batch_size,
            "lr": t.lr, "patience": t.patience, "keep": t.keep, "train_layers": t.train_layers, "cache_draws": t.cache_draws,
            "seed": t.seed, "device": t.device,
            "sources": config.sources.to_dict(), "mask_guidance": t.mask_guidance,
            "objective": t.objective, "sampler": t.sampler, "flip": t.flip, "crop": t.crop,
            "localiser": t.localiser if train else False}


def _pooled(run: _Folds, classes, config: EvalConfig) -> dict:
    """The folds' figures pooled: the vote, members and ensembles, selective answers, explanations."""
    metrics = score(run.outcomes, classes, k=config.k, softmax_classes=run.softmax_classes,
                    input_size=run.input_size, localise=config.explain != "none", model=run.model_config,
                    priors=run.priors)
    metrics["faithfulness"] = pool_checks(run.faithfulness)
    if run.views:
        metrics.update(run.views.figures(classes))
    add_selective(metrics, run.outcomes, run.foreign if config.ood else None)
    if run.comparison is not None:
        metrics["comparison"] = dict(run.comparison, fold=1)
    if run.sweeps:
        metrics["map_sweep"] = finish_sweep(pool_sweeps(run.sweeps), config.out_dir)
    if "finding" in config.by:
        metrics["finding_search"] = finding_figures(run.findings, run.outcomes, config.k)
    return metrics


def _members(backbones, training: TrainConfig, train: bool) -> tuple[tuple[Member, ...], TrainConfig]:
    """(the members, the training config of the first); each member's config checked."""
    plan = plan_members(backbones, training.seed, train)
    if plan:
        training = replace(training, backbone=plan[0].backbone)
    if train:
        for backbone in dict.fromkeys(m.backbone for m in plan) or (training.backbone,):
            replace(training, backbone=backbone).check()  # an unknown objective, sampler or flip too
    return plan, training


def cross_validate(
    source=None,
    config: EvalConfig = EvalConfig(),
    training: TrainConfig = TrainConfig(),
    *,
    folds: int = 5,
    train: bool = True,
    records=None,
    progress: bool = False,
    manifest: ManifestSpec | None = None,
    backbones=(),
) -> dict:
    """Patient-grouped, stratified k-fold cross-validation of train -> index -> query.

    Args:
        source: a class-folder dataset or a CSV manifest (or give ``records``).
        config: k, vote, explain (a CAM method adds the localisation figures when records have
            masks), batch size, device, workers and the report folder (see ``EvalConfig``).
        training: the model of each fold (see ``TrainConfig``); with ``train=False`` only its
            backbone, weights, img_size and seed apply; its ``sources`` are ``config.sources``. Its seed also draws the folds. It runs
            on ``config.device`` (when set).
        folds: number of folds (no patient spans two).
        train: fine-tune a model per fold; False uses the backbone's weights as they are (e.g.
            frozen ImageNet features).
        records: evaluate these ``Record``s instead of reading ``source``.
        progress: progress bars.
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).
        backbones: two or more backbones (one given again trains again with the next seed: a deep ensemble): each fold
            trains one model per member into one case base; the main figures are its ensemble (``Searcher``'s default
            rule); ``members`` and ``ensembles`` give each member alone (vote and softmax) and every ensemble rule on
            the same folds (cbr.evaluation.members). One or none: ``training.backbone``.

    Returns:
        The pooled metrics, plus ``folds`` (each fold's figures), ``config``, ``elapsed_s``,
        ``protocol`` and ``report`` (the folder, or None); with several backbones also ``members``
        and ``ensembles``.

    Example:
        >>> m = cross_validate("data/brain_mri", training=TrainConfig(epochs=4, img_size=160))
        >>> m["balanced_accuracy"], m["softmax"]["balanced_accuracy"]
    """
    t0 = time.monotonic()
    config.check()  # unknown names fail before any work
    plan, training = _members(backbones, training, train)
    device = resolve_device(config.device if config.device is not None else training.device)
    # the folds' models decode DATA as it was read: config.sources, window included
    config, training = replace(config, device=device), replace(training, device=device, sources=config.sources)
    recs, problems, shown = load_records(source, records, manifest, progress, config.sources)
    classes = sorted({r.label for r in recs})
    if len(classes) < 2:
        raise CbrError(f"{shown}: only one class ({classes[0]!r}); evaluation needs at least 2 classes")
    if train:
        check_guidance(training.mask_guidance, recs, shown)  # before the first fold, not inside it
    fold_of = grouped_folds([r.label for r in recs], [r.group for r in recs], folds, seed=training.seed)
    settings = _settings(config, training, shown, folds, train, plan)

    run = _Folds(config, training, folds, train, shown, progress)
    run.problems.extend(problems)
    if len(plan) > 1:
        run.views = MemberViews(plan, config)
    for f in range(folds):
        train_recs = [r for r, g in zip(recs, fold_of) if g != f]
        test_recs = [r for r, g in zip(recs, fold_of) if g == f]
        shared = {r.group for r in train_recs if r.group is not None} & {r.group for r in test_recs}
        if shared:  # grouped_folds guarantees this; a failure here is a bug, never a figure
            raise CbrError(f"fold {f + 1}: patient(s) {sorted(shared)[:3]} on both sides; refusing to report")
        run.run(f, train_recs, test_recs)

    metrics = _pooled(run, classes, config)
    metrics.update(protocol="cross-validation", folds=run.rows, config=settings,
                   softmax_classes=run.softmax_classes, problems=unique_problems(run.problems),
                   elapsed_s=round(time.monotonic() - t0, 1), report=None)
    if run.views:
        metrics["prediction_files"] = run.views.prediction_files()
    if config.out_dir is not None:
        metrics["report"] = str(config.out_dir)
        write_report(metrics, config.out_dir, run.outcomes, model=run.model_config,
                     views=run.views.outcomes_by_file() if run.views else None)
        write_selective(metrics, config.out_dir)
    return json_safe(metrics)
