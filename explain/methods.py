"""The explanation methods cbr offers, in one table: pytorch-grad-cam CAMs, their multi-layer
fusion, and captum attributions.

Every other list of methods (the CLI's --explain choices, the fast path's weightings, the stored
spec's parameters) is derived from ``METHODS``. Light: importing grad-cam or captum imports torch,
which takes seconds, so the table names their classes and they are imported on first use.
"""

import re
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "MethodSpec", "METHODS", "METHOD_NAMES", "CAM_NAMES", "FAST_METHODS", "FUSED_METHODS", "ATTRIBUTION_METHODS",
    "UnknownMethodError", "SPEC_PATTERN", "base_name", "is_attribution", "check_method", "get_cam_method",
]

CAM, FUSED, ATTRIBUTION = "cam", "fused", "attribution"


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method.

    kind: ``cam`` (pytorch-grad-cam at one target layer), ``fused`` (a CAM method at the trunk's
        last three stages, the stages' normalised maps averaged; Jiang et al., 2021) or
        ``attribution`` (captum, from the input pixels: no target layer; explain.attribution).
    implementation: the grad-cam class, the CAM method computed at each stage, or the captum class.
    weighting: the function of explain.weighting that computes the map from the target layer's
        activations and gradients alone (explain.cam.maps_from_activations), or None for a method
        without that fast path (Score-CAM runs the whole model on masked copies of the input).
    uses_gradients: whether the fast path needs a backward pass (Eigen-CAM reads activations only).
    parameters: the stored spec's keys -> the explain.spec.AttributionSettings field each records.
    budget: the AttributionSettings field a budget of forward evaluations caps, if any.
    """

    kind: str
    implementation: str
    weighting: str | None = None
    uses_gradients: bool = True
    parameters: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    budget: str | None = None

    @property
    def fast_path(self) -> bool:
        return self.weighting is not None


def _params(**keys) -> MappingProxyType:
    return MappingProxyType(keys)


# The order is the CLI's --explain order: CAM methods, fused ones, then attributions.
METHODS = MappingProxyType({
    "gradcam": MethodSpec(CAM, "GradCAM", "gradcam"),
    "gradcam++": MethodSpec(CAM, "GradCAMPlusPlus", "gradcam_plusplus"),
    "hirescam": MethodSpec(CAM, "HiResCAM", "hirescam"),
    "xgradcam": MethodSpec(CAM, "XGradCAM", "xgradcam"),
    "layercam": MethodSpec(CAM, "LayerCAM", "layercam"),
    "eigencam": MethodSpec(CAM, "EigenCAM", "eigencam", uses_gradients=False),
    "scorecam": MethodSpec(CAM, "ScoreCAM"),
    "layercam-fused": MethodSpec(FUSED, "layercam"),
    "lime": MethodSpec(ATTRIBUTION, "Lime", parameters=_params(n="samples", seg="segments"), budget="samples"),
    "kernelshap": MethodSpec(ATTRIBUTION, "KernelShap", parameters=_params(n="samples", seg="segments"),
                             budget="samples"),
    "deeplift": MethodSpec(ATTRIBUTION, "DeepLift"),
    "integrated-gradients": MethodSpec(ATTRIBUTION, "IntegratedGradients", parameters=_params(n="steps"),
                                       budget="steps"),
    "occlusion": MethodSpec(ATTRIBUTION, "Occlusion", parameters=_params(w="window", s="stride"), budget="stride"),
})


def _of_kind(kind):
    return MappingProxyType({name: m.implementation for name, m in METHODS.items() if m.kind == kind})


# Views of METHODS.
METHOD_NAMES = tuple(METHODS)  # every --explain choice
CAM_NAMES = _of_kind(CAM)  # name -> grad-cam class name
FUSED_METHODS = _of_kind(FUSED)  # name -> the CAM method computed at each stage
ATTRIBUTION_METHODS = _of_kind(ATTRIBUTION)  # name -> captum class name
FAST_METHODS = frozenset(name for name, m in METHODS.items() if m.fast_path)


def __getattr__(name):
    # CAM_METHODS: name -> grad-cam class, built once, on first access.
    if name == "CAM_METHODS":
        import pytorch_grad_cam

        registry = {key: getattr(pytorch_grad_cam, cls) for key, cls in CAM_NAMES.items()}
        globals()["CAM_METHODS"] = registry
        return registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnknownMethodError(ValueError):
    """A method name that is not in CAM_METHODS (or, for check_method, in METHODS)."""


# A stored spec: the registry name, then its parameters in brackets ("occlusion(w=28,s=14)").
SPEC_PATTERN = re.compile(r"^([a-z0-9+\-]+)(?:\((.*)\))?$")


def base_name(spec: str) -> str:
    """The registry name of a stored spec: "lime(n=200,seg=slic50)" -> "lime"."""
    match = SPEC_PATTERN.match(str(spec))
    return match.group(1) if match else str(spec)


def is_attribution(spec):
    """True for an attribution method's name or stored spec ("lime", "lime(n=200,seg=slic50)")."""
    method = METHODS.get(base_name(spec))
    return method is not None and method.kind == ATTRIBUTION


def check_method(spec):
    """Return `spec`'s registry name; raise UnknownMethodError naming the choices if it has none.

    Example:
        >>> check_method("lime(n=100,seg=slic50)")
        'lime'
    """
    name = base_name(spec) if isinstance(spec, str) else spec
    if name not in METHODS:
        raise UnknownMethodError(f"unknown explanation method {spec!r}; choose from {', '.join(METHOD_NAMES)}")
    return name


def get_cam_method(name):
    """Return the grad-cam class registered as `name`.

    Example:
        >>> get_cam_method("gradcam").__name__
        'GradCAM'
    """
    if not isinstance(name, str) or name not in CAM_NAMES:
        raise UnknownMethodError(f"unknown CAM method {name!r}; choose from {', '.join(CAM_NAMES)}")
    return __getattr__("CAM_METHODS")[name]
