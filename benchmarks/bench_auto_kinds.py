"""cbr's own index kinds side by side, as `cbr` builds and searches them: recall@10 after exact
re-ranking, single-thread CPU per query, bytes per vector. What `auto` (index/sizing.py) chooses
between.

Run by hand, not by pytest (minutes at 200k x 512 on one core):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_auto_kinds.py --n 200000 --kinds ivf-sq8 ivf-pq-fs

Each kind is built with `index.build(kind, n_hint=n)`, trained on an even sample of at most 250k
vectors (as `cbr index --rebuild` trains), filled, then asked, per query, for the shortlist a
k = 10 query asks (`cbr.pipeline.search.shortlist`: 10 x its re-ranking factor, 50 for PQ/SQ codes,
200 for fast-scan, 400 for fast-scan from 3M vectors), which are re-ranked by the exact vectors (held in memory here; cbr reads them from the case base, which
this does not time). Data: bench_scale_stream.py's generator with the spectrum of cbr's own
embeddings (``--data real``), or ``powerlaw``.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import index  # noqa: E402
from bench_scale_stream import Chunks  # noqa: E402
from cbr.pipeline.search import shortlist  # noqa: E402

K = 10
TRAIN = 250_000


def measure(kind, x, ids, q, truth):
    t, c = time.perf_counter(), time.process_time()
    ix = index.build(x.shape[1], kind, n_hint=len(x))
    if not ix.is_trained:
        index.train(ix, x[::max(1, len(x) // TRAIN)], n=len(x))
    train_cpu = time.process_time() - c
    for s in range(0, len(x), 100_000):
        index.add(ix, x[s:s + 100_000], ids[s:s + 100_000])
    build = (time.perf_counter() - t, time.process_time() - c)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(ix, Path(tmp) / "ix.faiss")
        size = os.path.getsize(Path(tmp) / "ix.faiss")
    depth = shortlist(K, ix)
    found, cpu = [], []
    for i in range(len(q)):
        c = time.thread_time()
        _, cand = index.search(ix, q[i:i + 1], depth)
        cand = cand[0][cand[0] >= 0]
        best = cand[np.argsort(-(x[cand] @ q[i]), kind="stable")[:K]]
        cpu.append(time.thread_time() - c)
        found.append(best)
    rec = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / K for f, g in zip(found, truth)]))
    ivf = faiss.extract_index_ivf(ix) if faiss.try_extract_index_ivf(ix) is not None else None
    return {"kind": kind, "factory": index.factory_for(kind, x.shape[1], len(x)), "n": len(x),
            "nlist": ivf.nlist if ivf else None, "nprobe": ivf.nprobe if ivf else None, "candidates": depth,
            "recall_at_10": round(rec, 4), "cpu_p50_ms": round(1000 * statistics.median(cpu), 3),
            "cpu_p99_ms": round(1000 * float(np.percentile(cpu, 99)), 3),
            "bytes_per_vector": round(size / len(x), 1), "train_cpu_s": round(train_cpu, 1),
            "build_wall_s": round(build[0], 1), "build_cpu_s": round(build[1], 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=["real", "powerlaw"], default="real")
    p.add_argument("--kinds", nargs="+", default=["ivf-sq8", "ivf-pq-fs"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/auto_kinds.json")
    a = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    chunks = Chunks(a.data, a.n, a.dim, 100_000)
    parts = [chunks(c) for c in range(chunks.count)]
    x = np.concatenate([v for v, _ in parts])
    ids = np.concatenate([i for _, i in parts])
    q = chunks.queries(a.queries)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K]
    rows = []
    for kind in a.kinds:
        rows.append(measure(kind, x, ids, q, ids[truth]))
        print(json.dumps(rows[-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
