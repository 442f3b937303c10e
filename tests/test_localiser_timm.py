"""The lesion localiser on timm backbones (``timm:<name>``): a CNN's stages, run as timm's own feature
extractor runs them, are its encoder, starting from the backbone's weights (nothing downloaded); a
token model (ViT) is refused by name. Every model here is ``weights="none"``."""

import json

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the optional extra cbr[timm]; `make test` installs it (dev extra)")

from cbr.models.embedder import create_embedder  # noqa: E402
from cbr.models.localiser import build_localiser, load_localiser, localiser_payload, localiser_problem  # noqa: E402
from conftest import invoke  # noqa: E402


def _same_values(encoder: dict, trunk: dict) -> bool:
    """Every encoder tensor equals a tensor of the trunk (the names differ: timm flattens them)."""
    pool = [v for v in trunk.values() if v.dtype.is_floating_point]
    return all(any(t.shape == v.shape and torch.equal(t, v) for t in pool)
               for v in encoder.values() if v.dtype.is_floating_point and v.numel() > 1)


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:efficientnet_b0"])
def test_a_timm_cnn_carries_a_localiser_started_from_its_own_weights(name):
    emb = create_embedder(name, weights="none", input_size=64, seed=3)
    trunk = emb.trunk
    assert localiser_problem(trunk, 64) is None
    loc = build_localiser(trunk, 64)
    assert _same_values(loc.blocks.state_dict(), trunk.state_dict())
    assert not {id(p) for p in loc.parameters()} & {id(p) for p in trunk.parameters()}  # a copy, not shared
    loc.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        out = loc(x)
        assert out.shape == (2, 1, 16, 16)  # the finest skip at stride 4
        again = load_localiser(localiser_payload(loc), trunk, "model.pt")(x)
    assert torch.equal(out, again)  # the checkpoint's localiser is the trained one


def test_a_vit_is_refused_by_name(runner, phantom_set):
    trunk = create_embedder("timm:vit_tiny_patch16_224", weights="none", input_size=64).trunk
    problem = localiser_problem(trunk, 64)
    assert problem is not None and "convolutional backbone" in problem and "tokens" in problem
    result = invoke(runner, "train", phantom_set, "--backbone", "timm:vit_tiny_patch16_224", "--weights", "none",
                    "--img-size", "64", "--epochs", "1", "--workers", "0", "--localiser", "--out", "never.pt")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--localiser" in result.output and "convolutional backbone" in result.output
    assert "--no-localiser" in result.output


@pytest.mark.slow
def test_cbr_train_on_a_timm_cnn_with_masks_trains_its_localiser(runner, phantom_set, tmp_path):
    result = invoke(runner, "train", phantom_set, "--backbone", "timm:resnet18", "--weights", "none", "--img-size", "64",
                    "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", tmp_path / "m.pt", "--json")
    assert result.exit_code == 0, result.output
    loc = json.loads(result.output)["localiser"]
    assert loc is not None and loc["masks"] > 0 and loc["epochs_run"] == 1
