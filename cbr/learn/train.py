"""Fine-tuning a registry backbone with a classification head on a labelled dataset (``cbr train``).

The fine-tuned checkpoint serves twice: its head is a plain softmax classifier, and its
normalised embedding (``neck(trunk(x))``) is what ``cbr index`` stores for retrieval.

Decisions (decoding and augmentation: see :mod:`cbr.learn.augmentation`):

* **Class balance**: cross-entropy weighted by n / (K * n_class) over the training part (the
  "balanced" weights), so every image is seen once per epoch and rare classes count as much as
  common ones. With ``sampler="balanced"`` the batches are drawn by class instead and the loss is
  unweighted (:mod:`cbr.learn.sampling`); ``objective`` picks the loss (:mod:`cbr.learn.objective`).
* **Validation**: a patient-grouped, stratified split (:func:`cbr.data.splits.group_split`) keeps
  ``val_fraction`` of the images out of training; no patient is on both sides. Early stopping
  watches the validation balanced accuracy (ties: lower validation loss) and the best epoch's
  weights are kept (``keep="best"``). The same images calibrate the vote (``cbr index``), so
  ``keep="last"`` leaves them untouched by any choice; measured, it calibrated a little better but
  cost small data sets accuracy (see ``cbr.learn.config.KEEPS``). Without any validation image
  (``val_fraction=0`` or too few groups) every epoch runs and the last one is kept.
* **Optimiser**: AdamW (weight decay 0.01) with a cosine decay over the planned epochs. With
  ImageNet weights the new head learns at ``lr`` (default 1e-3) and the pretrained backbone at
  ``lr / 10`` (default 1e-4), so fine-tuning does not wash out the pretrained features; from
  random weights everything learns at ``lr``.
* **Partial fine-tuning** (``train_layers=N``): only the last N blocks of the trunk (see
  :func:`trunk_stages`) and the head learn; the frozen blocks keep their weights and BatchNorm
  statistics and need no backward pass, which makes CPU training about 3x cheaper.
* **BatchNorm**: with pretrained weights and batches smaller than 16, the BatchNorm running
  statistics are frozen (their affine parameters still learn): statistics from a few images
  are noise. A last batch of a single image is dropped, since BatchNorm cannot train on it.
* **Reproducibility**: ``seed`` fixes the head's initialisation, the split (unless
  ``split_seed`` is given), the shuffling (its own generator), the augmentation and the
  DataLoader workers; torch's and numpy's global
  random states are restored afterwards. Same seed and data on the CPU -> the same weights and
  fingerprint. On CUDA cuDNN may pick non-deterministic kernels.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cbr.data.dataset import ManifestSpec, Problem, Record, read_dataset
from cbr.errors import DatasetError
from cbr.data.splits import group_split
from cbr.lazy_import import LazyModule
from cbr.learn.augmentation import (AUGMENTATION, Augmented, augmentation_text, decode_all, is_grayscale,
                                    make_augmentation)
from cbr.learn.config import TrainConfig, TrainError, check_out
from cbr.learn.guidance import check_guidance, lesion_masks
from cbr.learn.segmentation import train_localiser
from cbr.learn.trainer import Trainer, trunk_stages
from cbr.models.checkpoint import save_checkpoint
from cbr.models.device import resolve_device

__all__ = [
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "train_model",
    "trunk_stages",
    "decode_all",
    "is_grayscale",
    "make_augmentation",
    "AUGMENTATION",
]

LOG = logging.getLogger(__name__)
models_localiser = LazyModule("cbr.models.localiser")  # torch-bound: loads on first use
models_embedder = LazyModule("cbr.models.embedder")  # torch-bound: loads on first use



@dataclass
class TrainResult:
    """What one training run produced."""

    path: str  # the checkpoint written
    class_names: list[str]  # the head's classes, sorted
    epochs_run: int
    best_epoch: int  # 1-based epoch with the best validation balanced accuracy
    best_val_balanced_accuracy: float | None  # None without a validation part
    history: list[dict]  # per epoch: epoch, loss, val_loss, val_accuracy, val_balanced_accuracy, lr, seconds
    train_size: int
    val_size: int
    fingerprint: str
    elapsed: float  # seconds
    grayscale: bool = False  # whether colour jitter was left out
    train_groups: list[str] = field(default_factory=list, repr=False)  # group ids in the training part
    val_groups: list[str] = field(default_factory=list, repr=False)  # group ids in the validation part
    problems: list[Problem] = field(default_factory=list)  # files skipped (unreadable...)
    grouped: bool = False  # whether the validation split was by patient group (else by image)
    masked_images: int | None = None  # with --mask-guidance: training images guided by a lesion mask
    # the lesion localiser trained beside the classifier (masks, val_pointing_game, val_dice, ...); None: no masks
    localiser: dict | None = None
    localiser_note: str | None = None  # why a backbone that cannot carry a localiser trained without one
    kept_epoch: int = 0  # 1-based epoch whose weights the checkpoint holds (TrainConfig.keep)
    val_balanced_accuracy: float | None = None  # the kept epoch's; None without a validation part

    def to_dict(self) -> dict:
        d = asdict(self)
        for private in ("train_groups", "val_groups", "grouped"):
            d.pop(private)
        d["problems"] = [{"path": p.path, "reason": p.reason} for p in self.problems]
        d["elapsed_s"] = round(d.pop("elapsed"), 3)
        return d


def _check_classes(records, what: str) -> list[str]:
    labels = sorted({r.label for r in records})
    if not records:
        raise DatasetError(f"{what}: no usable images; check the path and the problems listed by `cbr index`")
    if len(labels) < 2:
        raise DatasetError(
            f"{what}: only one class ({labels[0]!r}) among {len(records)} images; training a classifier "
            "needs at least 2 classes (one sub-folder or label per class)"
        )
    return labels


def train_model(
    source=None,
    out="model.pt",
    config: TrainConfig = TrainConfig(),
    *,
    records=None,
    progress: bool = False,
    manifest: ManifestSpec | None = None,
) -> TrainResult:
    """Fine-tune a registry backbone with a classification head and write a checkpoint.

    Args:
        source: a class-folder dataset or a CSV manifest (see ``read_dataset``).
        out: the checkpoint file to write (its folder is created).
        config: backbone, weights, budget, seed and device (see ``TrainConfig``).
        records: train on these ``Record``s instead of reading ``source`` (evaluation folds).
        progress: show progress bars and per-epoch validation figures.
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).

    Raises:
        DatasetError: fewer than 2 classes, no usable images, an unreadable source.
        TrainError: an option out of range, an unwritable ``out``.
        DeviceError: ``device="cuda"`` on a machine without CUDA.
        UnknownNameError: an unknown backbone or weights name.

    Example:
        >>> result = train_model("data/brain_mri", "model.pt", TrainConfig(epochs=5, img_size=160))
        >>> result.best_val_balanced_accuracy, result.path
    """
    t0 = time.monotonic()
    config.check()
    out = check_out(out)
    device = resolve_device(config.device)
    records, problems, what = _training_records(source, records, manifest, progress, config)
    class_names = _check_classes(records, what)
    check_guidance(config.mask_guidance, records, what)  # before anything slow
    # Built before decoding, so missing ImageNet weights fail fast.
    model = models_embedder.create_embedder(config.backbone, weights=config.weights, input_size=config.img_size,
                                            class_names=class_names, seed=config.seed, device=device,
                                            window=config.sources.window, contrast=config.contrast, tta=config.tta,
                                            crop=config.crop)
    records, cache = _decode(records, model.config, config, progress, problems, what, class_names)
    targets = [class_names.index(r.label) for r in records]
    grey = is_grayscale(cache, seed=config.seed)

    train_idx, val_idx = _split(records, config)
    class_weight = _class_weight([targets[i] for i in train_idx], len(class_names), device)
    run = Trainer(model, config, device, class_names, class_weight, progress)
    guide = _guidance(config, [records[i] for i in train_idx], model.config, problems)  # () or (masks, has)
    # the localiser's encoder starts from the backbone's initial (ImageNet) weights
    initial, localiser_note = _localiser_encoder(model, config, records)
    train_set = Augmented(cache[train_idx], [targets[i] for i in train_idx], make_augmentation(grey, config.flip), *guide)
    history, kept_epoch, best_epoch = run.fit(train_set, cache[val_idx], [targets[i] for i in val_idx])

    best_bacc = history[best_epoch - 1]["val_balanced_accuracy"]
    kept_bacc = history[kept_epoch - 1]["val_balanced_accuracy"]
    localiser = _localiser(initial, model.config, config, records, cache, (train_idx, val_idx), device, progress,
                           problems)
    extra = {"history": history, "dataset": str(source) if source is not None else "<records>",
             "best_epoch": best_epoch, "best_val_balanced_accuracy": best_bacc, "kept_epoch": kept_epoch,
             "keep": config.keep, "val_balanced_accuracy": kept_bacc, "train_size": len(train_idx),
             "val_size": len(val_idx), "val_sha256": [records[i].sha256 for i in val_idx], "grayscale": grey,
             "augmentation": augmentation_text(grey, config.flip),
             "options": _options(config, run, model.config.input_size, _masked(guide))}
    try:
        fingerprint = save_checkpoint(model, out, train_sha256=[r.sha256 for r in records], extra=extra,
                                      localiser=localiser)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write the checkpoint ({e.strerror or e}); choose another --out") from None
    return TrainResult(
        path=str(out), class_names=list(class_names), epochs_run=len(history), best_epoch=best_epoch,
        best_val_balanced_accuracy=best_bacc, history=history, train_size=len(train_idx),
        val_size=len(val_idx), fingerprint=fingerprint, elapsed=time.monotonic() - t0, grayscale=grey,
        train_groups=sorted({_group(records[i], i) for i in train_idx}),
        val_groups=sorted({_group(records[i], i) for i in val_idx}), problems=problems,
        grouped=any(records[i].group is not None for i in train_idx), masked_images=_masked(guide),
        localiser=_figures(localiser), localiser_note=localiser_note, kept_epoch=kept_epoch,
        val_balanced_accuracy=kept_bacc,
    )


def _decode(records, model_config, config: TrainConfig, progress: bool, problems: list, what: str, class_names):
    """Decode every record once in the model's view: (the readable records, their pixel cache);
    unreadable ones join the problems, and a class left without images raises DatasetError."""
    kept, cache, bad = decode_all(records, model_config.input_size, batch_size=config.batch_size,
                                  num_workers=config.num_workers, progress=progress, window=model_config.window,
                                  contrast=model_config.contrast, crop=model_config.crop)
    problems += bad
    records = [records[i] for i in kept]
    _check_classes(records, what)
    if len({r.label for r in records}) < len(class_names):
        lost = sorted(set(class_names) - {r.label for r in records})
        raise DatasetError(f"{what}: no readable image of class(es) {', '.join(lost)}; see the problems listed")
    return records, cache


def _split(records, config: TrainConfig) -> tuple[list[int], list[int]]:
    """Training and validation indexes: patient-grouped and stratified (``group_split``)."""
    train_idx, val_idx = group_split([r.label for r in records], [r.group for r in records],
                                     fraction=config.val_fraction, seed=config.validation_seed)
    train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
    if not val_idx:
        LOG.warning("no validation images (too few patient groups or val_fraction=0): all %d epochs run "
                    "and the last one is kept", config.epochs)
    return train_idx, val_idx


def _training_records(source, records, manifest, progress: bool, config: TrainConfig) -> tuple[list, list, str]:
    """(records, problems, the name messages use): ``records`` as given, else read from ``source``."""
    if records is None:
        if source is None:
            raise TrainError("give a dataset (a folder of class folders or a CSV manifest) or records")
        scan = read_dataset(source, manifest, progress=progress, sources=config.sources)
        return list(scan.records), list(scan.problems), str(source)
    return list(records), [], str(source) if source is not None else "the training records"


def _class_weight(train_targets: list[int], n_classes: int, device):
    """Inverse class frequency of the training split (a class without images weighs as one image)."""
    import torch

    counts = np.bincount(train_targets, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(train_targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def _options(config: TrainConfig, run, size: int, masked_images) -> dict:
    """The options a checkpoint records of the run that wrote it."""
    return {"backbone": config.backbone, "weights": config.weights, "epochs": config.epochs,
            "img_size": size, "batch_size": config.batch_size, "lr": run.head_lr, "seed": config.seed,
            "split_seed": config.split_seed, "patience": config.patience, "keep": config.keep,
            "val_fraction": config.val_fraction,
            "freeze_bn": run.freeze_bn,
            "train_layers": config.train_layers, "sources": config.sources.to_dict(),
            "label_smoothing": config.label_smoothing, "warmup_epochs": config.warmup_epochs,
            "objective": config.objective, "sampler": config.sampler, "flip": config.flip,
            "mask_guidance": config.mask_guidance, "masked_images": masked_images, "localiser": config.localiser,
            "cache_draws": config.cache_draws}


def _guidance(config: TrainConfig, records, model_config, problems: list) -> tuple:
    """With mask guidance: (masks, has) of the training records in the model's view (its input
    size, crop and window); unreadable masks join the problems."""
    if not config.mask_guidance:
        return ()
    masks, has, bad = lesion_masks(records, model_config.input_size, crop=model_config.crop,
                                   window=model_config.window)
    problems += bad
    LOG.info("mask guidance %g: %d of %d training images have a lesion mask", config.mask_guidance, int(has.sum()),
             len(records))
    return masks, has


def _figures(localiser: dict | None) -> dict | None:
    """A localiser payload's figures (its weights and mean mask left out)."""
    return None if localiser is None else {k: v for k, v in localiser.items() if k not in ("state_dict", "mean_mask")}


