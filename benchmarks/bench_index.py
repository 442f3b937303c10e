"""Indexing throughput: cbr's path against the naive baseline and the forward-only ceiling.

On a generated phantom set (default 512 images at 224 px), for mobilenet_v2 and resnet50 with
random-init weights (a random 3-class head, so every case gets a class map), in one run and
interleaved chunk by chunk so that machine noise hits every method alike:

  (a) cbr:      decode + preprocess (DataLoader worker) -> one forward pass per batch giving the
                embedding and the activations -> the class map of every case through the fast
                path (gradients through the pooling head only). Exactly ingest.CaseWriter's work,
                without the database.
  (i) `cbr index`: index_dataset itself into a fresh case base (the same model saved as a
                checkpoint, so every case gets its class map): (a) plus the database rows, the
                FAISS index and the vote calibration.
  (b) naive:    what a user would write: decode, an embedding forward pass per batch, then
                pytorch-grad-cam's GradCAM called one image at a time.
  (c) ceiling:  the batched forward pass alone on pre-decoded tensors (inference_mode,
                channels_last), no other work.

Run: .venv/bin/python benchmarks/bench_index.py [--n 512] [--backbones mobilenet_v2 resnet50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, median, table, write_json  # noqa: E402

TARGET_VS_NAIVE = 4.0
TARGET_VS_CEILING = 0.8


def _records(n: int, size: int, root: Path):
    from cbr.data.dataset import read_dataset
    from cbr.data.phantom import make_phantoms

    manifest = make_phantoms(root, patients=max(1, n // 4), slices=4, size=size, seed=0)
    return read_dataset(manifest).records[:n]


def run_cbr(emb, records, batch_size, workers):
    """(a): the ingest path minus the database."""
    from cbr.data.batches import iter_batches
    from cbr.models.maps import case_map_target, compute_maps

    n = 0
    for idx, tensors, _ in iter_batches(records, [emb.preprocess], batch_size, workers):
        import torch

        x = tensors[0]
        with torch.no_grad():
            acts, e = emb.cam_features(x)
        items = [case_map_target(emb, records[i].label) for i in idx]
        compute_maps(emb, x, acts, [t for t, _, _ in items], True, "gradcam")
        n += len(idx)
    return n


def run_naive(emb, records, batch_size):
    """(b): embed per batch, then GradCAM one image at a time."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cbr.data.image import read_image

    classes = emb.config.class_names
    model = torch.nn.Sequential(emb.trunk, emb.classifier_head())
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        x = torch.stack([emb.preprocess(read_image(r.path)[0]) for r in chunk])
        with torch.inference_mode():
            emb(x)
        for i, r in enumerate(chunk):
            with GradCAM(model=model, target_layers=[emb.target_module()]) as cam:  # cbr's CAM layer
                cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(classes.index(r.label))])
    return len(records)


def run_index(checkpoint, records, root: Path, batch_size, workers):
    """(i): `cbr index` of `records` into a new case base, class maps included."""
    from cbr.pipeline.index import index_dataset
    from cbr.store.casebase import open_casebase

    root.mkdir(parents=True)
    with open_casebase(root / "cases.db") as cb:
        report = index_dataset(cb, records=records, models=[str(checkpoint)], explain="gradcam",
                               batch_size=batch_size, num_workers=workers)
    assert report.added == len(records), report.to_dict()
    return report.added


def run_ceiling(emb, tensors, batch_size):
    """(c): batched forward only."""
    import torch

    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            emb(tensors[start:start + batch_size])
    return len(tensors)


