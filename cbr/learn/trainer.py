"""The optimisation loop of ``cbr train``: which blocks learn, at what rate, and when to stop.

See :mod:`cbr.learn.train` for the decisions (class weights, validation, optimiser, partial
fine-tuning, BatchNorm, reproducibility).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
from tqdm import tqdm

from cbr.learn.metrics import accuracy, balanced_accuracy
from cbr.learn.config import HEAD_LR, TrainConfig
from cbr.learn.feature_cache import FeatureDraws, as_float, bypass, cached_features
from cbr.learn.guidance import guidance_penalty
from cbr.learn.objective import LossSettings, get_objective
from cbr.learn.sampling import get_sampler

__all__ = ["Trainer", "trunk_stages"]

BACKBONE_LR_FACTOR = 0.1  # pretrained backbone lr = head lr x this
WEIGHT_DECAY = 0.01
FREEZE_BN_BELOW = 16  # pretrained BatchNorm statistics stay frozen for smaller batches


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


def lr_schedule(optimiser, warm: int, steps: int):
    """The learning-rate schedule of ``steps`` optimiser steps: a cosine decay from the optimiser's
    rates to 0, multiplied during the first ``warm`` steps by a linear warm-up from 1/warm to 1
    (the new head's first gradients are large and random: they would shake the pretrained trunk).

    Step t's factor is min(1, (t + 1) / warm) * (1 + cos(pi t / steps)) / 2. The two schedules act
    at once (chained), not one after the other, so the warm-up ends on the cosine curve.
    """
    import torch

    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=0.0)
    if warm <= 1:  # a one-step warm-up starts at the full rate: nothing to warm
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimiser, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1)
    return torch.optim.lr_scheduler.ChainedScheduler([warmup, cosine])


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


class Trainer:
    """The optimisation loop of one training run: epochs, validation, early stopping."""

    def __init__(self, model, config: TrainConfig, device: str, class_names, class_weight, progress: bool):
        self.model, self.config, self.device = model, config, device
        self.class_names, self.class_weight, self.progress = class_names, class_weight, progress
        self.normalise = _normaliser(model.config, device)
        self.pretrained = config.weights == "imagenet"
        self.freeze_bn = self.pretrained and config.batch_size < FREEZE_BN_BELOW
        self.frozen = _freeze_leading(model, config.train_layers)
        self.head_lr = HEAD_LR if config.lr is None else float(config.lr)
        self.objective, self.sampler = get_objective(config.objective), get_sampler(config.sampler)
        # a balanced sampler has already equalised the classes: weighting the loss too would correct twice
        self.loss_settings = LossSettings(class_weight if self.sampler.weighted_loss else None, config.label_smoothing)

    def fit(self, train_set, val_images, val_targets) -> tuple[list[dict], int, int]:
        """Train; leave the kept epoch's weights in the model (``config.keep``: the last epoch's, or
        the best on validation); (history, kept epoch, best epoch)."""
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
                train_set = self._cached(train_set)
                if isinstance(train_set, FeatureDraws):  # the validation images' frozen features, once
                    val_images = cached_features(self.model, self.frozen, val_images, self.normalise,
                                                 cfg.batch_size)
                loader = torch.utils.data.DataLoader(
                    train_set, batch_size=cfg.batch_size, num_workers=0,
                    **self.sampler.loader_options(train_set.targets, torch.Generator().manual_seed(cfg.seed)),
                    drop_last=n_train % cfg.batch_size == 1 and n_train > 1,
                )
                steps = max(len(loader), 1) * cfg.epochs
                optimiser = torch.optim.AdamW(_param_groups(self.model, self.head_lr, self.pretrained),
                                              weight_decay=WEIGHT_DECAY)
                warm = max(len(loader), 1) * min(cfg.warmup_epochs, cfg.epochs)
                schedule = lr_schedule(optimiser, warm, steps)
                for epoch in range(1, cfg.epochs + 1):
                    row, key = self._epoch(epoch, loader, optimiser, schedule, val_images, val_targets)
                    history.append(row)
                    if best_key is None or key > best_key:
                        best_key, best_epoch, stale = key, epoch, 0
                        if cfg.keep == "best":
                            best_state = {k: v.detach().to("cpu", copy=True)
                                          for k, v in self.model.state_dict().items()}
                    else:
                        stale += 1
                        if cfg.patience and stale >= cfg.patience:
                            self._say(f"early stop: no better validation balanced accuracy for {cfg.patience} epoch(s)")
                            break
        finally:
            np.random.set_state(np_state)
        kept = len(history)
        if best_state is not None:
            self.model.load_state_dict(best_state)
            kept = best_epoch
        self.model.eval()
        return history, kept, best_epoch

    def _cached(self, train_set):
        """With ``cache_draws`` and frozen blocks: the training set as cached frozen features
        (cbr.learn.feature_cache); mask guidance needs the pixels, so it keeps ``train_set``."""
        if not self.config.cache_draws or not self.frozen or getattr(train_set, "masks", None) is not None:
            return train_set
        t0 = time.monotonic()
        cached = FeatureDraws(self.model, self.frozen, train_set, self.config.cache_draws, self.normalise,
                              self.config.batch_size)
        self._say(f"cached the {len(self.frozen)} frozen blocks' features of {len(cached)} images x "
                  f"{cached.draws} draw(s) in {time.monotonic() - t0:.1f} s")
        return cached

    def _epoch(self, epoch, loader, optimiser, schedule, val_images, val_targets) -> tuple[dict, tuple]:
        """One pass over the training part, then the validation figures: (history row, ranking key)."""
        te = time.monotonic()
        _set_train_mode(self.model, self.freeze_bn, self.frozen)
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.config.epochs}", unit="batch", disable=not self.progress,
                   leave=False)
        guided = 0.0  # summed mask-guidance penalties (cbr.learn.guidance), per image
        cached = isinstance(loader.dataset, FeatureDraws)  # batches are the frozen blocks' output
        if cached:
            loader.dataset.set_epoch(epoch)
        with bypass(self.frozen) if cached else contextlib.nullcontext():
            for xb, yb, *masks in bar:
                x = as_float(self.device)(xb) if cached else self.normalise(xb)
                y = yb.to(self.device)
                logits, penalty = guidance_penalty(self.model, x, y, *masks) if masks else (None, None)
                loss = self.objective(self.model, x, y, self.loss_settings, logits=logits)
                if penalty is not None:
                    loss = loss + self.config.mask_guidance * penalty
                    guided += penalty.item() * len(y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(y)
                seen += len(y)
                bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        bar.close()
        row = {"epoch": epoch, "loss": total / max(seen, 1), "lr": optimiser.param_groups[-1]["lr"]}
        if self.config.mask_guidance:
            row["guidance"] = guided / max(seen, 1)  # mean outside-lesion share of the map (0 without a mask)
        if val_targets:
            with bypass(self.frozen) if cached else contextlib.nullcontext():
                val_loss, pred = _evaluate(self.model, val_images, val_targets,
                                           as_float(self.device) if cached else self.normalise, self.class_weight,
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
            tqdm.write(line)


def _epoch_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}"
    if row.get("val_balanced_accuracy") is not None:
        line += (f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.3f}, "
                 f"val balanced accuracy {row['val_balanced_accuracy']:.3f}")
    return line + f" ({row['seconds']:.1f} s)"
