"""Several members (a model and its index each) voting together."""

import csv
import json

import pytest

from cbr.models.checkpoint import save_checkpoint
from cbr.models.embedder import create_embedder
from conftest import invoke


@pytest.mark.slow
def test_two_member_ensemble(runner, phantom_set, query_set, tmp_path):
    ckpt = tmp_path / "other.pt"
    save_checkpoint(create_embedder("tinycnn", weights="none", seed=7), ckpt)
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, "--model", "tinycnn", "--model", ckpt,
                    "--weights", "none", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   18" in result.output

    row = next(csv.DictReader(open(query_set, newline="")))
    image = query_set.parent / row["path"]
    for ensemble in ("classic", "confidence"):
        result = invoke(runner, "query", image, "--db", db, "-k", 3, "--ensemble", ensemble, "--json",
                        "--out", tmp_path / "r")
        assert result.exit_code == 0, result.output
        a = json.loads(result.output)
        assert len(a["model_fingerprints"]) == 2 and len(set(a["model_fingerprints"])) == 2
        assert len(a["members"]) == 2
        assert all(len(m["neighbours"]) == 3 for m in a["members"])
        assert abs(sum(a["prediction"]["probabilities"].values()) - 1) < 1e-6
        label = a["prediction"]["evidence"]["label"]
        agree = sum(m["vote"]["label"] == label for m in a["members"])
        assert a["prediction"]["evidence"]["members"] == {"agree": agree, "of": 2}
        assert a["prediction"]["evidence"]["text"].endswith(f"; {agree} of 2 members {label}")
        shown = invoke(runner, "show", a["query_id"], "--db", db, "--json")  # the stored record says it too
        assert json.loads(shown.output)["prediction"]["evidence"]["members"] == {"agree": agree, "of": 2}

    # One member alone, chosen by its checkpoint path.
    result = invoke(runner, "query", image, "--db", db, "--model", ckpt, "--json", "--explain", "none", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["members"]) == 1
