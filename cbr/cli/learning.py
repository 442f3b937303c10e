"""``cbr train`` and ``cbr evaluate``: fine-tuning a model and measuring the whole pipeline."""

from dataclasses import replace
import functools
import json

import click
from click.core import ParameterSource

from cbr.cli.explain import MethodList
from cbr.cli.options import (RegistryChoice, backbone_names, contrast_option, crop_option, json_option, manifest_options,
                             progress_enabled, source_options, tta_option, vote_names, weights_option, where_option)
from cbr.evaluation import cross_validate, EvalConfig, evaluate_casebase
from cbr.evaluation.by_finding import BY
from cbr.evaluation.sweep import parse_layers
from cbr.learn.augmentation import FLIPS
from cbr.learn.config import KEEPS, TrainConfig
from cbr.learn.objective import OBJECTIVES
from cbr.learn.sampling import SAMPLERS
from cbr.learn.train import train_model
from cbr.reporting.sweep_table import format_sweep
from cbr.reporting.table import finding_table, format_table
from cbr.store.casebase import open_casebase
from explain.methods import ATTRIBUTION_METHODS

DEFAULT_REPORT_DIR = "cbr-evaluation"


def _objectives():
    return OBJECTIVES


def _samplers():
    return SAMPLERS


def _flips():
    return FLIPS


def _keeps():
    return KEEPS


