"""Fine-tuning a registry backbone with a classification head on a labelled dataset (``cbr train``).

The fine-tuned checkpoint serves twice: its head is a plain softmax classifier, and its
normalised embedding (``neck(trunk(x))``) is what ``cbr index`` stores for retrieval.

Decisions:

* **Decode once.** Every image is decoded (:func:`cbr.data.image.read_image`, in DataLoader workers),
  letterboxed to the input size and kept in memory as uint8 (3 x S x S bytes each: 150 KB at
  224 px, so 10,000 images take 1.5 GB). Epochs then cost only the network. Files that cannot
  be decoded are skipped and listed in ``TrainResult.problems``.
* **Augmentation** (training part only, per sample, on the letterboxed uint8 tensor, with
  ``torchvision.transforms.v2``): horizontal flip (p = 0.5); rotation within +-10 degrees and
  scale 0.9-1.1 in one affine warp, black fill like the letterbox padding; brightness and
  contrast +-20 %. Saturation (+-10 %) and hue (+-0.02) jitter are added only for colour data:
  a dataset whose sampled images (90 % of them at least) have R == G == B, within JPEG rounding,
  is grayscale, and colour jitter would invent colours its images never have. No crops: lesions at the border of
  a letterboxed image must stay in view.
* **Class balance**: cross-entropy weighted by n / (K * n_class) over the training part (the
  "balanced" weights), so every image is seen once per epoch and rare classes count as much as
  common ones.
* **Validation**: a patient-grouped, stratified split (:func:`cbr.evaluation.metrics.group_split`) keeps
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
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from cbr.data.dataset import ManifestSpec, Problem, Record, read_dataset
from cbr.data.batches import iter_batches
from cbr.errors import CbrError, DatasetError, UnknownNameError

__all__ = [
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

# What the augmentation does, in words (stored in checkpoints and printed by `cbr train`).
AUGMENTATION = "hflip, rotate +-10 deg, scale 0.9-1.1, brightness/contrast +-20% (+ saturation/hue for colour data)"
HEAD_LR = 1e-3  # default lr of the new head (and of everything with random weights)
BACKBONE_LR_FACTOR = 0.1  # pretrained backbone lr = head lr x this
WEIGHT_DECAY = 0.01
FREEZE_BN_BELOW = 16  # pretrained BatchNorm statistics stay frozen for smaller batches
GREY_SAMPLE = 64  # images checked for R == G == B
GREY_TOLERANCE = 1.0  # mean |R-G| + |G-B| in grey levels still counted as grey (JPEG rounding)
GREY_SHARE = 0.9  # a dataset is grayscale when at least this share of the sampled images is grey


class TrainError(CbrError):
    """Training cannot start or cannot finish with these data or options."""


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("train_groups")
        d.pop("val_groups")
        d["problems"] = [{"path": p.path, "reason": p.reason} for p in self.problems]
        d["elapsed_s"] = round(d.pop("elapsed"), 3)
        return d


# ---------------------------------------------------------------------------------------------
# argument checks (before anything slow)


def _check_out(out) -> Path:
    """The checkpoint path, with its folder created; CbrError if it cannot be written there."""
    p = Path(out)
    if p.is_dir():
        raise TrainError(f"--out {out}: is a folder; give a file name such as {p / 'model.pt'}")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the folder {parent} ({e.strerror or e}); choose another --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: the folder {parent} is not writable; choose another --out")
    return p


def _check_options(backbone, weights, epochs, batch_size, lr, patience, val_fraction, img_size, train_layers):
    from cbr.models.backbones import BACKBONES

    if backbone not in BACKBONES:
        raise UnknownNameError("backbone", backbone, BACKBONES)
    if weights not in ("imagenet", "none"):
        raise UnknownNameError("weights", weights, ("imagenet", "none"))
    if epochs < 1:
        raise TrainError(f"--epochs {epochs}: train for at least 1 epoch")
    if batch_size < 1:
        raise TrainError(f"--batch-size {batch_size}: use at least 1")
    if lr is not None and not lr > 0:
        raise TrainError(f"--lr {lr}: the learning rate must be > 0 (default {HEAD_LR:g})")
    if train_layers is not None and train_layers < 0:
        raise TrainError(f"--train-layers {train_layers}: use 0 (the head only) or more")
    if patience is not None and patience < 0:
        raise TrainError(f"--patience {patience}: use 0 (no early stopping) or more")
    if not 0 <= val_fraction < 1:
        raise TrainError(f"validation fraction {val_fraction}: use a value in [0, 1)")
    spec = BACKBONES[backbone]
    if img_size is not None and img_size < spec.min_input_size:
        raise TrainError(
            f"--img-size {img_size} is too small for {backbone}; use at least {spec.min_input_size} "
            f"(default {spec.input_size})"
        )


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
# decoding, augmentation


def _letterboxed(img, size: int):
    """PIL image -> uint8 (3, size, size), letterboxed: the cache training augments from."""
    from torchvision.transforms.functional import pil_to_tensor

    from cbr.data.image import letterbox

    return pil_to_tensor(letterbox(img, size))


def decode_all(records, size: int, *, batch_size: int = 32, num_workers=None, progress=False):
    """Decode and letterbox ``records`` once: (kept indices, uint8 tensor (N, 3, S, S), problems)."""
    import torch
    from tqdm import tqdm

    kept, tensors, problems = [], [], []
    with tqdm(total=len(records), desc="decoding", unit="img", disable=not progress) as bar:
        for idx, batch, bad in iter_batches(records, [partial(_letterboxed, size=size)], batch_size, num_workers):
            problems.extend(Problem(records[i].path, reason) for i, reason in bad)
            if idx:
                kept.extend(idx)
                tensors.extend(batch[0])
            bar.update(len(idx) + len(bad))
    stack = torch.stack(tensors) if tensors else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return kept, stack, problems


def is_grayscale(images, *, sample: int = GREY_SAMPLE, seed: int = 0) -> bool:
    """Whether the sampled uint8 images (N, 3, H, W) are grey (R == G == B within JPEG rounding).

    At least 90 % of them must be: grey archives often hold a few tinted exports (18 of the 228
    brain MRI images), which do not make the modality a colour one.
    """
    n = len(images)
    if n == 0:
        return False
    pick = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    grey = 0
    for i in pick:
        x = images[int(i)].float()
        diff = (x[0] - x[1]).abs().mean() + (x[1] - x[2]).abs().mean()
        grey += float(diff) <= GREY_TOLERANCE
    return grey >= GREY_SHARE * len(pick)


def make_augmentation(grayscale: bool):
    """The training augmentation for uint8 (3, S, S) tensors (see the module docstring)."""
    from torchvision.transforms import InterpolationMode, v2

    jitter = dict(brightness=0.2, contrast=0.2)
    if not grayscale:
        jitter.update(saturation=0.1, hue=0.02)
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomAffine(degrees=10, scale=(0.9, 1.1), interpolation=InterpolationMode.BILINEAR, fill=0),
        v2.ColorJitter(**jitter),
    ])


class _Augmented:
    """Cached uint8 images -> (augmented uint8 image, label index)."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.targets[i]


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