def _has_masks(records) -> bool:
    return any((r.metadata or {}).get("mask") for r in records)


def _localiser_encoder(model, config: TrainConfig, records) -> tuple:
    """(a copy of the initial trunk for the localiser, or None; the note when the backbone cannot carry
    one). Asked for with ``--localiser``, such a backbone is a TrainError before any training."""
    if config.localiser is False or not _has_masks(records):
        return None, None
    problem = models_localiser.localiser_problem(model.trunk, model.config.input_size)
    if problem is None:
        return copy.deepcopy(model.trunk), None
    if config.localiser:
        raise TrainError(f"--localiser: {problem}; or train without it (--no-localiser)")
    return None, problem  # the note travels in the TrainResult: `cbr train` prints it once


def _localiser(initial, model_config, config: TrainConfig, records, cache, split, device, progress: bool,
               problems: list) -> dict | None:
    """The lesion localiser's checkpoint payload when training images have masks (None: none has)."""
    if initial is None:
        if config.localiser is not False and not _has_masks(records):
            LOG.info("no lesion masks in the training set: no localiser is trained; maps are the class and "
                     "similarity maps")
        return None
    payload, bad = train_localiser(initial, model_config, config, records, cache, *split, device=device,
                                   progress=progress)
    problems += [p for p in bad if p.path not in {q.path for q in problems}]
    return payload


def _masked(guide: tuple) -> int | None:
    return int(guide[1].sum()) if guide else None


def _group(r: Record, i: int) -> str:
    return r.group if r.group is not None else f"<image {r.sha256[:12]}>"