def training_options(f):
    """Options shared by ``train`` and the cross-validation of ``evaluate``, handed to the command
    as one ``training`` (a ``TrainConfig``) and ``backbones`` (every ``--backbone`` given: evaluate's
    ensemble members; ``training.backbone`` is the first)."""
    @functools.wraps(f)
    def wrapper(*args, backbone, weights, epochs, img_size, batch_size, lr, seed, device, patience, keep, train_layers,
                workers, contrast, tta, crop, label_smoothing, warmup, mask_guidance, objective, sampler, flip, localiser,
                cache_draws, **kwargs):
        training = TrainConfig(backbone=backbone[0], weights=weights, epochs=epochs, img_size=img_size,
                               batch_size=batch_size, lr=lr, seed=seed, device=device, patience=patience, keep=keep,
                               train_layers=train_layers, num_workers=workers, contrast=contrast or "none",
                               tta=tta or "none", crop=crop or "none", label_smoothing=label_smoothing, warmup_epochs=warmup,
                               mask_guidance=mask_guidance, objective=objective, sampler=sampler, flip=flip,
                               localiser=localiser, cache_draws=cache_draws)
        return f(*args, training=training, backbones=tuple(backbone), **kwargs)

    opts = [
        click.option("--backbone", type=RegistryChoice(backbone_names), default=("mobilenet_v2",), show_default=True,
                     multiple=True,
                     help="Backbone to fine-tune (see `cbr models`); timm:<name> is any model of timm.list_models() "
                     "(pip install 'cbr[timm]'). evaluate: repeat it for an ensemble, each member and ensemble rule "
                     "reported on the same folds; a backbone given again trains again with the next seed (a deep "
                     "ensemble)."),
        weights_option(help="Start from ImageNet weights, or from random ones."),
        click.option("--epochs", type=click.IntRange(1, 10_000), default=10, show_default=True,
                     help="Most epochs (early stopping may end sooner)."),
        click.option("--img-size", type=click.IntRange(8, 4096), default=None,
                     help="Input side in pixels [default: the backbone's, 224 for most]."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Learning rate of the head; the pretrained backbone gets lr/10 [default: 1e-3]."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Same seed, same data -> same model (on CPU)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Where to train [default: cuda if available, else cpu]."),
        click.option("--patience", type=click.IntRange(0, 10_000), default=3, show_default=True,
                     help="Stop after this many epochs without a better validation balanced accuracy (0: never)."),
        click.option("--keep", type=RegistryChoice(_keeps), default="best", show_default=True,
                     help="Whose weights the checkpoint keeps: the best epoch on validation, or the last epoch's "
                     "(the validation images, which calibrate the vote, then choose nothing)."),
        click.option("--train-layers", type=click.IntRange(0, 10_000), default=None,
                     help="Fine-tune only the last N backbone blocks and the head (0: the head only) [default: all]."),
        click.option("--cache-draws", type=click.IntRange(0, 1000), default=0, show_default=True,
                     help="With --train-layers: compute the frozen blocks' features once for N augmentation draws "
                     "per image and train the rest on them (epoch e uses draw e mod N); 0: off."),
        click.option("--workers", type=click.IntRange(0, 64), default=None,
                     help="Decoding worker processes [default: 1 on 2 cores]."),
        contrast_option,
        tta_option,
        crop_option,
        click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Cross-entropy label smoothing (e.g. 0.1)."),
        click.option("--warmup", type=click.IntRange(0, 10_000), default=0, show_default=True,
                     help="Epochs of linear learning-rate warm-up before the cosine decay."),
        click.option("--mask-guidance", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Weight of a loss on the share of the class map (LayerCAM) outside the lesion, for "
                     "training images with a 'mask' column entry (0: off; e.g. 1)."),
        click.option("--objective", type=RegistryChoice(_objectives), default="ce", show_default=True,
                     help="Loss: cross-entropy, supervised contrastive on the stored embedding, or both."),
        click.option("--sampler", type=RegistryChoice(_samplers), default="shuffle", show_default=True,
                     help="Batches: shuffled (class-weighted loss) or drawn class-balanced (unweighted loss)."),
        click.option("--flip", type=RegistryChoice(_flips), default="horizontal", show_default=True,
                     help="Training flips: none where anatomy has a side (chest X-ray), both where it has no up."),
        click.option("--localiser/--no-localiser", default=None,
                     help="With lesion masks (a 'mask' column): also train a lesion localiser on the same backbone, "
                     "whose map shows where the finding is [default: when the backbone can carry one; a ViT "
                     "trains without it and says so]."),
    ]
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def _print_training(r, data, training):
    click.echo(f"Trained {training.backbone} ({training.weights} weights) on {data}")
    click.echo(f"  classes:      {', '.join(r.class_names)}")
    grouped = "by patient" if r.grouped else "by image"
    if training.split_seed is not None:
        grouped += f", split seed {training.split_seed}"
    click.echo(f"  images:       {r.train_size} training, {r.val_size} validation (split {grouped})")
    click.echo(f"  epochs:       {r.epochs_run} run, kept {r.kept_epoch} ({training.keep}), best on validation "
               f"{r.best_epoch}")
    click.echo(f"  objective:    {training.objective} (batches: {training.sampler}; flips: {training.flip})")
    bacc = "-" if r.val_balanced_accuracy is None else (f"{r.val_balanced_accuracy:.3f} (kept epoch; best "
                                                        f"{r.best_val_balanced_accuracy:.3f})")
    click.echo(f"  validation balanced accuracy: {bacc}")
    if r.localiser is not None:
        pg = r.localiser.get("val_pointing_game")
        click.echo(f"  localiser:    trained on {r.localiser['masks']} masked images; validation pointing game "
                   + ("-" if pg is None else f"{pg:.3f}"))
    elif r.localiser_note:
        click.echo(f"  localiser:    none ({r.localiser_note})")
    elif training.localiser is not False:
        click.echo("  localiser:    none (no lesion masks: add a 'mask' column to train one)")
    if r.masked_images is not None:
        click.echo(f"  mask guidance: weight {training.mask_guidance:g}, {r.masked_images} of {r.train_size} "
                   "training images with a lesion mask")
    click.echo(f"  skipped:      {len(r.problems)}")
    for p in r.problems:
        click.echo(f"    {p.path}: {p.reason}")
    click.echo(f"  checkpoint:   {r.path} (fingerprint {r.fingerprint[:12]})")
    click.echo(f"  elapsed:      {r.elapsed:.1f} s")


@click.command("train")
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", default="model.pt", show_default=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write.")
@training_options
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the images (grouped by patient) kept for validation and early stopping.")
@click.option("--split-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the validation split alone [default: --seed]. Members of a deep ensemble (other "
              "--seed, one --split-seed) hold out the same images, which then calibrate the ensemble.")
@manifest_options
@source_options()
@json_option
def train_cmd(data, out, training, backbones, val_fraction, split_seed, manifest, sources, as_json):
    """Fine-tune a backbone with a classification head on a labelled dataset.

    DATA is a folder with one sub-folder per class, or a CSV manifest. A patient-grouped share of
    the images is held out for early stopping on balanced accuracy and to calibrate the vote; the
    best epoch is kept (--keep last: the last epoch). The
    checkpoint carries the backbone, head, classes, preprocessing, fingerprint and the sha256 of
    every image it saw; index with it (`cbr index DATA --model model.pt`).

    \b
    Example:
        cbr train data/brain_mri --out brain.pt --epochs 8 --img-size 160
        cbr train cxr.csv --path-column filename --label-column class --group-column patient_key --images cxr/
        cbr train data/ --backbone tinycnn --weights none --epochs 3 --json
        cbr train dicom_by_class/ --window ct-lung --frames middle --pseudonymise "$KEY"
        cbr train volumes/ --slices every:4 --axis axial
        cbr train lesions.csv --group-column lesion_id --mask-guidance 1
        cbr train data/brain_mri --objective ce+supcon --sampler balanced --flip none
        cbr train data/brain_mri --seed 1 --split-seed 0 --out brain-1.pt   # a deep ensemble's second member
    """
    if len(backbones) > 1:
        raise click.UsageError("--backbone: train takes one; train each member apart (or compare them with "
                               "`cbr evaluate DATA --backbone A --backbone B`)")
    training = replace(training, val_fraction=val_fraction, sources=sources, split_seed=split_seed)
    result = train_model(data, out, training, progress=progress_enabled() and not as_json, manifest=manifest)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_training(result, data, training)


