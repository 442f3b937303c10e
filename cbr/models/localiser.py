"""The lesion localiser: a segmentation head on the model's own backbone (``cbr train`` with masks).

Decisions:

* **Encoder.** A copy of the model's trunk, initialised from the backbone's ImageNet weights (the
  ones the classifier started from; nothing is downloaded), read at every resolution it passes
  through: the last block at each stride is a skip (``taps``), the finest at stride 4 (stride 2
  costs a 4x larger decoder for little gain on lesions of a few percent of the image). Any trunk
  whose blocks give ``(B, C, h, w)`` fits, torchvision's and tinycnn alike. A ``timm:`` CNN's
  blocks are the modules timm's own feature extractor runs (``FeatureListNet``, which smp's "tu-"
  encoders wrap), made over our copy of the model rather than built by name, so its weights are
  the backbone's; a ViT's tokens are refused by name.
* **Decoder.** segmentation-models-pytorch's U-Net decoder blocks (upsample to the skip's size,
  concatenate, two 3x3 conv-BN-ReLU), light (at most 96 channels), and its segmentation head:
  one logit per pixel at the finest skip's resolution. smp's own ``Unet`` expects five stages at
  strides 2..32, which not every registry trunk has (tinycnn stops at stride 8), hence the blocks.
* **What a map is.** The sigmoid of the logits: the probability that a pixel is lesion, in the
  model's view of the image (its crop, then letterbox), like every other map cbr shows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cbr.errors import CbrError

__all__ = ["Localiser", "build_localiser", "localiser_payload", "load_localiser", "localiser_problem",
           "DECODER_CHANNELS", "MIN_STRIDE"]

DECODER_CHANNELS = (96, 64, 32, 16)  # decoder widths, deepest first (as many as there are skips)
MIN_STRIDE = 4  # the finest skip's stride (when the trunk has one that fine)
MAX_TAPS = 5


TOKENS = ("this backbone gives tokens, not image-shaped features (a vision transformer); the lesion localiser "
          "needs a convolutional backbone (mobilenet_v2, resnet, efficientnet, timm:resnet50, ...)")


def trunk_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's blocks in order, plain ``nn.Sequential`` containers opened; a timm model's
    (``cbr.models.timm_models.TimmFeatures``) as timm's own feature extractor runs them."""
    model = getattr(trunk, "model", None)
    if hasattr(model, "feature_info") and hasattr(model, "forward_features"):
        if getattr(trunk, "reshape", None) is not None:  # a ViT's tokens, read as a grid for CAMs only
            raise CbrError(TOKENS)
        return _timm_blocks(model)
    out = []
    for child in trunk.children():
        out.extend(trunk_blocks(child) if type(child) is nn.Sequential else [child])
    return out or [trunk]


def _timm_blocks(model: nn.Module) -> list[nn.Module]:
    """A timm CNN's modules in order, up to its deepest feature stage: the modules of timm's
    ``FeatureListNet`` (what ``features_only=True`` and smp's "tu-" encoders build), made here over
    the model itself, so that the encoder starts from the backbone's own weights, not a download.
    timm flattens stage containers for most CNNs (EfficientNet, ConvNeXt), not for some (ResNet)."""
    from timm.models import FeatureListNet

    stages = tuple(range(len(model.feature_info)))
    for flatten in (True, False):
        try:
            return list(FeatureListNet(model, out_indices=stages, flatten_sequential=flatten).children())
        except (AssertionError, KeyError, ValueError):  # timm's "return layers are not present"
            continue
    raise CbrError("this timm backbone's feature stages cannot be run in order by timm's feature extractor; "
                   "the lesion localiser needs a backbone that can (mobilenet_v2, resnet, efficientnet, ...)")


def _taps(blocks, size: int) -> tuple[list[int], list[int]]:
    """(indexes of the blocks whose outputs are skips, their channels): the last block at each
    resolution, at most ``MAX_TAPS``, none finer than ``MIN_STRIDE`` when a coarser one exists."""
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        # on the blocks' own device: a trunk built for cuda is probed there
        device = next((p.device for b in blocks for p in b.parameters()), torch.device("cpu"))
        h = torch.zeros(1, 3, size, size, device=device)
        for i, b in enumerate(blocks):
            try:
                h = b(h)
            except (RuntimeError, TypeError) as e:  # a model whose forward is more than its blocks in turn
                raise CbrError(f"this backbone's blocks cannot be run one after another ({type(e).__name__}); the "
                               "lesion localiser needs a backbone that can (mobilenet_v2, resnet, efficientnet, ...)"
                               ) from None
            if not isinstance(h, torch.Tensor) or h.dim() != 4:
                raise CbrError("this backbone's blocks do not give image-shaped features; the lesion localiser "
                               "needs a convolutional backbone (mobilenet_v2, resnet, efficientnet, ...)")
            last[h.shape[-1]] = (i, h.shape[1])
    by_size = sorted(last.items(), reverse=True)  # finest first
    coarse = [(w, t) for w, t in by_size if size / w >= MIN_STRIDE]
    kept = (coarse if coarse else by_size[-1:])[-MAX_TAPS:]
    return [t[0] for _, t in kept], [t[1] for _, t in kept]


