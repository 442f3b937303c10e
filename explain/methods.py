"""The CAM methods cbr offers: one registry of pytorch-grad-cam classes."""

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
METHOD_NAMES = tuple(_CLASS_NAMES)


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
    """A CAM method name that is not in CAM_METHODS."""


def get_cam_method(name):
    """Return the grad-cam class registered as `name`.

    Example:
        >>> get_cam_method("gradcam").__name__
        'GradCAM'
    """
    if not isinstance(name, str) or name not in _CLASS_NAMES:
        raise UnknownMethodError(f"unknown CAM method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return __getattr__("CAM_METHODS")[name]