# Options that only make sense for cross-validation (protocol 1) or only against --db (protocol 2).
_CV_ONLY = ("folds", "no_train", "backbone", "weights", "epochs", "img_size", "lr", "seed", "patience", "keep",
            "train_layers", "mask_guidance", "objective", "sampler", "flip", "localiser", "cache_draws")
_DB_ONLY = ("strict", "models", "index_dir")


def _explicit(ctx, names):
    """The options among ``names`` given on the command line, as the user typed them."""
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    return [flags[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]


@click.command("evaluate")
@click.argument("data", type=click.Path(exists=True))
@click.option("--db", default=None, envvar="CBR_DB", show_envvar=True,
              help="Evaluate DATA as a held-out test set against this case base [default: cross-validate DATA].")
@click.option("--index-dir", type=click.Path(file_okay=False), envvar="CBR_INDEX_DIR", default=None,
              help="With --db: folder of the FAISS files (default: beside a SQLite case base).")
@click.option("--folds", type=click.IntRange(2, 100), default=5, show_default=True, help="Cross-validation folds.")
@training_options
@click.option("--no-train", is_flag=True, help="Cross-validate the backbone's weights as they are (no fine-tuning).")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True, help="Neighbours per query.")
@click.option("--vote", type=RegistryChoice(vote_names), default="weighted", show_default=True, help="Vote rule.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Softmax temperature of the weighted vote. [default: fitted on each case base's calibration slice]")
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9, show_default=True,
              help="Of the conformal prediction sets; their per-class coverage and mean size are reported.")
@click.option("--explain", "explain", type=MethodList(), default="none", show_default=True,
              help="Explanation methods to score side by side (a,b,c or all; see `cbr models`): pointing games "
              "against a 'mask' column, deletion/insertion AUC, randomisation check, seconds per map; writes "
              "explanations.png. One CAM method also maps every query (localisation figures).")
@click.option("--explain-budget", type=click.IntRange(1, 100000), default=None,
              help="Cap on the model evaluations of each attribution map in the comparison. [default: the method's own]")
@click.option("--target-layer", "target_layers", default=None,
              help="Sweep the --explain CAM methods over these layers (a,b,c; 'last' = the last block; 'a+b' fuses "
              "the stages' maps) for class and similarity maps: pointing games and IoU against a 'mask' column, "
              "deletion AUC, seconds per map; writes map_sweep.csv and map_sweep.png.")
@click.option("--map-images", type=click.IntRange(1, 100000), default=48, show_default=True,
              help="With --target-layer: images swept per fold (or in the held-out set).")
@click.option("--model", "models", multiple=True, help="With --db: use only these members (name, checkpoint or fingerprint).")
@click.option("--strict", is_flag=True, help="With --db: leave leaking test images out of the figures.")
@where_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=DEFAULT_REPORT_DIR, show_default=True,
              help="Report folder: metrics.json, confusion_matrix.png, reliability.png, risk_coverage.png, predictions.csv "
                   "(and one predictions-<view>.csv per member and ensemble rule).")
@click.option("--by", "by", type=click.Choice(BY), multiple=True, default=("image",), show_default=True,
              help="What is queried and scored: whole images; 'finding' also queries each lesion of a masked image by "
              "region among the case base's findings (precision@k and the vote, beside the same images whole).")
@click.option("--ood", "ood", type=click.Path(exists=True), default=None,
              help="A foreign dataset (class folders or CSV) queried against each case base: AUROC of typicality, "
              "FPR at 95% TPR, share flagged out of distribution.")
