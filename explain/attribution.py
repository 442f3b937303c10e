"""Perturbation and gradient attributions through captum, for any target callable.

The model maps an image batch to one 1-D output per sample (the un-normalised embedding or the
class logits), as for explain.cam.maps_from_images. The targets are explain.targets callables:
ClassTarget picks a logit, SimilarityTarget returns the cosine to another image's embedding.
Captum only ever sees a forward function that returns one column per distinct target, and each
image's `target` is its column, so every captum method explains a similarity unchanged.

Methods and their parameters (explain.spec.AttributionSettings):

* ``lime``: captum's Lime over superpixels (explain.superpixels: SLIC, or a grid); ``samples``
  random on/off patterns of the ``segments`` superpixels, "off" being the baseline; a ridge
  regression (alpha 1, as the original LIME) weighted by captum's default exponential kernel
  on the cosine distance to the image. One weight per superpixel.
* ``kernelshap``: captum's KernelShap on the same superpixels and ``samples``; Shapley-kernel
  weighted linear regression, so the weights sum to f(image) - f(baseline).
* ``deeplift``: captum's DeepLift (rescale rule) from the baseline; one forward and backward pass.
* ``integrated-gradients``: captum's IntegratedGradients, ``steps`` Gauss-Legendre steps from the
  baseline to the image.
* ``occlusion``: captum's Occlusion: a ``window``-pixel grey square slid with ``stride``; a pixel
  gets the mean score drop of the windows covering it.

The baseline is 0 in the normalised input: the normalisation mean colour. A raw map is the
channel sum of the attribution (per-pixel methods) or the value of the pixel's superpixel/window
(the others), kept where positive (the evidence *for* the target, as a CAM keeps it after its
ReLU), then average-pooled to at most ``resolution`` x ``resolution``: (B, r, r) float32.
"""

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .spec import AttributionSettings, concrete_settings, parse_spec, spec_label
from .superpixels import segment

__all__ = ["attribution_maps", "AttributionSettings", "ScoreModel", "map_resolution"]

# Lime's interpretable model: the original LIME fits sklearn's Ridge(alpha=1).
LIME_RIDGE_ALPHA = 1.0


class ScoreModel(nn.Module):
    """image batch -> (B, T): each distinct target's score on each image; counts its images.

    A module (not a bare function) so that DeepLift can hook the model's layers.
    """

    def __init__(self, model, targets):
        super().__init__()
        self.model = model
        self.targets = []
        self.columns = []
        for target in targets:
            for j, seen in enumerate(self.targets):
                if seen is target:
                    self.columns.append(j)
                    break
            else:
                self.columns.append(len(self.targets))
                self.targets.append(target)
        self.evaluations = 0

    def forward(self, x):
        self.evaluations += int(x.shape[0])
        output = self.model(x)
        return torch.stack([target(output) for target in self.targets], dim=1)


def map_resolution(input_size, settings=None):
    """Side of the stored map for square inputs of `input_size`."""
    settings = settings or AttributionSettings()
    return max(1, min(int(settings.resolution), int(input_size)))


def _pool(pixel_maps, settings):
    """(B, H, W) signed pixel attributions -> (B, r, r) float32 positive evidence."""
    positive = pixel_maps.detach().to("cpu", torch.float32).clamp_min(0)
    height, width = positive.shape[-2:]
    size = (min(settings.resolution, height), min(settings.resolution, width))
    pooled = F.adaptive_avg_pool2d(positive.unsqueeze(1), size).squeeze(1)
    return torch.nan_to_num(pooled, nan=0.0, posinf=0.0, neginf=0.0).numpy()


