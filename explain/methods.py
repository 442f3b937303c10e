"""The explanation methods cbr offers: pytorch-grad-cam classes and captum attributions."""

# One table, name -> pytorch-grad-cam class name. Importing grad-cam imports torch, which takes
# seconds, so the names (the CLI's --explain choices) are listed from here and the classes are
# imported on first use of CAM_METHODS.
_CLASS_NAMES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
# Attribution methods (explain.attribution), name -> captum class name: they explain the whole
# model from its input pixels, so they need no target layer; their parameters are in explain.spec.
ATTRIBUTION_METHODS = {
    "lime": "Lime",
    "kernelshap": "KernelShap",
    "deeplift": "DeepLift",
    "integrated-gradients": "IntegratedGradients",
    "occlusion": "Occlusion",
}
# Multi-layer methods (explain.fusion), name -> the CAM method computed at each of the trunk's
# last three stages; the stages' normalised maps are averaged (Jiang et al., 2021).
FUSED_METHODS = {"layercam-fused": "layercam"}
# Every --explain choice: the CAM methods, the fused ones, then the attribution methods.
METHOD_NAMES = tuple(_CLASS_NAMES) + tuple(FUSED_METHODS) + tuple(ATTRIBUTION_METHODS)


def __getattr__(name):
    # CAM_METHODS: name -> grad-cam class, the registry; built once, on first access.
    if name == "CAM_METHODS":
        import pytorch_grad_cam

        registry = {key: getattr(pytorch_grad_cam, cls) for key, cls in _CLASS_NAMES.items()}
        globals()["CAM_METHODS"] = registry
        return registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Methods whose map depends only on the target layer's activations and their gradients,
# so explain.cam.maps_from_activations can compute them from the trunk output alone.
# Score-CAM is excluded: it runs the whole model on masked copies of the input image.
FAST_METHODS = frozenset({"gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"})


class UnknownMethodError(ValueError):
    """A method name that is not in CAM_METHODS (or, for check_method, in METHOD_NAMES)."""


def is_attribution(spec):
    """True for an attribution method's name or stored spec ("lime", "lime(n=200,seg=slic50)")."""
    from .spec import base_name

    return base_name(spec) in ATTRIBUTION_METHODS


def check_method(spec):
    """Return `spec`'s registry name; raise UnknownMethodError naming the choices if it has none.

    Example:
        >>> check_method("lime(n=100,seg=slic50)")
        'lime'
    """
    from .spec import base_name

    name = base_name(spec) if isinstance(spec, str) else spec
    if name not in METHOD_NAMES:
        raise UnknownMethodError(f"unknown explanation method {spec!r}; choose from {', '.join(METHOD_NAMES)}")
    return name


def get_cam_method(name):
    """Return the grad-cam class registered as `name`.

    Example:
        >>> get_cam_method("gradcam").__name__
        'GradCAM'
    """
    if not isinstance(name, str) or name not in _CLASS_NAMES:
        raise UnknownMethodError(f"unknown CAM method {name!r}; choose from {', '.join(_CLASS_NAMES)}")
    return __getattr__("CAM_METHODS")[name]
