"""Clinical formats: decode throughput DICOM vs PNG on the same pixels, and a NIfTI volume set
indexed and queried end to end.

(1) Decode: ``--n`` synthetic 16-bit CT slices (``--size`` px, signed HU-like values) are written
    three times with identical pixels: a 16-bit greyscale PNG, an uncompressed DICOM (rescale
    intercept -1024, a file window) and an RLE Lossless DICOM. Each round decodes every file once
    to the RGB image the models see (``read_image`` for PNG, ``read_source`` for DICOM: modality
    LUT + window); the rounds are interleaved format by format and the median images/s is shown.

(2) NIfTI end to end: ``--volumes`` synthetic volumes (two classes, ``--vsize`` voxels on a side,
    ``--slices`` rule) in class folders are indexed into a fresh case base (``--model``, random
    weights unless --weights imagenet, stored Grad-CAM maps), then slices of an unseen volume are
    queried (k=5, gradcam maps and report). Times are wall clock, this machine, one run.

Run: .venv/bin/python benchmarks/bench_formats.py [--n 200] [--size 512] [--rounds 5]
     [--volumes 6] [--vsize 96] [--slices every:2] [--model mobilenet_v2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, median, table, write_json  # noqa: E402

from cbr.data.dicom import write_dicom  # noqa: E402


def _ct_slice(rng, size):
    import numpy as np

    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.42) ** 2
    hu = np.where(body, rng.normal(40, 20, (size, size)), -1000.0)
    lung = ((yy - size / 2) ** 2 / 1.5 + (xx - size * 0.35) ** 2) < (size * 0.12) ** 2
    hu[lung] = rng.normal(-800, 40, lung.sum())
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)  # stored values; HU = stored - 1024


def _write_dicom(path, stored, rle=False):
    from pydicom.uid import CTImageStorage, RLELossless

    write_dicom(path, stored, sop_class=CTImageStorage, transfer_syntax=RLELossless if rle else None, Modality="CT",
                PatientID="BENCH", BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                WindowWidth=400)


def bench_decode(n: int, size: int, rounds: int, root: Path) -> list[dict]:
    import numpy as np
    from PIL import Image

    from cbr.data import sources
    from cbr.data.image import read_image
    from cbr.data.sources import read_source

    rng = np.random.default_rng(0)
    files = {"PNG 16-bit": [], "DICOM uncompressed": [], "DICOM RLE lossless": []}
    for i in range(n):
        stored = _ct_slice(rng, size)
        png = root / f"s{i}.png"
        Image.fromarray(stored.astype(np.uint16)).save(png)
        files["PNG 16-bit"].append(png)
        for name, rle, suffix in (("DICOM uncompressed", False, ""), ("DICOM RLE lossless", True, "r")):
            p = root / f"s{i}{suffix}"  # no extension, as archives often have
            _write_dicom(p, stored, rle=rle)
            files[name].append(p)
    readers = {"PNG 16-bit": lambda p: read_image(p)[0],
               "DICOM uncompressed": lambda p: read_source(str(p))[0],
               "DICOM RLE lossless": lambda p: read_source(str(p))[0]}
    times = {k: [] for k in files}
    for _ in range(rounds):
        for name, paths in files.items():
            sources._CACHE.clear()
            t0 = time.perf_counter()
            for p in paths:
                readers[name](p)
            times[name].append(time.perf_counter() - t0)
    out = []
    for name, ts in times.items():
        size_mb = sum(p.stat().st_size for p in files[name]) / 1e6
        out.append({"format": name, "images_per_s": n / median(ts), "ms_per_image": 1000 * median(ts) / n,
                    "mb_on_disk": size_mb})
    return out


def bench_nifti(volumes: int, vsize: int, slices: str, model: str, weights: str, root: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from cbr.data.sources import SourceSpec
    from cbr.pipeline.index import index_dataset
    from cbr.pipeline.query import query_images
    from cbr.pipeline.settings import IndexConfig, QueryConfig
    from cbr.store.casebase import open_casebase

    rng = np.random.default_rng(0)

    def volume(label):
        v = rng.normal(100, 25, (vsize, vsize, vsize // 2)).astype(np.float32)
        if label == "tumour":
            c = rng.integers(vsize // 4, 3 * vsize // 4, 3)
            zz, yy, xx = np.ogrid[:vsize, :vsize, :vsize // 2]
            v[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2] // 2) ** 2) < (vsize // 8) ** 2] += 150
        return nib.Nifti1Image(v, np.eye(4))

    for i in range(volumes):
        label = ("normal", "tumour")[i % 2]
        (root / "data" / label).mkdir(parents=True, exist_ok=True)
        nib.save(volume(label), str(root / "data" / label / f"p{i}.nii.gz"))
    nib.save(volume("tumour"), str(root / "query.nii.gz"))
    cb = open_casebase(str(root / "cases.db"))
    t0 = time.perf_counter()
    report = index_dataset(cb, str(root / "data"), IndexConfig(models=(model,), weights=weights, num_workers=0),
                           sources=SourceSpec(slices=slices))
    t_index = time.perf_counter() - t0
    queries = [f"{root / 'query.nii.gz'}#axis=axial&slice={s}" for s in range(vsize // 8, vsize // 2, vsize // 8)]
    t0 = time.perf_counter()
    answers = query_images(cb, queries, QueryConfig(k=5, out_dir=str(root / "reports")))
    t_query = time.perf_counter() - t0
    return {"volumes": volumes, "voxels": f"{vsize}x{vsize}x{vsize // 2}", "slices_rule": slices, "model": model,
            "weights": weights, "cases": report.added, "index_s": t_index, "index_cases_per_s": report.added / t_index,
            "queries": len(answers), "query_s_each": t_query / len(answers),
            "predictions": [a.prediction["label"] for a in answers]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--volumes", type=int, default=6)
    ap.add_argument("--vsize", type=int, default=96)
    ap.add_argument("--slices", default="every:2")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="none", choices=["none", "imagenet"])
    ap.add_argument("--out", default=None, help="JSON results file [default: benchmarks/results/formats.json]")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "decode").mkdir()
        decode = bench_decode(args.n, args.size, args.rounds, root / "decode")
        print(f"\n(1) decode to the model's RGB image, {args.n} CT slices of {args.size}x{args.size}, "
              f"median of {args.rounds} rounds")
        print(table(["format", "images/s", "ms/image", "MB on disk"],
                    [[d["format"], f"{d['images_per_s']:.0f}", f"{d['ms_per_image']:.2f}", f"{d['mb_on_disk']:.1f}"]
                     for d in decode]))
        nifti = bench_nifti(args.volumes, args.vsize, args.slices, args.model, args.weights, root / "nifti")
        print(f"\n(2) NIfTI end to end: {nifti['volumes']} volumes of {nifti['voxels']}, --slices {nifti['slices_rule']}, "
              f"{nifti['model']} ({nifti['weights']} weights)")
        print(table(["cases indexed", "index s", "cases/s", "queries", "s per query (k=5, gradcam, report)"],
                    [[nifti["cases"], f"{nifti['index_s']:.1f}", f"{nifti['index_cases_per_s']:.1f}", nifti["queries"],
                      f"{nifti['query_s_each']:.2f}"]]))
    path = write_json("formats", {"args": vars(args), "decode": decode, "nifti": nifti}, args.out)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