def localiser_problem(trunk: nn.Module, input_size: int) -> str | None:
    """Why ``trunk`` cannot carry a localiser (one line, e.g. a ViT's tokens), or None when it can;
    the same probe pass the localiser makes, before any training is spent."""
    was = trunk.training
    trunk.eval()  # the probe pass must not move BatchNorm statistics
    try:
        _taps(trunk_blocks(trunk), input_size)
    except CbrError as e:
        return str(e)
    finally:
        trunk.train(was)
    return None


class Localiser(nn.Module):
    """Trunk blocks up to the deepest skip, a light U-Net decoder, one logit per pixel."""

    def __init__(self, trunk: nn.Module, input_size: int):
        super().__init__()
        from segmentation_models_pytorch.base.heads import SegmentationHead
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock

        blocks = trunk_blocks(trunk)
        was = trunk.training
        trunk.eval()  # the probe pass must not move BatchNorm statistics
        self.taps, channels = _taps(blocks, input_size)
        trunk.train(was)
        self.input_size = input_size
        self.blocks = nn.ModuleList(blocks[: self.taps[-1] + 1])
        widths = DECODER_CHANNELS[-(len(self.taps) - 1):] if len(self.taps) > 1 else ()
        decoder, c_in = [], channels[-1]
        for width, skip in zip(widths, reversed(channels[:-1])):
            decoder.append(UnetDecoderBlock(c_in, skip, width))
            c_in = width
        self.decoder = nn.ModuleList(decoder)
        self.head = SegmentationHead(c_in, 1, kernel_size=3)
        self.mean_mask = None  # the training masks' mean (set when loaded from a checkpoint)

    def encoder_parameters(self):
        return self.blocks.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, h, w)`` at the finest skip's resolution for a preprocessed batch."""
        feats, h, wanted = [], x, set(self.taps)
        for i, b in enumerate(self.blocks):
            h = b(h)
            if i in wanted:
                feats.append(h)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            y = block(y, skip.shape[-2], skip.shape[-1], skip)
        return self.head(y)

    def probabilities(self, x: torch.Tensor):
        """Per-pixel lesion probabilities ``(B, h, w)`` as float32 numpy (no gradients)."""
        was = self.training
        self.eval()
        with torch.no_grad():
            p = torch.sigmoid(self(x.float())).squeeze(1).cpu().numpy()
        self.train(was)
        return p


def build_localiser(trunk: nn.Module, input_size: int) -> Localiser:
    """A new localiser whose encoder is a copy of ``trunk`` (its weights as they are now)."""
    return Localiser(copy.deepcopy(trunk), input_size)


def localiser_payload(loc: Localiser, **figures) -> dict:
    """What a checkpoint keeps of a trained localiser: its weights, geometry and figures."""
    return {"state_dict": {k: v.detach().cpu().contiguous() for k, v in loc.state_dict().items()},
            "input_size": int(loc.input_size), "taps": [int(t) for t in loc.taps], **figures}


def load_localiser(payload, trunk: nn.Module, path) -> Localiser | None:
    """The localiser a checkpoint carries (``payload``: its ``localiser`` entry), its encoder
    shaped like ``trunk``; None when the checkpoint has none. CbrError when it does not fit."""
    if not payload:
        return None
    try:
        loc = Localiser(copy.deepcopy(trunk), int(payload["input_size"]))
        if loc.taps != list(payload["taps"]):
            raise ValueError(f"skips {payload['taps']} do not match this backbone's {loc.taps}")
        loc.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CbrError(f"{path}: its lesion localiser does not fit its model ({str(e)[:120]}); train it again "
                       "with cbr train") from None
    mean = payload.get("mean_mask")
    # the training masks' mean map: the "mean mask" guess every localisation figure is shown beside
    loc.mean_mask = None if mean is None else mean.float().numpy()
    return loc.eval()