@manifest_options
@source_options()
@json_option
@click.pass_context
def evaluate_cmd(ctx, data, db, index_dir, folds, training, backbones, no_train, k, vote, temperature, coverage, explain, explain_budget, target_layers,
                 map_images, models, strict, where, out_dir, by, ood, manifest, sources, as_json):
    """Measure accuracy, calibration, retrieval and localisation, grouped by patient.

    \b
    The protocol follows --db:
      * without --db (and without CBR_DB): patient-grouped, stratified k-fold
        cross-validation of DATA. Each fold fine-tunes a model on the other folds (or, with
        --no-train, takes the backbone as it is), indexes them into a temporary case base
        and queries every held-out image. The case-based vote is reported beside the
        fine-tuned model's own softmax classifier.
      * with --db (or CBR_DB set): DATA is a held-out test set queried against that case
        base. Test images already in the case base, in a member model's training set, or
        from a patient in the case base are counted as leakage first; --strict leaves them out.

    Queries are never recorded in the audit trail. The vote is scored as given even for a query
    flagged out of distribution; the flag is scored apart: the risk-coverage curve (AURC,
    accuracy at 90% and 95% coverage) and, with --ood DATA, how well typicality tells DATA's
    images from a foreign dataset's.

    \b
    Example:
        cbr evaluate data/brain_mri --folds 5 --epochs 6 --img-size 160
        cbr evaluate cxr.csv --path-column filename --label-column class --group-column patient_key --images cxr/
        cbr evaluate test/ --db cases.db --strict --json
        cbr evaluate phantoms/manifest.csv --explain gradcam --folds 3
        cbr evaluate test/ --db cases.db --explain all
        cbr evaluate test/ --db cases.db --ood other_modality/
        cbr evaluate lesions.csv --explain gradcam,layercam --target-layer features.14,last,features.17+last
        cbr evaluate volumes/ --slices every:4 --window minmax --folds 3
        cbr evaluate pneumoniamnist.npz --split test --classes normal,pneumonia --db cases.db
        cbr evaluate lesions.csv --where site=back --folds 3
        cbr evaluate lesions.csv --by finding --folds 5   # each lesion searched among the findings too
        cbr evaluate lesions.csv --group-column lesion_id --explain layercam --mask-guidance 1
        cbr evaluate data/brain_mri --objective supcon --sampler balanced --folds 5
        cbr evaluate data/brain_mri --backbone mobilenet_v2 --backbone efficientnet_lite0 --backbone efficientnet_lite2
        cbr evaluate data/brain_mri --backbone mobilenet_v2 --backbone mobilenet_v2 --backbone mobilenet_v2
    """
    progress = progress_enabled() and not as_json
    one_cam = explain[0] if len(explain) == 1 and explain[0] not in ATTRIBUTION_METHODS else "none"
    layers, swept = (), ()
    if target_layers:
        # the sweep takes the CAM methods; attribution methods (no layer) stay in the comparison
        layers, swept = parse_layers(target_layers), tuple(m for m in explain if m not in ATTRIBUTION_METHODS)
        if not swept:
            raise click.UsageError("--target-layer: give CAM methods to sweep with --explain, e.g. --explain gradcam")
        explain = tuple(m for m in explain if m in ATTRIBUTION_METHODS)
    config = EvalConfig(k=k, vote=vote, explain=one_cam, compare=explain, explain_budget=explain_budget,
                        batch_size=training.batch_size, device=training.device, num_workers=training.num_workers,
                        out_dir=out_dir, ood=ood, sweep_methods=swept, target_layers=layers, map_images=map_images,
                        sources=sources, where=where, temperature=temperature, coverage=coverage, by=by)
    if db is not None:
        wrong = _explicit(ctx, _CV_ONLY)
        if wrong:
            raise click.UsageError(f"{', '.join(wrong)}: only for cross-validation; drop --db (and CBR_DB) to cross-validate")

        cb = open_casebase(db, create=False, index_dir=index_dir)
        metrics = evaluate_casebase(cb, data, config, models=models or None, strict=strict, progress=progress,
                                    manifest=manifest)
    else:
        wrong = _explicit(ctx, _DB_ONLY)
        if wrong:
            raise click.UsageError(f"{', '.join(wrong)}: only with --db (a held-out test set against a case base)")
        if no_train and training.mask_guidance:
            raise click.UsageError("--mask-guidance is a training loss; drop --no-train to use it")
        metrics = cross_validate(data, config, training, folds=folds, train=not no_train, progress=progress,
                                 manifest=manifest, backbones=backbones)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(format_table(metrics))
        if metrics.get("finding_search"):
            click.echo(finding_table(metrics["finding_search"]))
        if metrics.get("map_sweep"):
            click.echo("\n" + format_sweep(metrics["map_sweep"]))
        click.echo(f"report: {out_dir}")
