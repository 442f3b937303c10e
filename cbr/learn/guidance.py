"""Mask-guided fine-tuning (``cbr train --mask-guidance W``): a loss on where the class map points.

For every training image with a lesion mask the loss adds ``W x`` the share of its class map's
mass that lies outside the lesion; images without a mask (or with an empty one) add only the
classification loss, so masks may cover part of the training set.

Decisions:

* **Which map.** The one cbr shows: LayerCAM (Jiang et al., 2021) of the true class at the
  model's CAM layer (the trunk's last block unless the model names another), computed
  differentiably in the training forward pass: ``relu(sum_c relu(dy/dA_c) * A_c)``, the
  gradient taken with ``create_graph=True``. Penalising the map the reviewer will see, rather
  than input gradients, is GAIN's choice (Li et al., 2018: guide the attention map itself);
  penalising attribution *outside* an expert annotation, and only where there is one, is
  "right for the right reasons" (Ross et al., 2017), whose input-gradient penalty would cost a
  double backward through the whole trunk. For a pooled linear head the gradient at the last
  block is nearly constant, so the map costs one small extra backward through the head.
* **Scale.** Each map is divided by its mass, so the term is a share in [0, 1] (0: all of the map
  inside the lesion) whatever the activations' magnitude, and ``W`` means the same for every
  backbone. The mask is letterboxed like the image, given the same random flip and affine warp
  (:class:`cbr.learn.augmentation.Augmented`), then averaged down to the map's cells, so a
  cell half inside the lesion counts half.
* **Per image.** The penalties are summed over the masked images and divided by the batch size:
  each masked image's loss is its classification loss plus ``W`` x its outside share.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from cbr.data.dataset import Problem
from cbr.data.mask import lesion_mask
from cbr.learn.config import TrainError

__all__ = ["GUIDANCE", "check_guidance", "guided_logits", "layercam", "lesion_masks", "outside_share",
           "guidance_penalty"]

LOG = logging.getLogger(__name__)

# What the loss is, in words (stored in checkpoints).
GUIDANCE = "share of the true class's LayerCAM mass outside the lesion mask (CAM layer, per masked image)"
_EPS = 1e-6  # a map with no mass at all has no share outside


def check_guidance(weight: float, records, what: str) -> int:
    """The number of ``records`` with a mask; TrainError when guidance is asked for and none has one."""
    n = sum(1 for r in records if (r.metadata or {}).get("mask"))
    if weight > 0 and n == 0:
        raise TrainError(f"--mask-guidance {weight:g}: {what} has no 'mask' column (no image has a lesion mask); "
                         "add a 'mask' column of mask image paths to the manifest, or drop --mask-guidance")
    return n


def lesion_masks(records, size: int, *, crop: str = "none", window: str = "auto"):
    """Every record's lesion mask in the model's view of its image (cut to the model's ``crop`` of
    the image, decoded with ``window``, then letterboxed to ``size``): (uint8 tensor (N, 1, S, S)
    of 0/1, bool tensor (N,) of which have a non-empty mask, problems for unreadable masks)."""
    import torch

    masks = torch.zeros((len(records), 1, size, size), dtype=torch.uint8)
    has = torch.zeros(len(records), dtype=torch.bool)
    problems = []
    for i, r in enumerate(records):
        path = (r.metadata or {}).get("mask")
        if not path:
            continue
        try:
            m = lesion_mask(path, size, crop=crop, image=r.path, window=window)
        except OSError as e:
            problems.append(Problem(path, f"mask unreadable ({e}); the image trains without guidance", skipped=False))
            continue
        if m.any():  # an empty mask says "no lesion": nothing to point at
            masks[i, 0] = torch.from_numpy(m.astype("uint8"))
            has[i] = True
    return masks, has, problems


@contextmanager
def _captured(module):
    """The output of ``module`` in the next forward pass, kept in the graph (a list filled by a hook)."""
    import torch

    seen = []

    def hook(_module, _inputs, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            # A frozen trunk: the map still depends on the head, whose weights guidance can move.
            output = output.detach().requires_grad_()
        seen.append(output)
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def guided_logits(model, x):
    """One training forward pass: (logits (B, K), the CAM layer's activations (B, C, h, w) in its graph)."""
    with _captured(model.target_module()) as seen:
        logits = model.logits(x)
    return logits, seen[-1]


def layercam(acts, logits, targets, create_graph: bool = True):
    """LayerCAM maps (B, h, w) of the ``targets`` classes, differentiable when ``create_graph``."""
    import torch

    score = logits.float().gather(1, targets.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph)
    return torch.relu((torch.relu(grads) * acts).sum(1))


def outside_share(cams, masks):
    """Share (B,) of each map's mass outside its mask; masks (B, 1, S, S) of 0/1 at any size."""
    import torch.nn.functional as F

    inside = F.adaptive_avg_pool2d(masks.float(), cams.shape[-2:])[:, 0]
    cams = cams.float()
    return (cams * (1 - inside)).flatten(1).sum(1) / (cams.flatten(1).sum(1) + _EPS)


def guidance_penalty(model, x, y, masks, has):
    """(logits, penalty): the forward pass and the mean over the batch of each masked image's
    outside share (0 for images without a mask); ``x`` is the normalised batch."""
    logits, acts = guided_logits(model, x)
    has = has.to(logits.device)
    if not bool(has.any()):
        return logits, logits.new_zeros(())
    cams = layercam(acts, logits, y)
    share = outside_share(cams[has], masks.to(logits.device)[has])
    return logits, share.sum() / len(y)
