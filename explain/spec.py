"""A method spec: a registry name plus the parameters it ran with, as stored with every map.

CAM methods have no parameters here, so their spec is the bare name ("gradcam"). Attribution
methods record what decides their cost and their result, e.g. "lime(n=200,seg=slic50)",
"integrated-gradients(n=32)", "occlusion(w=28,s=14)". The spec fits the case base's 32-character
method column, and parse_spec turns it back into the settings that computed the map, so a stored
map can be recomputed exactly. Light: no torch.
"""

import dataclasses
import math
import re
from dataclasses import dataclass

__all__ = ["AttributionSettings", "spec_label", "parse_spec", "resolve_spec", "concrete_settings", "base_name", "MAX_SPEC_LENGTH"]

MAX_SPEC_LENGTH = 32  # the width of explanations.method


@dataclass(frozen=True)
class AttributionSettings:
    """The parameters of the captum methods (explain.attribution); each reads only its own.

    Every method's baseline ("removed" pixels) is 0 in the network's normalised input, i.e. the
    normalisation mean colour: a flat grey image for ImageNet statistics.
    """

    samples: int = 200  # lime, kernelshap: perturbed images fitted per map (its forward passes)
    segments: int = 50  # lime, kernelshap: superpixels asked for (the features switched on/off)
    segmentation: str = "slic"  # lime, kernelshap: "slic" (scikit-image) or "grid"
    steps: int = 32  # integrated-gradients: Gauss-Legendre steps from baseline to image
    window: int = 0  # occlusion: side of the square grey patch in pixels; 0 = input side / 8
    stride: int = 0  # occlusion: step between patch positions; 0 = window / 2
    resolution: int = 56  # stored map side: pixel maps are average-pooled to at most this
    batch_size: int = 32  # images per forward pass
    seed: int = 0  # lime, kernelshap: seed of the random perturbations (the same map every run)

    def resolved(self, method: str, input_size: int, budget: int | None = None) -> "AttributionSettings":
        """Concrete settings for `method` on square inputs of `input_size`, within `budget`.

        The budget caps the forward evaluations of one map: lime/kernelshap samples, integrated-
        gradients steps, and occlusion positions (the stride grows until the positions fit).
        DeepLIFT costs one pass whatever the budget.
        """
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        s = self
        if method == "occlusion":
            window = s.window or max(1, input_size // 8)
            window = min(window, input_size)
            stride = s.stride or max(1, window // 2)
            if budget is not None:
                per_side = max(1, math.isqrt(budget))
                if _positions(input_size, window, stride) > per_side:
                    stride = math.ceil(input_size / per_side)
                    # Windows at least as wide as their stride: every pixel gets covered.
                    window = min(max(window, stride), input_size)
            return dataclasses.replace(s, window=window, stride=stride)
        if budget is not None and method in ("lime", "kernelshap"):
            return dataclasses.replace(s, samples=min(s.samples, budget))
        if budget is not None and method == "integrated-gradients":
            return dataclasses.replace(s, steps=min(s.steps, budget))
        return s


def _positions(size: int, window: int, stride: int) -> int:
    return (size - window) // stride + 1


def spec_label(method: str, settings: AttributionSettings | None = None) -> str:
    """The stored spec of `method` run with `settings` (resolved first: see AttributionSettings.resolved).

    Example:
        >>> spec_label("lime", AttributionSettings(samples=100))
        'lime(n=100,seg=slic50)'
    """
    s = settings or AttributionSettings()
    if method in ("lime", "kernelshap"):
        label = f"{method}(n={s.samples},seg={s.segmentation}{s.segments})"
    elif method == "integrated-gradients":
        label = f"{method}(n={s.steps})"
    elif method == "occlusion":
        if not (s.window and s.stride):
            raise ValueError("resolve the occlusion settings (window and stride) before labelling them")
        label = f"{method}(w={s.window},s={s.stride})"
    else:
        label = method
    if len(label) > MAX_SPEC_LENGTH:
        raise ValueError(f"method spec {label!r} is longer than {MAX_SPEC_LENGTH} characters")
    return label


_SPEC = re.compile(r"^([a-z0-9+\-]+)(?:\((.*)\))?$")
_SEG = re.compile(r"^([a-z]+)(\d+)$")


def base_name(spec: str) -> str:
    """The registry name of a spec: "lime(n=200,seg=slic50)" -> "lime"."""
    match = _SPEC.match(str(spec))
    return match.group(1) if match else str(spec)


def parse_spec(spec: str, defaults: AttributionSettings | None = None) -> tuple[str, AttributionSettings]:
    """Inverse of spec_label: (registry name, settings); a bare name keeps `defaults`.

    Example:
        >>> parse_spec("occlusion(w=16,s=8)")[1].window
        16
    """
    settings = defaults or AttributionSettings()
    match = _SPEC.match(str(spec))
    if not match:
        raise ValueError(f"cannot read method spec {spec!r}; write name or name(key=value,...)")
    name, body = match.group(1), match.group(2)
    if not body:
        return name, settings
    changes = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key == "n" and name in ("lime", "kernelshap"):
            changes["samples"] = int(value)
        elif key == "n" and name == "integrated-gradients":
            changes["steps"] = int(value)
        elif key == "seg" and _SEG.match(value):
            kind, count = _SEG.match(value).groups()
            changes.update(segmentation=kind, segments=int(count))
        elif key == "w" and name == "occlusion":
            changes["window"] = int(value)
        elif key == "s" and name == "occlusion":
            changes["stride"] = int(value)
        else:
            raise ValueError(f"unknown parameter {item!r} in method spec {spec!r}")
    return name, dataclasses.replace(settings, **changes)


def concrete_settings(name: str, settings: AttributionSettings, input_size: int, budget: int | None = None):
    """`settings` resolved for `name` on inputs of `input_size` within `budget`, with the
    segmentation that will actually run (SLIC falls back to a grid without scikit-image)."""
    settings = settings.resolved(name, int(input_size), budget)
    if name in ("lime", "kernelshap"):
        from .superpixels import resolve_segmentation

        settings = dataclasses.replace(settings, segmentation=resolve_segmentation(settings.segmentation))
    return settings


def resolve_spec(method: str, input_size: int, budget: int | None = None) -> str:
    """The concrete spec `method` (a name or a spec) will run and record on inputs of `input_size`.

    CAM names come back unchanged. Example:
        >>> resolve_spec("occlusion", 224, budget=100)
        'occlusion(w=28,s=22)'
    """
    name, settings = parse_spec(method)
    if name not in ("lime", "kernelshap", "deeplift", "integrated-gradients", "occlusion"):
        return method
    return spec_label(name, concrete_settings(name, settings, input_size, budget))