def _resolve_device(device):
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return str(device)


def train_model(
    source=None,
    out="model.pt",
    *,
    records=None,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    epochs: int = 10,
    img_size: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    device: str | None = None,
    patience: int | None = 3,
    val_fraction: float = 0.2,
    train_layers: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    manifest: ManifestSpec | None = None,
) -> TrainResult:
    """Fine-tune a registry backbone with a classification head and write a checkpoint.

    Args:
        source: a class-folder dataset or a CSV manifest (see ``read_dataset``).
        out: the checkpoint file to write (its folder is created).
        records: train on these ``Record``s instead of reading ``source`` (evaluation folds).
        backbone: a name in ``cbr.models.embedder.BACKBONES``.
        weights: ``imagenet`` (fine-tune) or ``none`` (train from random weights).
        epochs: the most epochs to run (early stopping may end sooner).
        img_size: input side in pixels; default the backbone's.
        batch_size: images per step.
        lr: learning rate of the head (the pretrained backbone gets lr / 10); default 1e-3.
        seed: makes the run reproducible (split, head init, shuffling, augmentation).
        device: ``cpu`` or ``cuda``; default CUDA when available.
        patience: stop after this many epochs without a better validation balanced accuracy;
            0 or None never stops early.
        val_fraction: share of the images (by patient group) kept for validation.
        train_layers: fine-tune only the last N blocks of the backbone (see ``trunk_stages``)
            and the head; 0 trains the head alone; default all (about 3x cheaper on a CPU with
            mobilenet_v2 and 5 blocks).
        num_workers: decoding worker processes; default 1 on a 2-core machine.
        progress: show progress bars and per-epoch validation figures.
        manifest: the manifest's columns and image folders (see ``ManifestSpec``).

    Raises:
        DatasetError: fewer than 2 classes, no usable images, an unreadable source.
        TrainError: an option out of range, an unwritable ``out``, no CUDA for ``device="cuda"``.
        UnknownNameError: an unknown backbone or weights name.

    Example:
        >>> result = train_model("data/brain_mri", "model.pt", epochs=5, img_size=160)
        >>> result.best_val_balanced_accuracy, result.path
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder
    from cbr.evaluation.metrics import accuracy, balanced_accuracy, group_split

    t0 = time.monotonic()
    _check_options(backbone, weights, epochs, batch_size, lr, patience, val_fraction, img_size, train_layers)
    out = _check_out(out)
    device = _resolve_device(device)
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
    model = create_embedder(backbone, weights=weights, input_size=img_size, class_names=class_names,
                            seed=seed, device=device)
    size = model.config.input_size

    kept, cache, bad = decode_all(records, size, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress)
    problems += bad
    records = [records[i] for i in kept]
    _check_classes(records, what)
    if len({r.label for r in records}) < len(class_names):
        lost = sorted(set(class_names) - {r.label for r in records})
        raise DatasetError(f"{what}: no readable image of class(es) {', '.join(lost)}; see the problems listed")
    targets = [class_names.index(r.label) for r in records]
    grey = is_grayscale(cache, seed=seed)

    train_idx, val_idx = group_split([r.label for r in records], [r.group for r in records],
                                     fraction=val_fraction, seed=seed)
    train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
    if not val_idx:
        LOG.warning("no validation images (too few patient groups or val_fraction=0): all %d epochs run "
                    "and the last one is kept", epochs)
    counts = np.bincount([targets[i] for i in train_idx], minlength=len(class_names)).astype(np.float64)
    class_weight = torch.tensor(len(train_idx) / (len(class_names) * np.maximum(counts, 1)),
                                dtype=torch.float32, device=device)
    normalise = _normaliser(model.config, device)
    pretrained = weights == "imagenet"
    freeze_bn = pretrained and batch_size < FREEZE_BN_BELOW
    frozen = _freeze_leading(model, train_layers)
    head_lr = HEAD_LR if lr is None else float(lr)

    np_state = np.random.get_state()
    devices = [torch.cuda.current_device()] if device.startswith("cuda") else []
    history: list[dict] = []
    best_key, best_state, best_epoch, stale = None, None, 0, 0
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            train_set = _Augmented(cache[train_idx], [targets[i] for i in train_idx], make_augmentation(grey))
            loader = torch.utils.data.DataLoader(
                train_set, batch_size=batch_size, shuffle=True, num_workers=0,
                generator=torch.Generator().manual_seed(seed),
                drop_last=len(train_idx) % batch_size == 1 and len(train_idx) > 1,
            )
            steps = max(len(loader), 1) * epochs
            optimiser = torch.optim.AdamW(_param_groups(model, head_lr, pretrained), weight_decay=WEIGHT_DECAY)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
            val_images, val_targets = cache[val_idx], [targets[i] for i in val_idx]
            val_truth = [class_names[t] for t in val_targets]
            for epoch in range(1, epochs + 1):
                te = time.monotonic()
                _set_train_mode(model, freeze_bn, frozen)
                total, seen = 0.0, 0
                bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False)
                for xb, yb in bar:
                    x, y = normalise(xb), yb.to(device)
                    loss = F.cross_entropy(model.logits(x).float(), y, weight=class_weight)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    total += loss.item() * len(y)
                    seen += len(y)
                    bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
                bar.close()
                row = {"epoch": epoch, "loss": total / max(seen, 1), "lr": optimiser.param_groups[-1]["lr"]}
                if val_idx:
                    val_loss, pred = _evaluate(model, val_images, val_targets, normalise, class_weight, batch_size)
                    names = [class_names[p] for p in pred]
                    row.update(val_loss=val_loss, val_accuracy=accuracy(val_truth, names),
                               val_balanced_accuracy=balanced_accuracy(val_truth, names, class_names))
                    key = (round(row["val_balanced_accuracy"], 12), -val_loss)
                else:
                    row.update(val_loss=None, val_accuracy=None, val_balanced_accuracy=None)
                    key = (epoch,)
                row["seconds"] = round(time.monotonic() - te, 3)
                history.append(row)
                if progress:
                    tqdm.write(_epoch_line(row, epochs))
                if best_key is None or key > best_key:
                    best_key, best_epoch, stale = key, epoch, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    stale += 1
                    if patience and stale >= patience:
                        if progress:
                            tqdm.write(f"early stop: no better validation balanced accuracy for {patience} epoch(s)")
                        break
    finally:
        np.random.set_state(np_state)

    model.load_state_dict(best_state)
    model.eval()
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
        "options": {"backbone": backbone, "weights": weights, "epochs": epochs, "img_size": size,
                    "batch_size": batch_size, "lr": head_lr, "seed": seed, "patience": patience,
                    "val_fraction": val_fraction, "freeze_bn": freeze_bn, "train_layers": train_layers},
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
    )


def _group(r: Record, i: int) -> str:
    return r.group if r.group is not None else f"<image {r.sha256[:12]}>"


def _epoch_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}"
    if row.get("val_balanced_accuracy") is not None:
        line += (f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.3f}, "
                 f"val balanced accuracy {row['val_balanced_accuracy']:.3f}")
    return line + f" ({row['seconds']:.1f} s)"