@contextlib.contextmanager
def _seeded(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _superpixel_method(captum_cls, scores, image, column, settings):
    from captum._utils.models.linear_model import SkLearnRidge

    labels = torch.from_numpy(segment(image, settings.segments, settings.segmentation)).to(image.device)
    kw = {"interpretable_model": SkLearnRidge(alpha=LIME_RIDGE_ALPHA)} if captum_cls.__name__ == "Lime" else {}
    method = captum_cls(scores, **kw)
    with _seeded(settings.seed):
        attr = method.attribute(image.unsqueeze(0), baselines=0.0, target=column,
                                feature_mask=labels.view(1, 1, *labels.shape),
                                n_samples=settings.samples, perturbations_per_eval=settings.batch_size)
    # Every channel of a superpixel carries its one weight.
    return attr[:, 0]


def _one_map(name, scores, image, column, settings):
    from captum import attr as captum_attr

    x = image.unsqueeze(0)
    if name == "lime":
        return _superpixel_method(captum_attr.Lime, scores, image, column, settings)
    if name == "kernelshap":
        return _superpixel_method(captum_attr.KernelShap, scores, image, column, settings)
    if name == "integrated-gradients":
        ig = captum_attr.IntegratedGradients(scores)
        return ig.attribute(x, baselines=0.0, target=column, n_steps=settings.steps,
                            internal_batch_size=settings.batch_size).sum(dim=1)
    if name == "deeplift":
        return captum_attr.DeepLift(scores).attribute(x, baselines=0.0, target=column).sum(dim=1)
    if name == "occlusion":
        channels = x.shape[1]
        occlusion = captum_attr.Occlusion(scores)
        attr = occlusion.attribute(x, sliding_window_shapes=(channels, settings.window, settings.window),
                                   strides=(channels, settings.stride, settings.stride), baselines=0.0,
                                   target=column, perturbations_per_eval=settings.batch_size)
        return attr[:, 0]
    raise ValueError(f"unknown attribution method {name!r}")


def _no_inplace(model):
    """Turn off in-place activations (DeepLift's hooks cannot rewrite an in-place output);
    returns the modules changed, to restore them."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    return changed


def attribution_maps(model, images, targets, method, *, settings=None, budget=None, progress=None):
    """Raw attribution maps of a batch, one image at a time.

    Args:
        model: image batch -> one 1-D output per sample (embedding or logits), in eval mode.
        images: (B, C, H, W) normalised tensor (square).
        targets: one explain.targets callable per image (ClassTarget, SimilarityTarget, ...).
        method: a name of explain.methods.ATTRIBUTION_METHODS, or a stored spec such as
            "lime(n=100,seg=slic50)" (its parameters override `settings`).
        settings: AttributionSettings; defaults documented there.
        budget: cap on the forward evaluations of each map (see AttributionSettings.resolved).
        progress: called as progress(maps_done, maps_total, evaluations_so_far) after each map.

    Returns:
        (maps, spec): (B, r, r) float32 non-negative raw maps, r = map_resolution(H), and the
        spec string that records the parameters actually used ("lime(n=100,seg=slic50)").

    Example:
        >>> model = nn.Sequential(embedder.trunk, embedder.neck)
        >>> maps, spec = attribution_maps(model, x, [SimilarityTarget(e_other)] * len(x), "lime")
    """
    name, settings = parse_spec(method, settings)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    targets = list(targets)
    if len(targets) != images.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {images.shape[0]}; pass one per sample")
    settings = concrete_settings(name, settings, int(images.shape[-1]), budget)
    spec = spec_label(name, settings)
    scores = ScoreModel(model, targets)
    device = next((p.device for p in model.parameters()), images.device)
    changed = _no_inplace(model) if name == "deeplift" else []
    out = []
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            # captum announces its hooks and that it set requires_grad itself: both expected.
            warnings.filterwarnings("ignore", message=r"(?s).*(hooks and attributes|did not already require)")
            for i, column in enumerate(scores.columns):
                image = images[i].detach().clone().to(device)
                out.append(_pool(_one_map(name, scores, image, column, settings), settings))
                if progress is not None:
                    progress(i + 1, len(targets), scores.evaluations)
    finally:
        for m in changed:
            m.inplace = True
        model.zero_grad(set_to_none=True)
    return np.concatenate(out, axis=0).astype(np.float32), spec
