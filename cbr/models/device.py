"""Where models run: the one place that picks a torch device (train, evaluation, the embedder)."""

from __future__ import annotations

from cbr.errors import CbrError

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(CbrError):
    """The device asked for is not usable on this machine."""


def resolve_device(device: str | None = None) -> str:
    """The device to use: ``device`` if it is usable here, else ``"cuda"`` when a GPU is, else ``"cpu"``.

    Args:
        device: ``None`` (pick), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        DeviceError: a CUDA device was asked for on a machine without CUDA.

    Example:
        >>> resolve_device()  # "cuda" on a GPU machine
        'cpu'
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return str(device)
