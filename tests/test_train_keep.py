"""Which epoch's weights a checkpoint keeps: the best on validation by default; the last with
--keep last, so that the validation images, which calibrate the vote, choose nothing."""

from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from cbr.cli import cli
from cbr.data.phantom import make_phantoms
from cbr.errors import UnknownNameError
from cbr.learn.train import TrainConfig, train_model
from cbr.learn.trainer import Trainer
from cbr.models.embedder import load_checkpoint

FAST = TrainConfig(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0, epochs=3,
                   patience=0, val_fraction=0.34)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("ph"), patients=9, slices=2, size=48)


@pytest.fixture
def first_epoch_scores_best(monkeypatch):
    """Every epoch's weights, with the validation ranking forced so that epoch 1 is the best."""
    states = {}
    original = Trainer._epoch

    def epoch(self, n, *args):
        row, _ = original(self, n, *args)
        states[n] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return row, (-n,)

    monkeypatch.setattr(Trainer, "_epoch", epoch)
    return states


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("keep, kept", [("last", 3), ("best", 1)])
def test_the_checkpoint_holds_the_kept_epochs_weights(phantoms, tmp_path, first_epoch_scores_best, keep, kept):
    r = train_model(phantoms, tmp_path / "m.pt", replace(FAST, keep=keep))
    assert (r.epochs_run, r.best_epoch, r.kept_epoch) == (3, 1, kept)
    assert r.val_balanced_accuracy == r.history[kept - 1]["val_balanced_accuracy"]
    emb, ckpt = load_checkpoint(r.path)
    assert _same(emb.state_dict(), first_epoch_scores_best[kept])
    assert not _same(emb.state_dict(), first_epoch_scores_best[4 - kept])
    assert (ckpt["extra"]["kept_epoch"], ckpt["extra"]["keep"]) == (kept, keep)


def test_best_is_the_default():
    assert TrainConfig().keep == "best"


def test_an_unknown_keep_names_the_choices():
    with pytest.raises(UnknownNameError, match="unknown kept epoch 'median'; choose from"):
        replace(FAST, keep="median").check()


def test_train_prints_the_kept_epoch(phantoms, tmp_path, first_epoch_scores_best):
    res = CliRunner().invoke(cli, ["train", str(phantoms), "--out", str(tmp_path / "m.pt"), "--backbone", "tinycnn",
                                   "--weights", "none", "--img-size", "32", "--epochs", "2", "--patience", "0",
                                   "--workers", "0", "--keep", "best"])
    assert res.exit_code == 0, res.output
    assert "2 run, kept 1 (best), best on validation 1" in res.output
    bad = CliRunner().invoke(cli, ["train", str(phantoms), "--keep", "median"])
    assert bad.exit_code == 2 and "median" in bad.output and "last" in bad.output
