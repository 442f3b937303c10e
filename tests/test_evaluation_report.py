"""`cbr evaluate`'s report: failures.html (worst errors beside their neighbours), per-class recall
and the training curves."""

import html
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cbr.cli import cli
from cbr.data.phantom import make_phantoms
from cbr.reporting.failures import worst_failures, write_failures

FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]
HOSTILE = '<script>alert("x")</script>'


def _outcome(path, label, predicted, confidence, hits=(), fold=1):
    return SimpleNamespace(record=SimpleNamespace(path=str(path), label=label), predicted=predicted,
                           prediction={"label": predicted, "confidence": confidence, "abstained": predicted is None},
                           maps={}, hits=list(hits), fold=fold)


def test_worst_failures_are_the_confident_errors_first(tmp_path):
    outs = [_outcome("a", "x", "x", 0.99), _outcome("b", "x", "y", 0.6), _outcome("c", "x", "y", 0.9),
            _outcome("d", "x", None, 0.0), _outcome("e", "y", "x", 0.7)]
    assert [o.record.path for o in worst_failures(outs)] == ["c", "e", "b", "d"]
    assert [o.record.path for o in worst_failures(outs, limit=2)] == ["c", "e"]


def test_failures_page_shows_neighbours_and_escapes_everything(tmp_path):
    images = make_phantoms(tmp_path / "ph", patients=2, slices=1, size=32).parent / "images"
    paths = sorted(images.iterdir())
    hits = [{"label": HOSTILE, "similarity": 0.91, "path": str(paths[1])},
            {"label": "tumour", "similarity": 0.5, "path": str(tmp_path / "gone.png")}]
    page = write_failures([_outcome(paths[0], "tumour", HOSTILE, 0.8, hits)], tmp_path).read_text()
    assert HOSTILE not in page and html.escape(HOSTILE) in page
    assert page.count("data:image/jpeg;base64,") == 2  # the query and the readable neighbour
    assert "unreadable" in page and "(0.910)" in page and "<script" not in page
    assert "1 of 1 queries wrong" in page
    empty = write_failures([_outcome(paths[0], "a", "a", 0.8)], tmp_path / "none").read_text()
    assert "No misclassified query." in empty


@pytest.mark.slow
def test_cross_validation_report_has_failures_recall_and_training(tmp_path):
    manifest = make_phantoms(tmp_path / "ph", patients=6, slices=2, size=32)
    out = tmp_path / "rep"
    result = CliRunner().invoke(cli, ["evaluate", str(manifest), "--folds", "2", "--epochs", "2", "-k", "3",
                                      "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    for name in ("failures.html", "per_class_recall.png", "training.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 500, name
    assert all(len(f["history"]) == f["epochs_run"] and f["seconds"] > 0 for f in m["folds"])
    assert all(f["temperature"] > 0 for f in m["folds"])  # each fold's fitted temperature is reported
    page = (out / "failures.html").read_text()
    wrong = sum(1 for line in (out / "predictions.csv").read_text().splitlines()[1:]
                if line.split(",")[1] != line.split(",")[4])
    assert f"{wrong} of 12 queries wrong" in page
    assert page.count("<tr>") == max(1, min(wrong, 24))
