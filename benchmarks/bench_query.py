"""Query latency: a warm query (model loaded) on a 10k-case base, k=5, with the similarity maps
of all 6 images, split by stage, against one batched forward pass of 6 images in the same run.

Interleaved with it, what each part costs: a forward of 1 then of 5 images (a query's own order:
its neighbours are known only once it is embedded), the query without rendering its report
(render=False, what lazy rendering saves) and the query without maps (explain="none"). The cold
CLI against the torch floor is benchmarks/bench_startup.py; --cold N adds N cold CLI runs here.

The case base holds real phantom cases (indexed with `index_dataset`) plus synthetic cases made
from them (their stored embeddings jittered and re-normalised, pointing at the same images), so
that search and database run at 10k scale while every neighbour has a real image to explain.

Run: .venv/bin/python benchmarks/bench_query.py [--cases 10000] [--queries 30] [--backbone mobilenet_v2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, median, percentile, table, write_json  # noqa: E402

STAGES = ["decode", "embed", "search", "vote", "explain", "database", "render"]
TARGET_RATIO = 1.2


def build_casebase(root: Path, backbone: str, n_cases: int, n_real: int, size: int, target_layer=None):
    from sqlalchemy import select

    from cbr.store.casebase import open_casebase
    from cbr.pipeline.calibration import calibrate
    from cbr.pipeline.index import index_dataset
    from cbr.store.member import rebuild_index, writer_lock
    from cbr.data.phantom import make_phantoms
    from cbr.store.schema import Case, Embedding, Explanation

    manifest = make_phantoms(root / "data", patients=max(1, n_real // 3), slices=3, size=size, seed=0)
    queries = make_phantoms(root / "queries", patients=12, slices=1, size=size, seed=99)
    cb = open_casebase(root / "cases.db")
    index_dataset(cb, manifest, models=[backbone], weights="none", num_workers=0, target_layer=target_layer)
    rng = np.random.default_rng(0)
    with cb.read() as s:
        real = s.scalars(select(Case)).all()
        emb = {e.case_id: (e.model_id, np.frombuffer(e.vector, dtype=np.float32)) for e in s.scalars(select(Embedding))}
        maps = {m.case_id: m for m in s.scalars(select(Explanation).where(Explanation.role == "case"))}
    model_id = next(iter(emb.values()))[0]
    extra = n_cases - len(real)
    batch = 2000
    for start in range(0, extra, batch):
        with cb.write() as s:
            for j in range(start, min(extra, start + batch)):
                src = real[j % len(real)]
                case = Case(sha256=hashlib.sha256(f"synthetic-{j}".encode()).hexdigest(), path=src.path,
                            label=src.label, group_id=f"S{j // 3}", meta={"synthetic": "1"})
                s.add(case)
                s.flush()
                v = emb[src.id][1] + rng.normal(0, 0.02, emb[src.id][1].shape).astype(np.float32)
                s.add(Embedding(case_id=case.id, model_id=model_id, vector=(v / np.linalg.norm(v)).astype(np.float32).tobytes()))
                m = maps[src.id]
                s.add(Explanation(model_id=model_id, case_id=case.id, role="case", method=m.method, target=m.target,
                                  height=m.height, width=m.width, dtype=m.dtype, scale=m.scale, data=m.data))
    with writer_lock(cb):
        index = rebuild_index(cb, model_id)
        calibrate(cb, model_id, index)
    return cb, sorted((queries.parent / "images").glob("*.png"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--real", type=int, default=60, help="real phantom cases the synthetic ones are made from")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--target-layer", default=None,
                    help="CAM layer (default: the backbone's; \"\" = the trunk output, the last block)")
    ap.add_argument("--cold", type=int, default=0, help="cold CLI runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from cbr.data.image import read_image
    from cbr.pipeline.query import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cb, images = build_casebase(root, a.backbone, a.cases, a.real, a.size, a.target_layer)
        build_s = time.perf_counter() - t0
        searcher = Searcher(cb, k=5, vote="weighted", explain="gradcam", out_dir=str(root / "reports"))
        emb = searcher.members[0].embedder
        batch6 = torch.stack([emb.preprocess(read_image(p)[0]) for p in images[:6]])
        for p in images[:2]:  # warm-up
            searcher.query(p)
        runs = {name: [] for name in VARIANTS}
        stages = {s: [] for s in STAGES}
        for i in range(a.queries):  # interleaved, so that load changes hit every variant alike
            image = images[i % len(images)]
            for name, fn in VARIANTS.items():
                t0 = time.perf_counter()
                ans = fn(searcher, emb, batch6, image)
                runs[name].append(time.perf_counter() - t0)
                if name == "warm":
                    for s in STAGES:
                        stages[s].append(ans.timings.get(s, 0.0))
        cold = []
        exe = str(Path(sys.executable).with_name("cbr"))
        for i in range(a.cold):
            t0 = time.perf_counter()
            subprocess.run([exe, "query", str(images[i]), "--db", str(root / "cases.db"), "--out", str(root / "cold")],
                           check=True, stdout=subprocess.DEVNULL)
            cold.append(time.perf_counter() - t0)
        cb.close()

    f6 = median(runs["forward6"])
    ratio = median(runs["warm"]) / f6
    rows = [[s, f"{median(v) * 1000:.1f}", f"{percentile(v, 0.95) * 1000:.1f}", ""] for s, v in stages.items()]
    for name, label in LABELS.items():
        v = runs[name]
        rows.append([label, f"{median(v) * 1000:.1f}", f"{percentile(v, 0.95) * 1000:.1f}", f"{median(v) / f6:.2f}"])
    rows.append([f"**ratio warm query / batched forward of 6** (goal <= {TARGET_RATIO})", "", "", f"{ratio:.2f}"])
    if cold:
        rows.append([f"cold `cbr query` CLI ({a.cold} runs)", f"{median(cold) * 1000:.0f}", f"{max(cold) * 1000:.0f}", ""])
    print(f"Query latency, {a.backbone} (random init) at {a.size} px, {a.cases} cases, k=5, gradcam similarity maps "
          f"for 6 images, {a.queries} warm queries; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}; {machine()}")
    print(f"(case base built in {build_s:.0f} s; CAM layer {emb.config.target_layer or 'the trunk output'})")
    print(table(["stage or variant", "median ms", "p95 ms", "/ forward of 6"], rows))
    write_json("query", {"args": vars(a), "median_ms": {s: median(v) * 1000 for s, v in stages.items()},
                         "p95_ms": {s: percentile(v, 0.95) * 1000 for s, v in stages.items()},
                         "variants_median_ms": {k: median(v) * 1000 for k, v in runs.items()},
                         "total_median_ms": median(runs["warm"]) * 1000,
                         "total_p95_ms": percentile(runs["warm"], 0.95) * 1000,
                         "forward6_median_ms": f6 * 1000, "ratio": ratio,
                         "load_average": os.getloadavg()[0],
                         "cold_cli_median_s": median(cold) if cold else None}, a.out)


def _forward6(searcher, emb, batch6, image):
    import torch

    with torch.inference_mode():
        emb(batch6)


def _forward_1_then_5(searcher, emb, batch6, image):
    # The dependency floor: the query must be embedded before its neighbours are known.
    import torch

    with torch.inference_mode():
        emb(batch6[:1])
        emb(batch6[1:])


VARIANTS = {
    "forward6": _forward6,
    "forward1+5": _forward_1_then_5,
    "warm": lambda searcher, emb, batch6, image: searcher.query(image),
    "no_render": lambda searcher, emb, batch6, image: searcher.query(image, render=False),
    "no_maps": lambda searcher, emb, batch6, image: searcher.with_options(explain="none").query(image, render=False),
}
LABELS = {
    "forward6": "one batched forward of 6 images",
    "forward1+5": "forward of 1, then of 5 (the order a query imposes)",
    "warm": "**warm query: maps of 6 images, report rendered**",
    "no_render": "warm query, maps recorded, report not rendered (render=False)",
    "no_maps": "warm query without maps or report (explain=none)",
}


if __name__ == "__main__":
    main()
