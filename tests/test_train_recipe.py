"""Training recipe options: label smoothing and learning-rate warm-up (recorded in the checkpoint)."""

import json

import pytest
from click.testing import CliRunner

from cbr.cli import cli
from cbr.data.phantom import make_phantoms
from cbr.learn.config import TrainConfig, TrainError

FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(make_phantoms(tmp_path_factory.mktemp("ph"), patients=6, slices=2, size=32))


def _train(manifest, out, *args):
    result = CliRunner().invoke(cli, ["train", manifest, "--out", str(out), "--epochs", "2", "--patience", "0",
                                      "--json", *FAST, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_warmup_and_smoothing_change_training_and_are_recorded(manifest, tmp_path):
    plain = _train(manifest, tmp_path / "a.pt")
    recipe = _train(manifest, tmp_path / "b.pt", "--label-smoothing", "0.1", "--warmup", "2")
    # warm-up over both epochs: the first ends below the plain cosine schedule
    assert recipe["history"][0]["lr"] < plain["history"][0]["lr"]
    assert recipe["history"][0]["loss"] != plain["history"][0]["loss"]
    from cbr.models.embedder import load_checkpoint

    _, extra = load_checkpoint(tmp_path / "b.pt")
    options = extra["extra"]["options"]
    assert options["label_smoothing"] == 0.1 and options["warmup_epochs"] == 2


@pytest.mark.parametrize("field, value, message", [("label_smoothing", 1.0, "--label-smoothing 1.0"),
                                                   ("warmup_epochs", -1, "--warmup -1")])
def test_bad_recipe_values_are_refused(field, value, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**{field: value}).check()


@pytest.mark.parametrize("warm, steps", [(0, 7), (1, 5), (4, 12), (12, 12)])
def test_the_schedule_is_warmup_times_cosine(warm, steps):
    import math

    import torch

    from cbr.learn.trainer import lr_schedule

    model = torch.nn.Linear(2, 1)
    optimiser = torch.optim.AdamW([{"params": [model.weight], "lr": 0.01}, {"params": [model.bias], "lr": 0.1}])
    schedule = lr_schedule(optimiser, warm, steps)
    for step in range(steps + 1):  # the rates each optimiser step uses, and the one after the last
        factor = min(1.0, (step + 1) / warm if warm else 1.0) * 0.5 * (1 + math.cos(math.pi * step / steps))
        assert [g["lr"] for g in optimiser.param_groups] == pytest.approx([0.01 * factor, 0.1 * factor], rel=1e-9,
                                                                           abs=1e-15)
        optimiser.step()
        schedule.step()
