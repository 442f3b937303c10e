"""Training objectives (ce, supcon, ce+supcon), class-balanced sampling and training flips."""

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from cbr.cli import cli
from cbr.data.phantom import make_phantoms
from cbr.errors import UnknownNameError
from cbr.learn.augmentation import FLIPS, augmentation_text, make_augmentation
from cbr.learn.config import TrainConfig
from cbr.learn.objective import OBJECTIVES, LossSettings, get_objective, supcon_loss
from cbr.learn.sampling import SAMPLERS, draw_weights, get_sampler
from cbr.learn.train import train_model
from cbr.models.embedder import load_checkpoint

FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]
FAST_CONFIG = TrainConfig(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0,
                          epochs=1, patience=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(make_phantoms(tmp_path_factory.mktemp("ph"), patients=9, slices=2, size=32))


def _tiny_model():
    from cbr.models.embedder import create_embedder

    return create_embedder("tinycnn", weights="none", input_size=32, class_names=["a", "b", "c"], seed=0,
                           device="cpu")


# --- the SupCon loss itself ---------------------------------------------------------------------

def test_supcon_matches_a_hand_computed_case():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    # anchor 0: positive 1 (cos 0.6), negative 2 (cos 0); anchor 1: positive 0 (0.6), negative 2 (0.8);
    # anchor 2 has no positive and is left out of the mean
    a0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t)))
    a1 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.8 / t)))
    assert supcon_loss(z, labels, t).item() == pytest.approx((a0 + a1) / 2, rel=1e-6)


def test_supcon_averages_over_several_positives():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.3], [0.8, -0.2], [-1.0, 0.4]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1])
    t = 0.1
    sim = (z @ z.T / t).tolist()
    expected = []
    for i in range(3):  # anchors of class 0, each with two positives; anchor 3 has none
        denom = sum(math.exp(sim[i][a]) for a in range(4) if a != i)
        expected.append(-sum(math.log(math.exp(sim[i][p]) / denom) for p in range(3) if p != i) / 2)
    assert supcon_loss(z, labels, t).item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_supcon_gradients_flow_and_pull_classes_together():
    torch.manual_seed(0)
    raw = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    loss = supcon_loss(torch.nn.functional.normalize(raw, dim=1), labels)
    loss.backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    # one gradient step lowers the loss
    with torch.no_grad():
        stepped = raw - 0.5 * raw.grad
    assert supcon_loss(torch.nn.functional.normalize(stepped, dim=1), labels) < loss
    # embeddings clustered by class score lower than the same vectors with the labels shuffled
    clustered = torch.nn.functional.normalize(torch.eye(3)[labels] + 0.01 * torch.randn(8, 3), dim=1)
    assert supcon_loss(clustered, labels) < supcon_loss(clustered, labels[torch.tensor([0, 2, 4, 1, 3, 5, 7, 6])])


