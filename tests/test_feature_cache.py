"""Training on cached frozen-block features (--train-layers N --cache-draws D) is training as usual."""

from dataclasses import replace

import pytest
import torch

import cbr.learn.feature_cache
from cbr.data.phantom import make_phantoms
from cbr.learn.augmentation import Augmented
from cbr.learn.feature_cache import FeatureDraws, bypass, frozen_features
from cbr.learn.train import TrainConfig, TrainError, make_augmentation, train_model
from cbr.learn.trainer import Trainer
from cbr.models.embedder import create_embedder, load_checkpoint

FAST = TrainConfig(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0, train_layers=4,
                   patience=0)
CLASSES = ("a", "b")


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = [i % 2 for i in range(n)]
    images[torch.tensor(targets) == 1, 0] //= 2  # class b: a darker red channel, something to learn
    return images, targets


def _fit(config, transform=None):
    model = create_embedder("tinycnn", weights="none", input_size=32, class_names=CLASSES, seed=1)
    run = Trainer(model, config, "cpu", list(CLASSES), torch.ones(2), progress=False)
    images, targets = _data()
    history, *_ = run.fit(Augmented(images[:16], targets[:16], transform), images[16:], targets[16:])
    return model, run, history


@pytest.mark.slow
def test_cached_training_equals_uncached(monkeypatch):
    """No augmentation and one draw: the cached run computes exactly what the uncached one does."""
    monkeypatch.setattr(cbr.learn.feature_cache, "CACHE_DTYPE", "float32")
    plain, run, history = _fit(replace(FAST, epochs=3))
    cached, run_c, history_c = _fit(replace(FAST, epochs=3, cache_draws=1))
    assert len(run.frozen) == len(run_c.frozen) > 0
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in history_c], rel=1e-5)
    start = create_embedder("tinycnn", weights="none", input_size=32, class_names=CLASSES, seed=1)
    assert not torch.equal(start.head.weight, cached.head.weight)  # it did learn
    assert all("forward" not in vars(m) for m in run_c.frozen)  # the frozen blocks run again afterwards


def test_cache_holds_the_frozen_blocks_output_per_draw():
    model = create_embedder("tinycnn", weights="none", input_size=32, class_names=CLASSES, seed=1).eval()
    run = Trainer(model, replace(FAST, cache_draws=3), "cpu", list(CLASSES), torch.ones(2), progress=False)
    images, targets = _data(6)
    torch.manual_seed(0)
    cache = FeatureDraws(model, run.frozen, Augmented(images, targets, make_augmentation(False, "horizontal")), 3,
                         run.normalise, batch_size=4)
    assert cache.draws == 3 and len(cache) == 6 and cache.features[0].dtype == torch.float16
    assert not torch.equal(cache.features[0], cache.features[1])  # each draw its own augmentation
    cache.set_epoch(5)
    assert cache.draw == 1 and torch.equal(cache[2][0], cache.features[1][2])
    # plain images: the cache is the frozen blocks' output, and the rest of the trunk continues from it
    plain = FeatureDraws(model, run.frozen, Augmented(images, targets, None), 1, run.normalise, batch_size=4)
    x = run.normalise(images)
    torch.testing.assert_close(plain.features[0].float(), frozen_features(model, run.frozen, x), rtol=1e-3,
                               atol=1e-3)
    feats = frozen_features(model, run.frozen, x)
    with torch.no_grad():
        whole = model.trunk(model._prepare(x))
        with bypass(run.frozen):
            rest = model.trunk(model._prepare(feats))
    torch.testing.assert_close(rest, whole)


def test_cache_draws_needs_frozen_blocks():
    with pytest.raises(TrainError, match="--train-layers"):
        replace(FAST, train_layers=None, cache_draws=2).check()
    with pytest.raises(TrainError, match="--cache-draws -1"):
        replace(FAST, cache_draws=-1).check()


@pytest.mark.slow
def test_train_model_records_its_cache(tmp_path):
    data = make_phantoms(tmp_path / "ph", patients=6, slices=2, size=40)
    r = train_model(data, tmp_path / "m.pt", replace(FAST, epochs=2, cache_draws=2))
    _, info = load_checkpoint(r.path)
    assert r.epochs_run == 2 and info["extra"]["options"]["cache_draws"] == 2
