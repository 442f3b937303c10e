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

from .methods import METHODS, SPEC_PATTERN, base_name, is_attribution
from .superpixels import resolve_segmentation

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
        capped = METHODS[method].budget if method in METHODS else None
        if capped == "stride":  # occlusion: the positions, not one count, must fit the budget
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
        if budget is not None and capped is not None:
            return dataclasses.replace(s, **{capped: min(getattr(s, capped), budget)})
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
    params = METHODS[method].parameters if method in METHODS else {}
    if not all(getattr(s, f) for f in params.values()):  # 0: "derive from the input size"
        raise ValueError(f"resolve the {method} settings ({' and '.join(params.values())}) before labelling them")
    label = f"{method}({','.join(f'{key}={_format(s, f)}' for key, f in params.items())})" if params else method
    if len(label) > MAX_SPEC_LENGTH:
        raise ValueError(f"method spec {label!r} is longer than {MAX_SPEC_LENGTH} characters")
    return label


_SEG = re.compile(r"^([a-z]+)(\d+)$")


def _format(settings: AttributionSettings, field: str) -> str:
    # Superpixels are recorded with the segmentation that made them: "slic50".
    value = getattr(settings, field)
    return f"{settings.segmentation}{value}" if field == "segments" else str(value)


def _parse(field: str, value: str) -> dict:
    if field == "segments":
        match = _SEG.match(value)
        if not match:
            raise ValueError
        return {"segmentation": match.group(1), "segments": int(match.group(2))}
    return {field: int(value)}


def parse_spec(spec: str, defaults: AttributionSettings | None = None) -> tuple[str, AttributionSettings]:
    """Inverse of spec_label: (registry name, settings); a bare name keeps `defaults`.

    Example:
        >>> parse_spec("occlusion(w=16,s=8)")[1].window
        16
    """
    settings = defaults or AttributionSettings()
    match = SPEC_PATTERN.match(str(spec))
    if not match:
        raise ValueError(f"cannot read method spec {spec!r}; write name or name(key=value,...)")
    name, body = match.group(1), match.group(2)
    if not body:
        return name, settings
    params = METHODS[name].parameters if name in METHODS else {}
    changes = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        try:
            changes.update(_parse(params[key], value))
        except (KeyError, ValueError):
            raise ValueError(f"unknown parameter {item!r} in method spec {spec!r}") from None
    return name, dataclasses.replace(settings, **changes)


def concrete_settings(name: str, settings: AttributionSettings, input_size: int, budget: int | None = None):
    """`settings` resolved for `name` on inputs of `input_size` within `budget`, with the
    segmentation that will actually run (SLIC falls back to a grid without scikit-image)."""
    settings = settings.resolved(name, int(input_size), budget)
    if "segments" in METHODS[name].parameters.values():
        settings = dataclasses.replace(settings, segmentation=resolve_segmentation(settings.segmentation))
    return settings


def resolve_spec(method: str, input_size: int, budget: int | None = None) -> str:
    """The concrete spec `method` (a name or a spec) will run and record on inputs of `input_size`.

    CAM names come back unchanged. Example:
        >>> resolve_spec("occlusion", 224, budget=100)
        'occlusion(w=28,s=22)'
    """
    name, settings = parse_spec(method)
    if not is_attribution(name):
        return method
    return spec_label(name, concrete_settings(name, settings, input_size, budget))