def test_batch_without_any_positive_gives_zero_and_still_backpropagates():
    raw = torch.randn(4, 8, requires_grad=True)
    loss = supcon_loss(torch.nn.functional.normalize(raw, dim=1), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert raw.grad is not None and torch.equal(raw.grad, torch.zeros_like(raw))


def test_single_image_classes_are_skipped_as_anchors_only():
    z = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([0, 0, 1, 2, 3])  # only class 0 has a pair
    sim = (z @ z.T / 0.1)
    # the single-image classes still count as negatives in the denominator
    expected = [-(sim[i, 1 - i] - torch.logsumexp(torch.cat([sim[i, :i], sim[i, i + 1:]]), 0)) for i in (0, 1)]
    assert supcon_loss(z, labels).item() == pytest.approx(float(sum(expected) / 2), rel=1e-5)


# --- the objectives on a model ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_the_trunk_and_the_head(name):
    model = _tiny_model()
    model.train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = get_objective(name)(model, x, y, LossSettings())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_supcon_head_is_a_probe_that_sends_no_gradient_into_the_backbone():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    grads = []
    for loss_of in (lambda m: get_objective("supcon")(m, x, y, LossSettings()),
                    lambda m: supcon_loss(m(x), y)):
        model = _tiny_model()
        model.train()
        loss_of(model).backward()
        grads.append([p.grad.clone() for p in model.trunk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_ce_plus_supcon_is_the_sum():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model = _tiny_model()
    model.eval()  # no BatchNorm updates between the three calls
    with torch.no_grad():
        both = get_objective("ce+supcon")(model, x, y, LossSettings())
        ce = get_objective("ce")(model, x, y, LossSettings())
        sc = supcon_loss(model(x), y)
    assert both.item() == pytest.approx(ce.item() + sc.item(), rel=1e-5)


def test_unknown_objective_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown objective 'triplet'; choose from ce, ce\\+supcon, supcon"):
        get_objective("triplet")


# --- sampling -----------------------------------------------------------------------------------

def _draws(name, targets, seed, epochs):
    opts = get_sampler(name).loader_options(targets, torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(list(range(len(targets))), batch_size=10, **opts)
    return [int(i) for _ in range(epochs) for batch in loader for i in batch]


def test_balanced_sampler_draws_classes_equally_on_imbalanced_data():
    targets = [0] * 90 + [1] * 10
    drawn = _draws("balanced", targets, seed=0, epochs=20)
    share = Counter(targets[i] for i in drawn)[1] / len(drawn)
    assert len(drawn) == 20 * len(targets)
    assert 0.45 < share < 0.55  # a shuffle gives 0.10
    assert sorted(Counter(targets[i] for i in _draws("shuffle", targets, 0, 1)).values()) == [10, 90]
    assert draw_weights([0, 0, 0, 1]) == [1 / 3, 1 / 3, 1 / 3, 1.0]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_is_seeded(name):
    targets = [0] * 12 + [1] * 3 + [2] * 5
    a, b = _draws(name, targets, seed=4, epochs=2), _draws(name, targets, seed=4, epochs=2)
    assert a == b and len(a) == 2 * len(targets) and all(0 <= i < len(targets) for i in a)
    assert _draws(name, targets, seed=5, epochs=2) != a


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_balanced_sampling_leaves_the_loss_unweighted(name):
    from cbr.learn.trainer import Trainer

    weight = torch.tensor([0.5, 1.0, 2.0])
    run = Trainer(_tiny_model(), replace(FAST_CONFIG, sampler=name), "cpu", ["a", "b", "c"], weight, False)
    expected = None if name == "balanced" else weight
    assert run.loss_settings.class_weight is expected


# --- flips --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_flip_option_picks_the_flips(flip):
    kinds = [type(t).__name__ for t in make_augmentation(True, flip).transforms]
    assert [k for k in kinds if "Flip" in k] == list(FLIPS[flip])
    assert kinds[-2:] == ["RandomAffine", "ColorJitter"]  # the rest of the recipe is unchanged


def test_default_flip_is_todays_horizontal_flip():
    assert TrainConfig().flip == "horizontal"
    kinds = [type(t).__name__ for t in make_augmentation(False).transforms]
    assert kinds == ["RandomHorizontalFlip", "RandomAffine", "ColorJitter"]
    assert augmentation_text(True) == "hflip, rotate +-10 deg, scale 0.9-1.1, brightness/contrast +-20%"
    assert augmentation_text(True, "none").startswith("no flip, rotate")


def test_vertical_flip_flips_rows():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 0, :] = 255  # a bright top row
    aug = make_augmentation(True, "vertical")
    aug.transforms = aug.transforms[:1]  # the flip alone
    torch.manual_seed(0)
    outs = [aug(image) for _ in range(20)]
    assert any(torch.equal(o, image) for o in outs)
    assert any(torch.equal(o, torch.flip(image, dims=[1])) for o in outs)
    assert all(torch.equal(o, image) or torch.equal(o, torch.flip(image, dims=[1])) for o in outs)


# --- settings, training runs, checkpoint --------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("objective", "triplet", "unknown objective 'triplet'; choose from ce, ce\\+supcon, supcon"),
    ("sampler", "stratified", "unknown sampler 'stratified'; choose from balanced, shuffle"),
    ("flip", "diagonal", "unknown flip 'diagonal'; choose from both, horizontal, none, vertical"),
])
def test_bad_values_are_refused_before_training(field, value, message):
    with pytest.raises(UnknownNameError, match=message):
        TrainConfig(**{field: value}).check()


@pytest.mark.slow
def test_same_seed_same_model_with_supcon_and_balanced_sampling(manifest, tmp_path):
    config = replace(FAST_CONFIG, epochs=2, objective="ce+supcon", sampler="balanced", flip="both", seed=2)
    a = train_model(manifest, tmp_path / "a.pt", config)
    b = train_model(manifest, tmp_path / "b.pt", config)
    assert a.fingerprint == b.fingerprint
    c = train_model(manifest, tmp_path / "c.pt", replace(config, sampler="shuffle"))
    assert c.fingerprint != a.fingerprint  # the sampler does change what is learnt


def _train(manifest, out, *args):
    result = CliRunner().invoke(cli, ["train", manifest, "--out", str(out), "--epochs", "1", "--patience", "0",
                                      "--val-fraction", "0.34", "--json", *FAST, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_cli_train_records_objective_sampler_and_flip(manifest, tmp_path, objective):
    out = tmp_path / "m.pt"
    got = _train(manifest, out, "--objective", objective, "--sampler", "balanced", "--flip", "vertical")
    assert got["epochs_run"] == 1 and math.isfinite(got["history"][0]["loss"])
    assert got["best_val_balanced_accuracy"] is not None  # the head is trained under every objective
    _, rest = load_checkpoint(out)
    options = rest["extra"]["options"]
    assert (options["objective"], options["sampler"], options["flip"]) == (objective, "balanced", "vertical")
    assert rest["extra"]["augmentation"].startswith("vflip, rotate")


def test_cli_train_defaults_are_recorded(manifest, tmp_path):
    out = tmp_path / "m.pt"
    _train(manifest, out)
    options = load_checkpoint(out)[1]["extra"]["options"]
    assert (options["objective"], options["sampler"], options["flip"]) == ("ce", "shuffle", "horizontal")


@pytest.mark.slow
def test_cli_evaluate_cross_validates_with_the_new_options(manifest, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", manifest, "--folds", "2", "--epochs", "1", "-k", "3", "--json",
                                      "--out", str(tmp_path / "rep"), "--objective", "supcon", "--sampler",
                                      "balanced", "--flip", "none", *FAST])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert (m["config"]["objective"], m["config"]["sampler"], m["config"]["flip"]) == ("supcon", "balanced", "none")
    assert len(m["folds"]) == 2 and 0 <= m["balanced_accuracy"] <= 1 and 0 <= m["softmax"]["balanced_accuracy"] <= 1


@pytest.mark.parametrize("option, value", [("--objective", "triplet"), ("--sampler", "stratified"),
                                           ("--flip", "diagonal")])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_cli_bad_value_is_one_error_line(manifest, option, value, command):
    result = CliRunner().invoke(cli, [command, manifest, option, value])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"Invalid value for '{option}'" in errors[0] and value in errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option, value", [("--objective", "supcon"), ("--sampler", "balanced"), ("--flip", "none")])
def test_cli_training_options_are_refused_against_a_case_base(manifest, option, value):
    result = CliRunner().invoke(cli, ["evaluate", manifest, "--db", "x.db", option, value])
    assert result.exit_code == 2
    assert f"{option}: only for cross-validation" in result.output


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_objectives_combine_with_mask_guidance(manifest, tmp_path, objective):
    got = _train(manifest, tmp_path / "m.pt", "--objective", objective, "--mask-guidance", "1")
    row = got["history"][0]
    assert math.isfinite(row["loss"]) and 0 <= row["guidance"] <= 1


def test_cli_train_table_names_the_objective(manifest, tmp_path):
    result = CliRunner().invoke(cli, ["train", manifest, "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                                      "--objective", "ce+supcon", "--sampler", "balanced", "--flip", "none", *FAST])
    assert result.exit_code == 0, result.output
    assert "  objective:    ce+supcon (batches: balanced; flips: none)\n" in result.output
