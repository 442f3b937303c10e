"""Test-time flip averaging of embeddings (`--tta flip`): the vector, the fingerprint, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, invoke


def test_flip_embedding_is_the_normalised_sum_of_both_views():
    from cbr.models.embedder import create_embedder

    plain = create_embedder("tinycnn", weights="none", input_size=32)
    tta = create_embedder("tinycnn", weights="none", input_size=32, tta="flip")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(plain.neck(plain.trunk(x)) + plain.neck(plain.trunk(torch.flip(x, dims=[3]))), dim=1)
        got = tta.embed(x)
        assert torch.allclose(got, expected, atol=1e-6)
        # invariant to a left-right mirror of the input, which one view is not
        assert torch.allclose(tta.embed(torch.flip(x, dims=[3])), got, atol=1e-5)
        assert not torch.allclose(plain.embed(torch.flip(x, dims=[3])), plain.embed(x), atol=1e-3)
    # with autograd (a map's backward pass) the one view given is explained
    assert torch.allclose(tta(x).detach(), plain(x).detach(), atol=1e-6)
    assert tta.fingerprint != plain.fingerprint and plain.config.tta == "none"


def test_unknown_tta_is_refused():
    from cbr.errors import UnknownNameError
    from cbr.learn.config import TrainConfig
    from cbr.models.embedder import create_embedder

    with pytest.raises(UnknownNameError, match="test-time augmentation 'rotate'"):
        create_embedder("tinycnn", weights="none", tta="rotate")
    with pytest.raises(UnknownNameError, match="flip"):
        TrainConfig(tta="rotate").check()


@pytest.mark.slow
def test_index_with_tta_then_query(runner, phantom_set, query_set, tmp_path):
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--tta", "flip")
    assert result.exit_code == 0, result.output
    image = sorted((query_set.parent / "images").iterdir())[0]
    result = invoke(runner, "query", image, "--db", db, "--no-record", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert len(answer["neighbours"]) == 5 and answer["prediction"]["label"]


def test_train_records_tta(runner, phantom_set, tmp_path):
    from cbr.models.embedder import load_checkpoint

    out = tmp_path / "m.pt"
    result = invoke(runner, "train", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1",
                    "--img-size", "32", "--workers", "0", "--tta", "flip", "--out", out)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out)[0].config.tta == "flip"
