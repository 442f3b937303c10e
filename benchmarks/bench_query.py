"""Query latency: a warm query (model loaded) on a 10k-case base, k=5, with the similarity maps
of all 6 images, split by stage, against one batched forward pass of 6 images in the same run;
and the cold `cbr query` CLI wall time.

The case base holds real phantom cases (indexed with `index_dataset`) plus synthetic cases made
from them (their stored embeddings jittered and re-normalised, pointing at the same images), so
that search and database run at 10k scale while every neighbour has a real image to explain.

Run: .venv/bin/python benchmarks/bench_query.py [--cases 10000] [--queries 30] [--backbone mobilenet_v2]
"""

from __future__ import annotations

import argparse
import hashlib
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


def build_casebase(root: Path, backbone: str, n_cases: int, n_real: int, size: int):
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
    index_dataset(cb, manifest, models=[backbone], weights="none", num_workers=0)
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
    ap.add_argument("--cold", type=int, default=3, help="cold CLI runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from cbr.pipeline.query import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cb, images = build_casebase(root, a.backbone, a.cases, a.real, a.size)
        build_s = time.perf_counter() - t0
        searcher = Searcher(cb, k=5, vote="weighted", explain="gradcam", out_dir=str(root / "reports"))
        emb = searcher.members[0].embedder
        batch6 = torch.stack([emb.preprocess(__import__("cbr.data.image", fromlist=["read_image"]).read_image(p)[0]) for p in images[:6]])
        for p in images[:2]:  # warm-up
            searcher.query(p)
        totals, forward, stages = [], [], {s: [] for s in STAGES}
        for i in range(a.queries):
            t0 = time.perf_counter()
            with torch.inference_mode():
                emb(batch6)
            forward.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ans = searcher.query(images[i % len(images)])
            totals.append(time.perf_counter() - t0)
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

    ratio = median(totals) / median(forward)
    rows = [[s, f"{median(v) * 1000:.1f}", f"{percentile(v, 0.95) * 1000:.1f}"] for s, v in stages.items()]
    rows.append(["**total (warm query)**", f"{median(totals) * 1000:.1f}", f"{percentile(totals, 0.95) * 1000:.1f}"])
    rows.append(["one batched forward of 6 images", f"{median(forward) * 1000:.1f}", f"{percentile(forward, 0.95) * 1000:.1f}"])
    rows.append([f"ratio warm/forward (target <= {TARGET_RATIO})", f"{ratio:.2f}", ""])
    rows.append([f"cold `cbr query` CLI ({a.cold} runs)", f"{median(cold) * 1000:.0f}", f"{max(cold) * 1000:.0f}"])
    print(f"Query latency, {a.backbone} (random init) at {a.size} px, {a.cases} cases, k=5, gradcam similarity maps "
          f"for 6 images, {a.queries} warm queries; torch threads {torch.get_num_threads()}; {machine()}")
    print(f"(case base built in {build_s:.0f} s)")
    print(table(["stage", "median ms", "p95 ms"], rows))
    write_json("query", {"args": vars(a), "median_ms": {s: median(v) * 1000 for s, v in stages.items()},
                         "p95_ms": {s: percentile(v, 0.95) * 1000 for s, v in stages.items()},
                         "total_median_ms": median(totals) * 1000, "total_p95_ms": percentile(totals, 0.95) * 1000,
                         "forward6_median_ms": median(forward) * 1000, "ratio": ratio,
                         "cold_cli_median_s": median(cold)}, a.out)


if __name__ == "__main__":
    main()
