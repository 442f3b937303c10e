"""The settings of one training run (``TrainConfig``), checked before anything slow happens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbr.data.contrast import check_contrast
from cbr.data.crop import check_crop
from cbr.data.sources import SourceSpec
from cbr.errors import CbrError, UnknownNameError
from cbr.files import output_kind
from cbr.learn.augmentation import check_flip
from cbr.learn.objective import get_objective
from cbr.learn.sampling import get_sampler
from cbr.models.backbones import backbone_spec
from cbr.models.config import TTAS, WEIGHTS

__all__ = ["TrainConfig", "TrainError", "HEAD_LR", "KEEPS"]

HEAD_LR = 1e-3  # default lr of the new head (and of everything with random weights)

# Which epoch's weights a run keeps. The validation images also calibrate the vote (`cbr index`
# fits its temperature, prior and conformal sets on them), so an epoch chosen for its validation
# score makes them look a little better than new images. Measured (docs/results.md, "The last
# epoch kept"): keeping the last epoch calibrated brain MRI and chest X-ray better, but cost the
# brain MRI members 0.01-0.11 of balanced accuracy (their later epochs overfit 182 images), and
# changed no calibration goal; so the best epoch stays the default.
KEEPS = {
    "best": "the epoch with the best validation balanced accuracy (chosen on the images that calibrate the vote)",
    "last": "the last epoch run: no choice is made on the validation images, which stay untouched for calibration",
}


class TrainError(CbrError):
    """Training cannot start or cannot finish with these data or options."""


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune: the model, the optimisation budget and where it runs.

    Cross-validation trains one model per fold with the same config.
    """

    backbone: str = "mobilenet_v2"  # a name in cbr.models.backbones.BACKBONES, or timm:<model>
    weights: str = "imagenet"  # "imagenet" (fine-tune) or "none" (random weights)
    epochs: int = 10  # the most epochs to run (early stopping may end sooner)
    img_size: int | None = None  # input side in pixels; None: the backbone's
    batch_size: int = 32  # images per step
    lr: float | None = None  # lr of the head (a pretrained backbone gets lr / 10); None: HEAD_LR
    seed: int = 0  # split, head init, shuffling, augmentation (and the folds of cross-validation)
    # the validation split's seed alone; None: ``seed``. Members of a deep ensemble (other seeds, one
    # split seed) then hold out the same images, which calibrate the ensemble
    split_seed: int | None = None
    device: str | None = None  # "cpu", "cuda"; None: cuda when available
    patience: int | None = 3  # epochs without a better val balanced accuracy before stopping; 0/None: never
    keep: str = "best"  # KEEPS: whose weights the checkpoint keeps, the best on validation or the last epoch's
    val_fraction: float = 0.2  # share of the images (by patient group) kept for validation
    train_layers: int | None = None  # fine-tune only the last N trunk blocks (0: the head only); None: all
    num_workers: int | None = None  # decoding worker processes; None: 1 on a 2-core machine
    # DICOM/NIfTI/.npz: which frames, slices and split are read, and the VOI window, which becomes
    # part of the model's preprocessing and fingerprint (None: auto)
    sources: SourceSpec = SourceSpec()
    contrast: str = "none"  # cbr.data.contrast.CONTRASTS: equalisation before letterboxing (kept with the model)
    tta: str = "none"  # test-time augmentation the checkpoint's embeddings use (models.config.TTAS)
    crop: str = "none"  # cbr.data.crop.CROPS: foreground crop before letterboxing (kept with the model)
    label_smoothing: float = 0.0  # share of each target spread over the other classes (cross-entropy)
    warmup_epochs: int = 0  # epochs of linear learning-rate warm-up before the cosine decay
    objective: str = "ce"  # cbr.learn.objective.OBJECTIVES: what the loss optimises (ce, supcon, ce+supcon)
    sampler: str = "shuffle"  # cbr.learn.sampling.SAMPLERS: how batches are drawn (balanced: by class)
    flip: str = "horizontal"  # cbr.learn.augmentation.FLIPS: training flips (horizontal: as always)
    mask_guidance: float = 0.0  # weight of the map-outside-the-lesion loss (cbr.learn.guidance); 0: off
    # with lesion masks: also train the lesion localiser (cbr.learn.segmentation). None: when the
    # backbone can carry one (a ViT cannot: it trains without, and says so); True: required, an
    # error for such a backbone; False: never
    localiser: bool | None = None
    # with train_layers: the frozen blocks' features computed once for this many augmentation draws
    # per image, and the epochs trained on them (cbr.learn.feature_cache); 0: off
    cache_draws: int = 0

    @property
    def validation_seed(self) -> int:
        """The seed that draws the validation split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def check(self) -> None:
        """Raise TrainError or UnknownNameError naming the first option out of range."""
        spec = backbone_spec(self.backbone)  # an unknown name raises, naming the choices
        if self.weights not in WEIGHTS:
            raise UnknownNameError("weights", self.weights, WEIGHTS)

        check_contrast(self.contrast)

        check_crop(self.crop)
        get_objective(self.objective)
        get_sampler(self.sampler)
        check_flip(self.flip)
        if self.keep not in KEEPS:
            raise UnknownNameError("kept epoch", self.keep, KEEPS)

        if self.tta not in TTAS:
            raise UnknownNameError("test-time augmentation", self.tta, TTAS)
        if not 0 <= self.label_smoothing < 1:
            raise TrainError(f"--label-smoothing {self.label_smoothing}: use a value in [0, 1), e.g. 0.1")
        if self.warmup_epochs < 0:
            raise TrainError(f"--warmup {self.warmup_epochs}: use 0 (no warm-up) or more epochs")
        if not self.mask_guidance >= 0:
            raise TrainError(f"--mask-guidance {self.mask_guidance}: use 0 (off) or a positive weight such as 1")
        for flag, seed in (("--seed", self.seed), ("--split-seed", self.split_seed)):
            if seed is not None and seed < 0:  # numpy's generators take no negative seed
                raise TrainError(f"{flag} {seed}: use 0 or more")
        if self.epochs < 1:
            raise TrainError(f"--epochs {self.epochs}: train for at least 1 epoch")
        if self.batch_size < 1:
            raise TrainError(f"--batch-size {self.batch_size}: use at least 1")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"--lr {self.lr}: the learning rate must be > 0 (default {HEAD_LR:g})")
        if self.train_layers is not None and self.train_layers < 0:
            raise TrainError(f"--train-layers {self.train_layers}: use 0 (the head only) or more")
        if self.cache_draws < 0:
            raise TrainError(f"--cache-draws {self.cache_draws}: use 0 (off) or more draws per image")
        if self.cache_draws and self.train_layers is None:
            raise TrainError(f"--cache-draws {self.cache_draws} caches the frozen blocks; freeze some with "
                             "--train-layers N (e.g. 5)")
        if self.patience is not None and self.patience < 0:
            raise TrainError(f"--patience {self.patience}: use 0 (no early stopping) or more")
        if not 0 <= self.val_fraction < 1:
            raise TrainError(f"validation fraction {self.val_fraction}: use a value in [0, 1)")
        if self.img_size is not None and self.img_size < spec.min_input_size:
            raise TrainError(
                f"--img-size {self.img_size} is too small for {self.backbone}; use at least "
                f"{spec.min_input_size} (default {spec.input_size})"
            )


def check_out(out) -> Path:
    """The checkpoint path, with its folder created; TrainError if it cannot be written there."""
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
    # A checkpoint is read back by `cbr index`: it must be a file, so no stdout or FIFO here, and
    # a device, socket or link is refused before hours of training (output_kind says why).
    if output_kind(out) not in ("new", "file"):
        raise TrainError(f"--out {out}: a checkpoint must be a regular file (cbr index reads it back); "
                         "give a file name such as model.pt")
    return p
