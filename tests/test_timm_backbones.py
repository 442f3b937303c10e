"""timm backbones (``timm:<name>``, the extra ``cbr[timm]``) on random weights: embeddings, CAMs
(a ViT's tokens read as its patch grid), the CLI round trip, and one-line errors for a missing
timm or a bad name. Nothing is downloaded: every model here is ``weights="none"``."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the optional extra cbr[timm]; `make test` installs it (dev extra)")

from cbr.models.backbones import backbone_spec  # noqa: E402
from cbr.models.checkpoint import save_checkpoint  # noqa: E402
from cbr.models.embedder import create_embedder, load_checkpoint  # noqa: E402
from cbr.models.maps import compute_maps  # noqa: E402
from cbr.errors import CbrError  # noqa: E402
from cbr.models.timm_models import TokenGrid  # noqa: E402
from conftest import invoke  # noqa: E402
from explain.targets import EmbeddingNormTarget, SimilarityTarget  # noqa: E402

# (name, input side, CAM grid side): small inputs keep the tests fast. Inception-ResNet-v2's
# unpadded convolutions need 139 px for a 3 x 3 map (75 px gives 1 x 1, which cannot vary).
MODELS = [
    ("timm:resnet18", 64, 2),
    ("timm:efficientnet_b0", 64, 2),
    ("timm:inception_resnet_v2", 139, 3),
    ("timm:vit_tiny_patch16_224", 64, 4),  # 64 / 16 patches a side
]
_CACHE = {}


def _model(name, size):
    if name not in _CACHE:
        _CACHE[name] = create_embedder(name, weights="none", input_size=size, seed=1)
    return _CACHE[name]


def _images(size, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("name,size,grid", MODELS)
def test_embedding_shape_norm_and_preprocessing(name, size, grid):
    emb = _model(name, size)
    with torch.device("meta"):  # its config and sizes, without initialising weights
        model = timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert emb.config.mean == tuple(cfg["mean"]) and emb.config.std == tuple(cfg["std"])
    assert backbone_spec(name).input_size == cfg["input_size"][-1]
    with torch.no_grad():
        e = emb(_images(size))
    assert e.shape == (3, model.num_features) == (3, emb.config.embedding_dim)
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert not torch.allclose(e[0], e[1])  # different images, different embeddings


@pytest.mark.slow
@pytest.mark.parametrize("name,size,grid", MODELS)
def test_cam_map_has_the_grid_shape_and_varies(name, size, grid):
    emb = _model(name, size)
    x = _images(size)
    with torch.no_grad():
        acts, e = emb.cam_features(x)
    targets = [SimilarityTarget(e[(i + 1) % 3].numpy()) for i in range(3)]
    maps = compute_maps(emb, x, acts, targets, False, emb.config.cam_method)
    assert maps.shape == (3, grid, grid)
    assert np.isfinite(maps).all()
    for m in maps:
        assert m.max() > m.min()  # not constant: the target's gradient reaches every location


def test_vit_tokens_become_the_patch_grid():
    emb = _model("timm:vit_tiny_patch16_224", 64)
    assert emb.reshape.prefix == 1 and emb.reshape.grid == (4, 4)
    # The final norm's class-token pooling sends no gradient to the patch tokens: that layer's maps
    # are all zero, which is why a ViT's default CAM layer is the last block's norm1.
    assert emb.config.target_layer == "model.blocks.11.norm1"
    x = _images(64, 2)
    with torch.no_grad():
        acts, _ = emb.cam_features(x)
    assert acts.shape == (2, 17, 192)  # tokens: 1 class token + 16 patches
    assert emb.grid(acts).shape == (2, 192, 4, 4)
    at_norm = create_embedder("timm:vit_tiny_patch16_224", weights="none", input_size=64, seed=1, target_layer="")
    zero = compute_maps(at_norm, x, acts, [EmbeddingNormTarget()] * 2, False, "gradcam")
    assert zero.shape == (2, 4, 4) and not zero.any()
    maps = compute_maps(emb, x, acts, [EmbeddingNormTarget()] * 2, False, "gradcam")
    assert maps.shape == (2, 4, 4) and maps.any()


def test_token_grid_drops_prefix_tokens_in_row_order():
    h, w, c = 2, 3, 4
    patches = torch.arange(h * w * c, dtype=torch.float32).view(1, h * w, c)
    tokens = torch.cat([torch.full((1, 1, c), -1.0), patches], dim=1)  # a class token first
    grid = TokenGrid(1, (h, w))(tokens)
    assert grid.shape == (1, c, h, w)
    for i in range(h):
        for j in range(w):
            assert torch.equal(grid[0, :, i, j], patches[0, i * w + j])
    assert torch.equal(TokenGrid(1, (h, w))(patches), grid)  # no prefix: the grid as it is
    conv = torch.randn(1, c, h, w)
    assert TokenGrid(1, (h, w))(conv) is conv  # a patch-embedding conv's output is a grid already
    with pytest.raises(ValueError, match="tokens"):
        TokenGrid(1, (h, w))(tokens[:, :4])
    nhwc = torch.randn(1, h, w, c)  # Swin's features
    assert torch.equal(TokenGrid(0, (0, 0), nhwc=True)(nhwc), nhwc.permute(0, 3, 1, 2))


@pytest.mark.slow
def test_vit_checkpoint_round_trip(tmp_path):
    emb = create_embedder("timm:vit_tiny_patch16_224", weights="none", input_size=32, class_names=("a", "b"))
    save_checkpoint(emb, tmp_path / "vit.pt")
    back, _ = load_checkpoint(tmp_path / "vit.pt")
    assert back.config.backbone == "timm:vit_tiny_patch16_224" and back.fingerprint == emb.fingerprint
    assert back.reshape.grid == (2, 2)
    x = _images(32, 2)
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), emb(x).numpy(), rtol=1e-5, atol=1e-6)


def test_timm_parameters_are_counted_once():
    emb = _model("timm:resnet18", 64)
    assert not list(emb.neck.parameters())  # the head's layers live in the trunk's model
    assert all(k.startswith("trunk.model.") for k in emb.state_dict())


@pytest.mark.slow
def test_index_then_query_round_trip(runner, phantom_set, query_set, tmp_path):
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, "--model", "timm:resnet18", "--weights", "none",
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   18" in result.output
    with open(query_set, newline="") as fh:
        image = query_set.parent / next(csv.DictReader(fh))["path"]
    result = invoke(runner, "query", image, "--db", db, "-k", 3, "--json", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert len(answer["neighbours"]) == 3 and answer["prediction"]["label"]
    assert answer["explanation"].endswith("query.jpg")


@pytest.mark.slow
def test_train_accepts_a_timm_backbone(runner, phantom_set, tmp_path):
    out = tmp_path / "m.pt"
    result = invoke(runner, "train", phantom_set, "--backbone", "timm:resnet18", "--weights", "none",
                    "--epochs", 1, "--img-size", 48, "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "Trained timm:resnet18 (none weights)" in result.output
    emb, _ = load_checkpoint(out)
    assert emb.config.backbone == "timm:resnet18" and emb.config.input_size == 48


@pytest.mark.slow
def test_a_vit_checkpoint_indexes_and_answers_with_maps(runner, phantom_set, query_set, tmp_path):
    """The query's maps (region matching and CAMs) read the ViT's tokens as its patch grid."""
    out, db = tmp_path / "vit.pt", tmp_path / "cases.db"
    result = invoke(runner, "train", phantom_set, "--backbone", "timm:vit_tiny_patch16_224", "--weights", "none",
                    "--epochs", 1, "--img-size", 32, "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "index", phantom_set, "--db", db, "--model", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    with open(query_set, newline="") as fh:
        image = query_set.parent / next(csv.DictReader(fh))["path"]
    result = invoke(runner, "query", image, "--db", db, "-k", 2, "--json", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert len(answer["neighbours"]) == 2 and all(n["explanation"] for n in answer["neighbours"])


@pytest.mark.slow
def test_a_vit_trains_without_the_localiser_unless_it_is_asked_for(runner, phantom_set, tmp_path):
    """The phantoms have lesion masks: by default a ViT (no image-shaped blocks) trains without the
    localiser and says so once; an explicit --localiser is a one-line error."""
    args = ["train", phantom_set, "--backbone", "timm:vit_tiny_patch16_224", "--weights", "none", "--epochs", 1,
            "--img-size", 32, "--workers", "0"]
    result = invoke(runner, *args, "--out", tmp_path / "a.pt")
    assert result.exit_code == 0, result.output
    assert result.output.count("localiser:    none (this backbone gives tokens, not image-shaped features (a vision "
                               "transformer)") == 1
    result = invoke(runner, *args, "--out", tmp_path / "b.pt", "--localiser")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --localiser: this backbone gives tokens, not image-shaped features")
    assert result.output.count("\n") == 1 and not (tmp_path / "b.pt").exists()


def test_models_lists_the_timm_form(runner):
    result = invoke(runner, "models")
    assert result.exit_code == 0
    assert "timm:<name>" in result.output and "timm is installed" in result.output
    info = json.loads(invoke(runner, "models", "--json").output)
    assert info["timm"] == {"form": "timm:<name>", "installed": True, "install": "pip install 'cbr[timm]'"}


@pytest.mark.parametrize("command", ["index", "train"])
def test_a_bad_timm_name_is_one_line(runner, phantom_set, tmp_path, command):
    option = "--model" if command == "index" else "--backbone"
    result = invoke(runner, command, phantom_set, option, "timm:not_a_model", "--weights", "none",
                    *(["--db", tmp_path / "c.db"] if command == "index" else ["--out", tmp_path / "m.pt"]))
    assert result.exit_code == 1
    assert result.output == "Error: unknown timm model 'not_a_model'; see timm.list_models()\n"


@pytest.mark.parametrize("command", ["index", "train"])
def test_missing_timm_names_the_extra(runner, phantom_set, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    monkeypatch.delitem(sys.modules, "cbr.models.timm_models")  # imported afresh, as without timm
    option = "--model" if command == "index" else "--backbone"
    result = invoke(runner, command, phantom_set, option, "timm:resnet18", "--weights", "none",
                    *(["--db", tmp_path / "c.db"] if command == "index" else ["--out", tmp_path / "m.pt"]))
    assert result.exit_code == 1
    assert result.output == ("Error: timm backbones need the timm package; install it with "
                             "pip install 'cbr[timm]'\n")


def test_imagenet_weights_not_cached_offline_is_one_line(runner, phantom_set, tmp_path, monkeypatch):
    """The real pretrained path, offline (conftest sets HF_HUB_OFFLINE) over an empty hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke(runner, "index", phantom_set, "--db", tmp_path / "c.db", "--model", "timm:resnet18")
    assert result.exit_code == 1
    assert result.output.startswith("Error: timm could not load ImageNet weights for resnet18 (")
    assert result.output.endswith("connect once, or use --weights none\n") and result.output.count("\n") == 1


@pytest.mark.slow
def test_an_input_too_small_is_one_line():
    with pytest.raises(CbrError, match="input size 64 is too small for the timm model inception_resnet_v2"):
        create_embedder("timm:inception_resnet_v2", weights="none", input_size=64)


def test_the_unknown_backbone_error_names_the_timm_form():
    with pytest.raises(KeyError, match=r"timm:<name>"):
        create_embedder("not_a_backbone", weights="none")
