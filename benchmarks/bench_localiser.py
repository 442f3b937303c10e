"""The lesion localiser alone, cross-validated: its pointing game, energy pointing game and IoU on
held-out images beside a centre point and the training masks' mean map (issue 25).

``cbr evaluate --explain layercam`` measures the same maps inside the whole pipeline (it trains
the classifier too and queries every image); this script trains only the localiser of each fold,
with cbr's own code (``cbr.learn.segmentation.train_localiser``), so it fits a small CPU budget.

    OMP_NUM_THREADS=1 TORCH_HOME=../shared/weights python benchmarks/bench_localiser.py \
        ../shared/data/busbra/manifest.csv --group-column patient_id --folds 5 --img-size 128 --epochs 3 \
        --train-layers 6 --out /tmp/localiser.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cbr.data.dataset import ManifestSpec, read_dataset
from cbr.data.splits import grouped_folds, group_split
from cbr.learn.augmentation import decode_all
from cbr.learn.config import TrainConfig
from cbr.learn.guidance import lesion_masks
from cbr.learn.segmentation import normaliser, train_localiser
from cbr.store.reliability import guess_verdict
from explain.finding import centre_map
from explain.metrics import energy_pointing_game, iou, pointing_game


def _scores(maps, masks) -> dict:
    rows = [(pointing_game(p, m), energy_pointing_game(p, m), iou(p, m)) for p, m in zip(maps, masks)]
    a = np.array(rows, dtype=float)
    return {"n": len(rows), "pointing_game": float(a[:, 0].mean()), "energy_pointing_game": float(a[:, 1].mean()),
            "iou": float(a[:, 2].mean())}


def _fold(f, recs, fold_of, config, emb):
    import torch

    train = [r for r, g in zip(recs, fold_of) if g != f]
    test = [r for r, g in zip(recs, fold_of) if g == f]
    mc = emb.config
    kept, cache, _ = decode_all(train, mc.input_size, window=mc.window, contrast=mc.contrast, crop=mc.crop)
    train = [train[i] for i in kept]
    tr, va = group_split([r.label for r in train], [r.group for r in train], fraction=config.val_fraction,
                         seed=config.seed)
    payload, _ = train_localiser(emb.trunk, mc, config, train, cache, tr.tolist(), va.tolist())
    from cbr.models.localiser import load_localiser

    loc = load_localiser(payload, emb.trunk, "fold")
    kept, test_cache, _ = decode_all(test, mc.input_size, window=mc.window, contrast=mc.contrast, crop=mc.crop)
    test = [test[i] for i in kept]
    masks, has, _ = lesion_masks(test, mc.input_size, crop=mc.crop, window=mc.window)
    norm = normaliser(mc)
    probs = np.concatenate([loc.probabilities(norm(test_cache[s:s + 64], "cpu")) for s in range(0, len(test), 64)])
    idx = [i for i in range(len(test)) if bool(has[i])]
    truth = [masks[i, 0].numpy().astype(bool) for i in idx]
    prior = payload["mean_mask"].numpy()
    centre = centre_map(mc.input_size)
    return {"fold": f + 1, "n_train": len(train), "n_test": len(test), "train_seconds": payload["seconds"],
            "localiser": _scores([probs[i] for i in idx], truth), "centre": _scores([centre] * len(idx), truth),
            "mean_mask": _scores([prior] * len(idx), truth)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--group-column", default="patient_id")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-layers", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from cbr.models.embedder import create_embedder

    config = TrainConfig(epochs=a.epochs, img_size=a.img_size, train_layers=a.train_layers)
    recs = list(read_dataset(a.manifest, ManifestSpec(group_column=a.group_column)).records)
    fold_of = grouped_folds([r.label for r in recs], [r.group for r in recs], a.folds, seed=config.seed)
    emb = create_embedder(config.backbone, weights="imagenet", input_size=a.img_size)
    t0, folds = time.monotonic(), []
    for f in range(a.folds):
        folds.append(_fold(f, recs, fold_of, config, emb))
        print(json.dumps(folds[-1]), flush=True)
    pooled = {}
    for key in ("localiser", "centre", "mean_mask"):
        n = sum(r[key]["n"] for r in folds)
        pooled[key] = {"n": n, **{m: sum(r[key][m] * r[key]["n"] for r in folds) / n
                                  for m in ("pointing_game", "energy_pointing_game", "iou")}}
    pooled["verdict"] = guess_verdict(pooled["localiser"]["pointing_game"],
                                      {k: pooled[k] for k in ("centre", "mean_mask")})
    result = {"settings": vars(a), "folds": folds, "pooled": pooled, "seconds": round(time.monotonic() - t0)}
    print(json.dumps(pooled, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
