"""Raw low-resolution CAM maps: a fast path from the trunk's activations, and grad-cam's hooks.

The fast path weights the channels as pytorch-grad-cam does (explain.weighting, tested equal)
without importing it; the hooked path runs grad-cam's own method classes on the whole model.

A model is split into `trunk` (image -> last conv block activations, (B, C, h, w)) and `head`
(activations -> one 1-D output per sample: the un-normalised embedding or the class logits).
A *raw map* is the CAM at the target layer's resolution (h, w) after grad-cam's ReLU, before any
upsampling or min-max normalisation, as float32: raw maps of different images share one scale.

Both functions expect the model in eval mode (batch norm and dropout in training mode would mix
the samples of a batch); grad-cam's hooked path also switches the model to eval itself.
"""

import numpy as np

from .methods import FAST_METHODS, get_cam_method
from .rawmap import decode_map, encode_map
from .weighting import CAM_WEIGHTING, USES_GRADIENTS

__all__ = ["maps_from_activations", "maps_from_images", "encode_map", "decode_map", "SCORECAM_BATCH_SIZE"]

# Score-CAM runs the model on this many masked copies of one image at a time.
SCORECAM_BATCH_SIZE = 32


def _numpy(tensor):
    import torch

    return tensor.detach().to("cpu", torch.float32).numpy()


def _check_targets(targets, batch_size):
    targets = list(targets)
    if len(targets) != batch_size:
        # grad-cam zips targets with outputs and would silently drop the extra samples.
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size}; pass one per sample")
    return targets


def _relu32(cam):
    return np.maximum(np.asarray(cam, dtype=np.float32), 0)


def maps_from_activations(head, activations, targets, method="gradcam", reshape=None):
    """Raw maps at the trunk output, back-propagating through `head` only (the fast path).

    The caller has run the trunk without autograd. Each sample's score depends only on its own
    activations, so one batched backward of the summed scores gives every sample's map: a query
    and its neighbours are explained in one pass, and the backbone is never traversed.

    Args:
        head: module mapping activations (B, C, h, w) to one 1-D output per sample.
        activations: trunk output, a (B, C, h, w) tensor (or what `reshape` turns into one).
        targets: one target callable per sample (see explain.targets).
        method: a name in FAST_METHODS.
        reshape: None, or a callable turning activations (and their gradients, of the same
            shape) into (B, C, h, w): a vision transformer's tokens (B, N, C) into the patch grid,
            its class and register tokens dropped. `head` still receives the raw activations.

    Returns:
        (B, h, w) float32 array of non-negative raw maps.

    Example:
        >>> with torch.no_grad():
        ...     acts = trunk(images)
        >>> maps = maps_from_activations(neck, acts, [EmbeddingNormTarget()] * len(acts))
    """
    import torch

    if method not in FAST_METHODS:
        get_cam_method(method)  # an unknown name raises, naming the choices
        raise ValueError(
            f"CAM method {method!r} needs the whole model, not only the head; "
            f"use maps_from_images, or one of {', '.join(sorted(FAST_METHODS))}"
        )
    grid = activations if reshape is None else reshape(activations)
    if grid.ndim != 4:
        raise ValueError(f"activations must be (B, C, h, w), got shape {tuple(grid.shape)}; "
                         "pass reshape= for token activations")
    targets = _check_targets(targets, activations.shape[0])
    if not targets:
        return np.zeros((0, *grid.shape[2:]), dtype=np.float32)

    grads = None
    if method in USES_GRADIENTS:
        # inference_mode(False) + clone: the trunk may have run under torch.inference_mode, whose
        # tensors can never require grad.
        with torch.inference_mode(False), torch.enable_grad():
            acts = activations.detach().clone().requires_grad_()
            outputs = head(acts)
            score = sum(target(output) for target, output in zip(targets, outputs))
            # Gradients w.r.t. the activations only: no parameter .grad is touched.
            (grad,) = torch.autograd.grad(score, acts)
        grads = _numpy(grad if reshape is None else reshape(grad))
    # grad-cam's own weighting, without importing grad-cam (explain.weighting).
    return _relu32(CAM_WEIGHTING[method](_numpy(grid), grads))


def maps_from_images(model, target_layer, images, targets, method="gradcam", reshape=None):
    """Raw maps at any layer, for any method, through grad-cam's hooks (the reference path).

    This is grad-cam's BaseCAM.forward without its final scale_cam_image (which upsamples and
    min-max normalises each map, losing the raw magnitude).

    Args:
        model: the whole model, image -> one 1-D output per sample, e.g.
            nn.Sequential(trunk, head). Grad-cam switches it to eval mode.
        target_layer: the sub-module whose output is explained.
        images: (B, C, H, W) tensor.
        targets: one target callable per sample.
        method: any name in CAM_METHODS.
        reshape: None, or grad-cam's reshape_transform: the layer's output (and its gradient)
            -> (B, C, h, w), e.g. a vision transformer's tokens -> the patch grid.

    Returns:
        (B, h, w) float32 array of non-negative raw maps, (h, w) being the layer's resolution.

    Example:
        >>> model = nn.Sequential(trunk, neck)
        >>> maps = maps_from_images(model, trunk, images, targets, method="scorecam")
    """
    import torch

    cls = get_cam_method(method)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    targets = _check_targets(targets, images.shape[0])
    error = None
    with torch.inference_mode(False), torch.enable_grad():
        # The context manager removes grad-cam's hooks however we leave it.
        with cls(model=model, target_layers=[target_layer], reshape_transform=reshape) as cam:
            try:
                maps = _hooked_maps(cam, model, target_layer, images, targets)
            except IndexError as exc:
                # BaseCAM.__exit__ prints and swallows IndexError (e.g. a class index out of
                # range); keep it and raise it once the hooks are released.
                error = exc
    if error is not None:
        raise error
    return maps


def _hooked_maps(cam, model, target_layer, images, targets):
    hooks = cam.activations_and_grads
    x = images.to(cam.device)
    if cam.uses_gradients:
        # As grad-cam's compute_input_gradient: the target layer's output then requires grad
        # even when the model's parameters are frozen, so its gradient hook fires.
        x = x.detach().clone().requires_grad_()
    outputs = hooks(x)
    grads = None
    if cam.uses_gradients:
        model.zero_grad(set_to_none=True)
        loss = sum(target(output) for target, output in zip(targets, outputs))
        loss.backward()
        # backward also filled the parameters' .grad; free them now.
        model.zero_grad(set_to_none=True)
        if not hooks.gradients:
            raise ValueError("no gradient reached target_layer; is it on the path to the output?")
        grads = _numpy(hooks.gradients[0])
    if not hooks.activations:
        raise ValueError("target_layer produced no activations; is it part of model's forward?")
    acts = _numpy(hooks.activations[0])
    del outputs

    from pytorch_grad_cam import ScoreCAM

    if isinstance(cam, ScoreCAM):
        # Score-CAM builds all B x C masked copies of the input at once; one image at a time
        # bounds that to C copies.
        cam.batch_size = SCORECAM_BATCH_SIZE
        raws = [
            cam.get_cam_image(x[i : i + 1], target_layer, targets[i : i + 1], acts[i : i + 1],
                              None, eigen_smooth=False)
            for i in range(len(targets))
        ]
        return _relu32(np.concatenate(raws, axis=0))
    raw = cam.get_cam_image(x, target_layer, targets, acts, grads, eigen_smooth=False)
    return _relu32(raw)
