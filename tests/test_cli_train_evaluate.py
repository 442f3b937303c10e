"""`cbr train` and `cbr evaluate` through click's runner."""

import json

import pytest
from click.testing import CliRunner

from cbr.cli import cli
from cbr.data.phantom import make_phantoms
from cbr.models.embedder import load_checkpoint

FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(make_phantoms(tmp_path_factory.mktemp("ph"), patients=6, slices=2, size=32))


@pytest.fixture(scope="module")
def model(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m.pt"
    result = CliRunner().invoke(cli, ["train", manifest, "--out", str(out), "--epochs", "1", *FAST])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_train_prints_a_summary(model):
    out, text = model
    assert out.is_file()
    assert "Trained tinycnn (none weights)" in text
    assert "classes:      cyst, normal, tumour" in text
    assert "epochs:       1 run, kept 1 (best), best on validation 1" in text
    assert f"checkpoint:   {out} (fingerprint " in text


def test_train_says_how_it_split(model, tmp_path):
    """By patient when the data has patient ids (the phantoms' manifest), by image otherwise."""
    import numpy as np
    from PIL import Image

    assert "(split by patient)" in model[1]
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                                      "--val-fraction", "0.5", *FAST])
    assert result.exit_code == 0, result.output
    assert "images:       4 training, 4 validation (split by image)" in result.output


def test_train_json(manifest, tmp_path):
    result = CliRunner().invoke(cli, ["train", manifest, "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                                      "--json", *FAST])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["class_names"] == ["cyst", "normal", "tumour"] and d["epochs_run"] == 1
    assert d["train_size"] + d["val_size"] == 12 and len(d["fingerprint"]) == 64


@pytest.mark.slow
def test_train_split_seed_holds_out_what_its_seed_would(manifest, tmp_path):
    """A deep ensemble's second member (--seed 1 --split-seed 0) validates on the first's images."""

    def held_out(*args):
        out = tmp_path / f"m{'-'.join(args)}.pt"
        result = CliRunner().invoke(cli, ["train", manifest, "--out", str(out), "--epochs", "1",
                                          "--val-fraction", "0.5", *FAST, *args])
        assert result.exit_code == 0, result.output
        assert ("(split by patient, split seed 0)" in result.output) == ("--split-seed" in args)
        return sorted(load_checkpoint(out)[1]["extra"]["val_sha256"])

    first = held_out("--seed", "0")
    assert held_out("--seed", "1", "--split-seed", "0") == first != held_out("--seed", "1")


@pytest.mark.slow
def test_evaluate_cross_validation_json(manifest, tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(cli, ["evaluate", manifest, "--folds", "2", "--epochs", "1", "-k", "3",
                                      "--out", str(out), "--json", *FAST])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert m["protocol"] == "cross-validation" and m["n"] == 12 and len(m["folds"]) == 2
    assert m["config"]["train"] is True and m["config"]["epochs"] == 1
    assert 0 <= m["balanced_accuracy"] <= 1 and 0 <= m["softmax"]["balanced_accuracy"] <= 1
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_evaluate_against_a_case_base_prints_the_table(manifest, model, tmp_path, monkeypatch):
    from cbr.store.casebase import open_casebase
    from cbr.pipeline.index import index_dataset

    db = tmp_path / "cases.db"
    index_dataset(open_casebase(db), manifest, models=[str(model[0])], explain="none")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate", manifest, "--db", str(db), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "held-out test set against" in result.output
    assert "leakage: 12 same image, 12 in a model's training set, 12 same patient/group" in result.output
    assert result.output.rstrip().endswith("report: cbr-evaluation")
    assert (tmp_path / "cbr-evaluation" / "metrics.json").is_file()
    strict = CliRunner().invoke(cli, ["evaluate", manifest, "--db", str(db), "--strict", "--json"])
    assert strict.exit_code == 0, strict.output
    assert json.loads(strict.output)["n"] == 0  # every test image leaks


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{m}", "--epochs", "0"], "Invalid value for '--epochs'"),
        (["train", "{m}", "--backbone", "nope"], "Invalid value for '--backbone'"),
        (["evaluate", "{m}", "--vote", "nope"], "Invalid value for '--vote'"),
        (["evaluate", "{m}", "--db", "x.db", "--folds", "3"], "--folds: only for cross-validation"),
        (["evaluate", "{m}", "--strict"], "--strict: only with --db"),
        (["train", "{m}", "--split-seed", "-1"], "Invalid value for '--split-seed'"),
        (["train", "{m}", "--seed", "-1"], "Invalid value for '--seed'"),
        (["evaluate", "{m}", "--seed", "-1"], "Invalid value for '--seed'"),
    ],
)
def test_bad_option_values_exit_2(manifest, args, message):
    result = CliRunner().invoke(cli, [a.format(m=manifest) for a in args])
    assert result.exit_code == 2
    assert message in result.output


def test_library_errors_are_one_line(tmp_path):
    one_class = make_phantoms(tmp_path / "one", patients=2, slices=1, size=32, classes=("cyst",))
    result = CliRunner().invoke(cli, ["train", str(one_class), "--out", str(tmp_path / "m.pt"), *FAST])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "at least 2 classes" in lines[0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["train", str(one_class), "--out", str(blocker / "m.pt"), *FAST])
    assert result.exit_code == 1 and result.output.startswith("Error: --out ")


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_commands_have_examples(name):
    doc = cli.get_command(None, name).help
    assert "\b\nExample:" in doc.replace("    ", "")
