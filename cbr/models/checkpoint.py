"""Checkpoints: a model with its config and fingerprint, loadable with ``weights_only=True``.

The file format only: writing one, and reading one back as a checked config and its tensors.
``cbr.models.embedder.load_checkpoint`` builds the model from what ``read_checkpoint`` returns.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from cbr.data.text import text_problem
from cbr.errors import CbrError, NotFoundError
from cbr.files import atomic_open
from cbr.models.backbones import BACKBONES, TIMM_FORM, backbone_spec, is_timm
from cbr.models.config import ModelConfig

__all__ = ["save_checkpoint", "read_checkpoint", "CheckpointError", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


class CheckpointError(CbrError):
    """A file is not a cbr checkpoint we can load."""


def _check_primitive(value, where: str) -> None:
    import torch

    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_primitive(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_primitive(v, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        raise TypeError(f"{where}: {type(value).__name__} cannot be loaded with weights_only=True")


def save_checkpoint(embedder, path, *, train_sha256=(), extra: dict | None = None,
                    localiser: dict | None = None) -> str:
    """Write ``embedder`` atomically to ``path`` as a ``weights_only``-loadable dict; returns its fingerprint.

    Args:
        embedder: the ``Embedder`` to save.
        path: destination file; its folder must exist.
        train_sha256: sha256 of the training images, so a case base can tell what a model has seen.
        extra: more primitive values (str/int/float/bool/None/tensors, in dicts and lists).
        localiser: the lesion localiser trained with the model (``cbr.models.localiser.localiser_payload``);
            it is not part of the fingerprint: the embeddings do not depend on it.
    """
    import torch

    path = Path(path)
    fingerprint = embedder.compute_fingerprint()
    embedder._fingerprint = fingerprint
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(embedder.config.to_dict(), weights="checkpoint"),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in embedder.state_dict().items()},
        "fingerprint": fingerprint,
        "train_sha256": [str(s) for s in train_sha256],
        "extra": dict(extra or {}),
    }
    _check_primitive(payload["extra"], "extra")
    if localiser is not None:
        _check_primitive(localiser, "localiser")
        payload["localiser"] = localiser
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return fingerprint


_REQUIRED = ("config", "state_dict", "fingerprint")
MAX_INPUT_SIZE = 4096  # a larger network input is a crafted file, not a model


def _fail(path, field: str, value, want: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{path}: its model config has {field} = {shown}; expected {want}. "
                           "The file was altered or was not written by cbr train")


def _int_field(raw: dict, key: str, path, lo: int, hi: int) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, key, v, f"a whole number from {lo} to {hi}")
    return v


def _triple(raw: dict, key: str, path, *, positive: bool) -> tuple[float, float, float]:
    v = raw.get(key)
    want = "3 finite numbers" + (" above 0" if positive else "")
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise _fail(path, key, v, want)
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
            raise _fail(path, key, v, want)
    return tuple(float(x) for x in v)


def _checked_config(raw, path) -> ModelConfig:
    """A checkpoint's model config, validated as strictly as a new model's (a crafted file gives
    one line naming the bad field, never a traceback from deep inside torch)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its model config is a {type(raw).__name__}, not a mapping; the file was "
                              "altered or was not written by cbr train")
    backbone = raw.get("backbone")
    if not isinstance(backbone, str) or (backbone not in BACKBONES and not is_timm(backbone)):
        raise CheckpointError(f"{path}: backbone {backbone!r} is not known to this version of cbr; "
                              f"choose from {', '.join(sorted(BACKBONES))} or {TIMM_FORM}")
    spec = backbone_spec(backbone)  # timm:<model>: needs timm (the error names the extra)
    size = _int_field(raw, "input_size", path, spec.min_input_size, MAX_INPUT_SIZE)
    _int_field(raw, "embedding_dim", path, 1, 1 << 16)
    if "seed" in raw:
        _int_field(raw, "seed", path, -(1 << 63), (1 << 63) - 1)
    mean, std = _triple(raw, "mean", path, positive=False), _triple(raw, "std", path, positive=True)
    for key in ("weights", "target_layer", "window"):
        if key in raw and not isinstance(raw[key], str):
            raise _fail(path, key, raw[key], "text")
    names = raw.get("class_names", [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise _fail(path, "class_names", names, "a list of non-empty class names")
    bad = next((text_problem(n, "a class name") for n in names if text_problem(n, "a class name")), None)
    if bad or len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        why = bad or "repeated: " + ", ".join(dupes)
        raise _fail(path, "class_names", names, f"unique class names without control characters ({why})")
    try:
        return dataclasses.replace(ModelConfig.from_dict(raw), input_size=size, mean=mean, std=std)
    except TypeError as e:
        raise CheckpointError(f"{path}: invalid model config ({e}); the file was altered or was not written by "
                              "cbr train") from None


def read_checkpoint(path) -> tuple[ModelConfig, dict, str, dict]:
    """Read a ``save_checkpoint`` file, checked field by field; the model is not built here.

    Args:
        path: the checkpoint file.

    Returns:
        (its ModelConfig as saved, its state dict, its fingerprint, the rest: ``train_sha256``,
        ``extra``, ...). A missing file raises NotFoundError; anything else CheckpointError.
    """
    import torch

    path = Path(path)
    expected = "a cbr model checkpoint written by save_checkpoint (cbr train)"
    if not path.is_file():
        raise NotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF, unsupported types: all mean "not our file"
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__}); expected {expected}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        got = f"keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: got {got}; expected {expected}")
    saved = _checked_config(ckpt["config"], path)
    rest = {k: v for k, v in ckpt.items() if k not in ("config", "state_dict", "fingerprint")}
    rest.setdefault("train_sha256", [])
    rest.setdefault("extra", {})
    return saved, ckpt["state_dict"], ckpt["fingerprint"], rest
