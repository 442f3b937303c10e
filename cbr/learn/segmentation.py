"""Training the lesion localiser (``cbr train`` when the training images have masks).

The localiser (:mod:`cbr.models.localiser`) learns on the training images that have a lesion mask,
with the classifier's split: its validation part picks the best epoch. Decisions:

* **Loss.** Dice + binary cross-entropy (smp's ``DiceLoss`` in binary mode, and torch's BCE), on
  logits upsampled to the mask's size: Dice keeps a lesion of 2% of the image from being drowned
  by the background, BCE gives every pixel a gradient from the first step.
* **Images with an empty mask** ("no lesion") train too: the target is all background, which
  teaches the localiser to stay quiet on them.
* **Optimiser.** AdamW, the decoder at ``lr`` (default 1e-3) and a pretrained encoder at ``lr / 10``,
  cosine decay; the pretrained encoder's BatchNorm statistics stay frozen (a few images per batch
  would only add noise). Augmentation: the classifier's flips and affine warp, applied to the
  image and its mask together (:class:`cbr.learn.augmentation.Augmented`).
* **Best epoch.** The highest validation pointing game (ties: higher Dice); without validation
  images, the last epoch.
* **Baseline.** The mean of the training masks is kept with the localiser: the "mean mask" guess
  that every localisation figure is shown beside.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from cbr.lazy_import import LazyModule
from cbr.learn.augmentation import Augmented, make_augmentation
from cbr.learn.guidance import lesion_masks
from cbr.learn.trainer import lr_schedule
from explain.metrics import pointing_game
from explain.overlay import upsample

__all__ = ["train_localiser", "mean_mask", "normaliser", "DICE_WEIGHT"]

LOG = logging.getLogger(__name__)
models_localiser = LazyModule("cbr.models.localiser")  # torch-bound: loads on first use

DICE_WEIGHT = 1.0  # loss = BCE + DICE_WEIGHT x Dice loss
ENCODER_LR_FACTOR = 0.1


def mean_mask(masks, has) -> np.ndarray | None:
    """The mean of the non-empty masks (uint8 (N, 1, S, S)) as float32 (S, S); None without any."""
    if not bool(has.any()):
        return None
    return masks[has].float().mean(dim=(0, 1)).numpy().astype(np.float32)


def normaliser(config):
    import torch

    mean = torch.tensor(config.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std).view(1, 3, 1, 1) * 255.0
    return lambda x, device: (x.to(device=device, dtype=torch.float32) - mean.to(device)) / std.to(device)


def _loss_fn():
    import torch.nn.functional as F
    from segmentation_models_pytorch.losses import DiceLoss

    dice = DiceLoss("binary", from_logits=True)

    def loss(logits, target):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.binary_cross_entropy_with_logits(logits, target) + DICE_WEIGHT * dice(logits, target)
    return loss


def _validate(loc, images, masks, has, normalise, device, batch_size: int) -> tuple[float | None, float | None]:
    """(pointing game, mean Dice) of ``loc`` on the validation images with a non-empty mask."""
    idx = [i for i in range(len(images)) if bool(has[i])]
    if not idx:
        return None, None
    hits, dices = [], []
    for s in range(0, len(idx), batch_size):
        part = idx[s:s + batch_size]
        probs = loc.probabilities(normalise(images[part], device))
        for p, i in zip(probs, part):
            m = masks[i, 0].numpy().astype(bool)
            hits.append(pointing_game(p, m))
            up = _upsample(p, m.shape) >= 0.5
            dices.append(2 * float((up & m).sum()) / max(float(up.sum() + m.sum()), 1.0))
    return float(np.mean(hits)), float(np.mean(dices))


def _upsample(p, shape):
    return upsample(p, shape)


def _freeze_leading(loc, train_layers: int | None) -> list:
    """With ``--train-layers N``: the encoder's blocks before its last N, frozen (as the classifier's)."""
    if train_layers is None:
        return []
    frozen = list(loc.blocks)[: max(len(loc.blocks) - train_layers, 0)]
    for block in frozen:
        block.requires_grad_(False)
    return frozen


def _freeze_bn(loc) -> None:
    from torch import nn

    for m in loc.blocks.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_localiser(trunk, model_config, config, records, cache, train_idx, val_idx, *, device: str = "cpu",
                    progress: bool = False):
    """Train a localiser on the masked ``records``; (its checkpoint payload, problems), or (None, problems)
    when no training image has a non-empty mask.

    Args:
        trunk: the backbone's trunk with its initial (ImageNet) weights: the encoder starts as a copy.
        model_config: the model's ``ModelConfig`` (input size, crop, window, normalisation).
        config: the ``TrainConfig`` (epochs, batch size, lr, seed, flips).
        records, cache: the decoded training records and their uint8 images (N, 3, S, S).
        train_idx, val_idx: the classifier's split.
    """
    import torch

    size = model_config.input_size
    masks, has, problems = lesion_masks(records, size, crop=model_config.crop, window=model_config.window)
    listed = torch.tensor([bool((r.metadata or {}).get("mask")) for r in records])
    train_idx = [i for i in train_idx if bool(listed[i])]  # an image without a mask column value is unknown
    val_idx = [i for i in val_idx if bool(listed[i])]
    if not any(bool(has[i]) for i in train_idx):
        return None, problems
    t0 = time.monotonic()
    loc = models_localiser.build_localiser(trunk, size).to(device)
    pretrained = config.weights == "imagenet"
    lr = 1e-3 if config.lr is None else float(config.lr)
    frozen = _freeze_leading(loc, config.train_layers)
    encoder = [p for p in loc.encoder_parameters() if p.requires_grad]
    groups = [g for g in ({"params": encoder, "lr": lr * ENCODER_LR_FACTOR if pretrained else lr},
                          {"params": list(loc.decoder.parameters()) + list(loc.head.parameters()), "lr": lr})
              if g["params"]]
    normalise, loss_fn = normaliser(model_config), _loss_fn()
    data = Augmented(cache[train_idx], [0] * len(train_idx), make_augmentation(True, config.flip),
                     masks[train_idx], has[train_idx])
    history, best = _fit(loc, data, groups, loss_fn, normalise, config, device, (pretrained, frozen), progress,
                         (cache[val_idx], masks[val_idx], has[val_idx]))
    payload = models_localiser.localiser_payload(
        loc, masks=int(has[train_idx].sum()), val_pointing_game=best[0], val_dice=best[1], epochs_run=len(history),
        seconds=round(time.monotonic() - t0, 1), mean_mask=torch.from_numpy(mean_mask(masks[train_idx], has[train_idx])),
        loss="BCE + Dice (smp DiceLoss, binary)")
    return payload, problems


def _fit(loc, data, groups, loss_fn, normalise, config, device, modes, progress, val):
    """The epochs; loads the best epoch's weights into ``loc``: (history, (val pointing game, val Dice))."""
    import torch
    from tqdm import tqdm

    history, best_key, best_state, best = [], None, None, (None, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        loader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(config.seed),
                                             drop_last=len(data) % config.batch_size == 1 and len(data) > 1)
        optimiser = torch.optim.AdamW(groups, weight_decay=0.01)
        schedule = lr_schedule(optimiser, 0, max(len(loader), 1) * config.epochs)
        for epoch in range(1, config.epochs + 1):
            loc.train()
            if modes[0]:
                _freeze_bn(loc)
            for block in modes[1]:
                block.eval()
            total = seen = 0
            for xb, _, mb, _ in tqdm(loader, desc=f"localiser epoch {epoch}/{config.epochs}", leave=False,
                                     disable=not progress):
                loss = loss_fn(loc(normalise(xb, device)), mb.to(device=device, dtype=torch.float32))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total, seen = total + loss.item() * len(xb), seen + len(xb)
            pg, dice = _validate(loc, *val, normalise, device, config.batch_size)
            history.append({"epoch": epoch, "loss": total / max(seen, 1), "val_pointing_game": pg, "val_dice": dice})
            if progress:
                tqdm.write(f"localiser epoch {epoch}/{config.epochs}: loss {total / max(seen, 1):.4f}"
                           + (f", val pointing game {pg:.3f}, val Dice {dice:.3f}" if pg is not None else ""))
            key = (pg, dice) if pg is not None else (epoch, 0)
            if best_key is None or key > best_key:
                best_key, best = key, (pg, dice)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in loc.state_dict().items()}
    loc.load_state_dict(best_state)
    return history, best
