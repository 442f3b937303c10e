"""Fine-tuning a registry backbone with a classification head on a labelled dataset (``cbr train``).

The fine-tuned checkpoint serves twice: its head is a plain softmax classifier, and its
normalised embedding (``neck(trunk(x))``) is what ``cbr index`` stores for retrieval.

Decisions (decoding and augmentation: see :mod:`cbr.learn.augmentation`):

* **Class balance**: cross-entropy weighted by n / (K * n_class) over the training part (the
  "balanced" weights), so every image is seen once per epoch and rare classes count as much as
  common ones.
* **Validation**: a patient-grouped, stratified split (:func:`cbr.evaluation.splits.group_split`) keeps
  ``val_fraction`` of the images out of training; no patient is on both sides. Early stopping
  watches the validation balanced accuracy (ties: lower validation loss) and keeps the best
  epoch's weights. Without any validation image (``val_fraction=0`` or too few groups) every
  epoch runs and the last one is kept.
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
* **Reproducibility**: ``seed`` fixes the head's initialisation, the split, the shuffling (its
  own generator), the augmentation and the DataLoader workers; torch's and numpy's global
  random states are restored afterwards. Same seed and data on the CPU -> the same weights and
  fingerprint. On CUDA cuDNN may pick non-deterministic kernels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cbr.data.dataset import ManifestSpec, Problem, Record, read_dataset
from cbr.errors import DatasetError
from cbr.learn.augmentation import AUGMENTATION, Augmented, decode_all, is_grayscale, make_augmentation
from cbr.learn.config import HEAD_LR, TrainConfig, TrainError, check_out

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

BACKBONE_LR_FACTOR = 0.1  # pretrained backbone lr = head lr x this
WEIGHT_DECAY = 0.01
FREEZE_BN_BELOW = 16  # pretrained BatchNorm statistics stay frozen for smaller batches


@dataclass
class TrainResult:
    """What one training run produced."""

    path: str  # the checkpoint written
    class_names: list[str]  # the head's classes, sorted
    epochs_run: int
    best_epoch: int  # 1-based epoch whose weights were kept
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


# ---------------------------------------------------------------------------------------------
# training


def _normaliser(config, device):
    import torch

    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255.0
    return lambda x: (x.to(device=device, dtype=torch.float32) - mean) / std


def trunk_stages(trunk) -> list:
    """The trunk's blocks in order: its children, with plain ``nn.Sequential`` containers opened
    (so mobilenet's ``features`` gives its 19 blocks, resnet's ``layer4`` its bottlenecks)."""
    from torch import nn

    out = []
    for child in trunk.children():
        if type(child) is nn.Sequential:
            out.extend(trunk_stages(child))
        else:
            out.append(child)
    return out


def _freeze_leading(model, train_layers: int | None) -> list:
    """Freeze all but the last ``train_layers`` trunk stages; returns the frozen modules."""
    if train_layers is None:
        return []
    stages = trunk_stages(model.trunk)
    frozen = stages[: max(len(stages) - train_layers, 0)]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _set_train_mode(model, freeze_bn: bool, frozen) -> None:
    from torch import nn

    model.train()
    for m in frozen:
        m.eval()  # frozen stages keep their BatchNorm statistics (and skip dropout)
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _param_groups(model, lr: float, pretrained: bool) -> list[dict]:
    head = [p for p in model.head.parameters() if p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    body_lr = lr * BACKBONE_LR_FACTOR if pretrained else lr
    return [g for g in ({"params": body, "lr": body_lr}, {"params": head, "lr": lr}) if g["params"]]


def _evaluate(model, images, targets, normalise, weight, batch_size: int) -> tuple[float, list[int]]:
    """(mean weighted loss, predicted class indices) on cached uint8 images, no augmentation."""
    import torch
    import torch.nn.functional as F

    model.eval()
    losses, preds = [], []
    with torch.no_grad():
        for s in range(0, len(targets), batch_size):
            x = normalise(images[s : s + batch_size])
            y = torch.as_tensor(targets[s : s + batch_size], device=x.device)
            logits = model.logits(x).float()
            losses.append(F.cross_entropy(logits, y, weight=weight, reduction="sum").item())
            preds.extend(logits.argmax(1).tolist())
    return math.fsum(losses) / max(len(targets), 1), preds


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
    import torch

    from cbr.evaluation.splits import group_split
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.device import resolve_device
    from cbr.models.embedder import create_embedder

    t0 = time.monotonic()
    config.check()
    out = check_out(out)
    device = resolve_device(config.device)
    if records is None:
        if source is None:
            raise TrainError("give a dataset (a folder of class folders or a CSV manifest) or records")
        scan = read_dataset(source, manifest, progress=progress)
        records, problems = list(scan.records), list(scan.problems)
        what = str(source)
    else:
        records, problems = list(records), []
        what = str(source) if source is not None else "the training records"
    class_names = _check_classes(records, what)
    # Built before decoding, so missing ImageNet weights fail fast.
    model = create_embedder(config.backbone, weights=config.weights, input_size=config.img_size,
                            class_names=class_names, seed=config.seed, device=device)
    size = model.config.input_size

    kept, cache, bad = decode_all(records, size, batch_size=config.batch_size, num_workers=config.num_workers,
                                  progress=progress)
    problems += bad
    records = [records[i] for i in kept]
    _check_classes(records, what)
    if len({r.label for r in records}) < len(class_names):
        lost = sorted(set(class_names) - {r.label for r in records})
        raise DatasetError(f"{what}: no readable image of class(es) {', '.join(lost)}; see the problems listed")
    targets = [class_names.index(r.label) for r in records]
    grey = is_grayscale(cache, seed=config.seed)

    train_idx, val_idx = group_split([r.label for r in records], [r.group for r in records],
                                     fraction=config.val_fraction, seed=config.seed)
    train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
    if not val_idx:
        LOG.warning("no validation images (too few patient groups or val_fraction=0): all %d epochs run "
                    "and the last one is kept", config.epochs)
    counts = np.bincount([targets[i] for i in train_idx], minlength=len(class_names)).astype(np.float64)
    class_weight = torch.tensor(len(train_idx) / (len(class_names) * np.maximum(counts, 1)),
                                dtype=torch.float32, device=device)
    run = _Run(model, config, device, class_names, class_weight, progress)
    train_set = Augmented(cache[train_idx], [targets[i] for i in train_idx], make_augmentation(grey))
    history, best_epoch = run.fit(train_set, cache[val_idx], [targets[i] for i in val_idx])

    seen_sha = [r.sha256 for r in records]
    best_bacc = history[best_epoch - 1]["val_balanced_accuracy"]
    extra = {
        "history": history,
        "dataset": str(source) if source is not None else "<records>",
        "best_epoch": best_epoch,
        "best_val_balanced_accuracy": best_bacc,
        "train_size": len(train_idx),
        "val_size": len(val_idx),
        "val_sha256": [records[i].sha256 for i in val_idx],
        "grayscale": grey,
        "augmentation": AUGMENTATION if not grey else AUGMENTATION.split(" (+")[0],
        "options": {"backbone": config.backbone, "weights": config.weights, "epochs": config.epochs,
                    "img_size": size, "batch_size": config.batch_size, "lr": run.head_lr, "seed": config.seed,
                    "patience": config.patience, "val_fraction": config.val_fraction, "freeze_bn": run.freeze_bn,
                    "train_layers": config.train_layers},
    }
    try:
        fingerprint = save_checkpoint(model, out, train_sha256=seen_sha, extra=extra)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write the checkpoint ({e.strerror or e}); choose another --out") from None
    return TrainResult(
        path=str(out), class_names=list(class_names), epochs_run=len(history), best_epoch=best_epoch,
        best_val_balanced_accuracy=best_bacc, history=history, train_size=len(train_idx),
        val_size=len(val_idx), fingerprint=fingerprint, elapsed=time.monotonic() - t0, grayscale=grey,
        train_groups=sorted({_group(records[i], i) for i in train_idx}),
        val_groups=sorted({_group(records[i], i) for i in val_idx}), problems=problems,
        grouped=any(records[i].group is not None for i in train_idx),
    )


class _Run:
    """The optimisation loop of one training run: epochs, validation, early stopping."""

    def __init__(self, model, config: TrainConfig, device: str, class_names, class_weight, progress: bool):
        self.model, self.config, self.device = model, config, device
        self.class_names, self.class_weight, self.progress = class_names, class_weight, progress
        self.normalise = _normaliser(model.config, device)
        self.pretrained = config.weights == "imagenet"
        self.freeze_bn = self.pretrained and config.batch_size < FREEZE_BN_BELOW
        self.frozen = _freeze_leading(model, config.train_layers)
        self.head_lr = HEAD_LR if config.lr is None else float(config.lr)

    def fit(self, train_set, val_images, val_targets) -> tuple[list[dict], int]:
        """Train; load the best epoch's weights into the model; (history, best epoch)."""
        import torch

        cfg, n_train = self.config, len(train_set)
        np_state = np.random.get_state()
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        history: list[dict] = []
        best_key, best_state, best_epoch, stale = None, None, 0, 0
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.seed)
                np.random.seed(cfg.seed)
                loader = torch.utils.data.DataLoader(
                    train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                    generator=torch.Generator().manual_seed(cfg.seed),
                    drop_last=n_train % cfg.batch_size == 1 and n_train > 1,
                )
                steps = max(len(loader), 1) * cfg.epochs
                optimiser = torch.optim.AdamW(_param_groups(self.model, self.head_lr, self.pretrained),
                                              weight_decay=WEIGHT_DECAY)
                schedule = torch.optim.lr_scheduler.LambdaLR(
                    optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
                for epoch in range(1, cfg.epochs + 1):
                    row, key = self._epoch(epoch, loader, optimiser, schedule, val_images, val_targets)
                    history.append(row)
                    if best_key is None or key > best_key:
                        best_key, best_epoch, stale = key, epoch, 0
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                    else:
                        stale += 1
                        if cfg.patience and stale >= cfg.patience:
                            self._say(f"early stop: no better validation balanced accuracy for {cfg.patience} epoch(s)")
                            break
        finally:
            np.random.set_state(np_state)
        self.model.load_state_dict(best_state)
        self.model.eval()
        return history, best_epoch

    def _epoch(self, epoch, loader, optimiser, schedule, val_images, val_targets) -> tuple[dict, tuple]:
        """One pass over the training part, then the validation figures: (history row, ranking key)."""
        import torch.nn.functional as F
        from tqdm import tqdm

        from cbr.evaluation.metrics import accuracy, balanced_accuracy

        te = time.monotonic()
        _set_train_mode(self.model, self.freeze_bn, self.frozen)
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.config.epochs}", unit="batch", disable=not self.progress,
                   leave=False)
        for xb, yb in bar:
            x, y = self.normalise(xb), yb.to(self.device)
            loss = F.cross_entropy(self.model.logits(x).float(), y, weight=self.class_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        bar.close()
        row = {"epoch": epoch, "loss": total / max(seen, 1), "lr": optimiser.param_groups[-1]["lr"]}
        if val_targets:
            val_loss, pred = _evaluate(self.model, val_images, val_targets, self.normalise, self.class_weight,
                                       self.config.batch_size)
            truth = [self.class_names[t] for t in val_targets]
            names = [self.class_names[p] for p in pred]
            row.update(val_loss=val_loss, val_accuracy=accuracy(truth, names),
                       val_balanced_accuracy=balanced_accuracy(truth, names))
            key = (round(row["val_balanced_accuracy"], 12), -val_loss)
        else:
            row.update(val_loss=None, val_accuracy=None, val_balanced_accuracy=None)
            key = (epoch,)
        row["seconds"] = round(time.monotonic() - te, 3)
        self._say(_epoch_line(row, self.config.epochs))
        return row, key

    def _say(self, line: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(line)


def _group(r: Record, i: int) -> str:
    return r.group if r.group is not None else f"<image {r.sha256[:12]}>"


def _epoch_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}"
    if row.get("val_balanced_accuracy") is not None:
        line += (f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.3f}, "
                 f"val balanced accuracy {row['val_balanced_accuracy']:.3f}")
    return line + f" ({row['seconds']:.1f} s)"