def bench(backbone: str, records, tmp: Path, *, batch_size: int, workers: int, naive_share: int, chunks: int,
          target_layer=None):
    import torch

    from cbr.models.checkpoint import save_checkpoint

    from cbr.models.embedder import create_embedder
    from cbr.data.image import read_image
    from cbr.data.phantom import CLASSES

    emb = create_embedder(backbone, weights="none", class_names=CLASSES, target_layer=target_layer).eval()
    tensors = torch.stack([emb.preprocess(read_image(r.path)[0]) for r in records])
    per = max(1, len(records) // chunks)
    checkpoint = tmp / f"{backbone}.pt"
    save_checkpoint(emb, checkpoint)
    speeds = {"cbr": [], "index": [], "naive": [], "ceiling": []}
    cpu = {k: [] for k in speeds}  # images per CPU second, this process and its decoding workers
    run_cbr(emb, records[:batch_size], batch_size, workers)  # warm-up: allocator, workers, kernels
    run_ceiling(emb, tensors[:batch_size], batch_size)
    for c in range(chunks):
        part = records[c * per:(c + 1) * per]
        runs = {
            "cbr": lambda: run_cbr(emb, part, batch_size, workers),
            "index": lambda: run_index(checkpoint, part, tmp / f"{backbone}-{c}", batch_size, workers),
            "naive": lambda: run_naive(emb, part[: max(1, len(part) // naive_share)], batch_size),
            "ceiling": lambda: run_ceiling(emb, tensors[c * per:(c + 1) * per], batch_size),
        }
        for name, run in runs.items():
            c0, t0 = _cpu_s(), time.perf_counter()
            n = run()
            speeds[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / (_cpu_s() - c0))
    return ({k: median(v) for k, v in speeds.items()} | {f"{k}_per_cpu_s": median(v) for k, v in cpu.items()}
            | {"chunks": chunks, "per_chunk": per})


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the DataLoader workers): a busy
    shared machine inflates them far less than wall time."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=4, help="interleaving rounds; medians are over these")
    ap.add_argument("--naive-share", type=int, default=4, help="the naive loop runs on 1/N of each chunk (it is slow)")
    ap.add_argument("--target-layer", default=None,
                    help="CAM layer (default: the backbone's; \"\" = the trunk output, the last block)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        records = _records(a.n, a.size, Path(tmp))
        results, rows, cpu_rows = {}, [], []
        for b in a.backbones:
            r = bench(b, records, Path(tmp), batch_size=a.batch_size, workers=a.workers, naive_share=a.naive_share,
                      chunks=a.chunks, target_layer=a.target_layer)
            r["a_over_b"] = r["cbr"] / r["naive"]
            r["a_over_c"] = r["cbr"] / r["ceiling"]
            r["i_over_b"] = r["index"] / r["naive"]
            r["i_over_c"] = r["index"] / r["ceiling"]
            results[b] = r

            def ratio(x, target):
                return f"{x:.2f} ({'ok' if x >= target else 'below'} {target})"

            rows.append([b, f"{r['cbr']:.1f}", f"{r['index']:.1f}", f"{r['naive']:.1f}", f"{r['ceiling']:.1f}",
                         ratio(r["a_over_b"], TARGET_VS_NAIVE), ratio(r["a_over_c"], TARGET_VS_CEILING),
                         ratio(r["i_over_b"], TARGET_VS_NAIVE), ratio(r["i_over_c"], TARGET_VS_CEILING)])
            per_cpu = {k: r[f"{k}_per_cpu_s"] for k in ("cbr", "index", "naive", "ceiling")}
            cpu_rows.append([b, *(f"{per_cpu[k]:.1f}" for k in ("cbr", "index", "naive", "ceiling")),
                             ratio(per_cpu["cbr"] / per_cpu["naive"], TARGET_VS_NAIVE),
                             ratio(per_cpu["cbr"] / per_cpu["ceiling"], TARGET_VS_CEILING),
                             ratio(per_cpu["index"] / per_cpu["naive"], TARGET_VS_NAIVE),
                             ratio(per_cpu["index"] / per_cpu["ceiling"], TARGET_VS_CEILING)])
    print(f"Indexing throughput, {len(records)} phantoms at {a.size} px, batch {a.batch_size}, "
          f"{a.workers} decode worker(s), torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}; {machine()}")
    layer = "each backbone's default" if a.target_layer is None else (a.target_layer or "the trunk output")
    print(f"CAM layer: {layer}. Images/s, medians over interleaved chunks.")
    print(table(["backbone", "(a) cbr img/s", "(i) cbr index img/s", "(b) naive img/s", "(c) forward-only img/s",
                 "(a)/(b)", "(a)/(c)", "(i)/(b)", "(i)/(c)"], rows))
    print("Images per CPU second (this process and its decoding workers), medians over the same chunks.")
    print(table(["backbone", "(a) cbr", "(i) cbr index", "(b) naive", "(c) forward-only",
                 "(a)/(b)", "(a)/(c)", "(i)/(b)", "(i)/(c)"], cpu_rows))
    write_json("index", {"args": vars(a), "results": results}, a.out)


if __name__ == "__main__":
    main()
