"""How the index kinds scale: build time, peak RSS, bytes on disk, single-thread latency (median
and p99) and recall@10 vs flat, for flat, IVF, IVF-SQ8, IVF-PQ and HNSW (the kinds of `auto`).

Run by hand, not by pytest:

    .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --sizes 100000 1000000 --dims 1280 512 \\
        --out benchmarks/results/scale.json

Two datasets per size and dimension, both L2-normalised float32 like cbr's embeddings:
"random" (uniform on the sphere: the worst case for approximate search, since nothing clusters)
and "clustered" (a Gaussian mixture on the sphere, closer to real embeddings).

The run keeps to --budget-s of wall time. Work is done in order of importance, one dimension
at a time (d=512 first): flat and the IVF variants for every size, then HNSW, whose build is by
far the slowest on few cores, for whatever sizes still fit. A step whose estimated time does not
fit is skipped and reported as skipped, with the estimate: no figure is ever extrapolated into
the table. The default arguments finish in under 10 minutes on 2 cores.
"""

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

import index

LOG = logging.getLogger("bench_scale")

K = 10
CLUSTERS = 1000  # mixture components of the clustered dataset
# Norm of the noise added to a unit centre before normalising: a point keeps cosine ~0.7 with
# its centre and ~0.5 with its cluster mates, and ~0 with other clusters.
SPREAD = 1.0
NPROBES = (4, 8, 16, 32, 64)
EF_SEARCHES = (16, 32, 64, 128, 256)
LATENCY_SECONDS = 1.0  # per setting: single-thread latency is timed on at most this much work
MIN_LATENCY_QUERIES = 5
HNSW_CALIBRATION = 5000  # vectors built to estimate a full HNSW build before trying it


def main(argv=None):
    """Run the benchmark, print a markdown table and write JSON."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run = Run(args)
    # d=512 first (cbr's common case), all of it, before any larger dimension.
    for d in sorted(set(args.dims), key=lambda d: (d != 512, d)):
        configs = [(d, n, kind) for n in sorted(set(args.sizes)) for kind in args.datasets]
        for config in configs:
            run.flat_and_ivf(*config)
        for config in configs:
            run.hnsw(*config)
    run.finish()
    casebase_bytes(args.dims)


def casebase_bytes(dims, n=5000, map_side=7):
    """Bytes per case in a SQLite case base: the case row, its stored raw map and its embedding.

    Rows like real ones (an absolute path, a label, a patient, two metadata fields), measured as
    the growth of the database file after n inserts, split by table with SQLite's dbstat.
    """
    import hashlib
    import tempfile

    import numpy as np
    from sqlalchemy import text

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cbr.store.casebase import open_casebase
    from cbr.store.encoding import EMBEDDING_DTYPES, encode_vector
    from cbr.store.schema import Case, Embedding, Explanation, Model
    from common import table, write_json
    from explain.cam import encode_map

    rng = np.random.default_rng(0)
    rows, out = [], {}
    for d, dtype in [(d, t) for d in dims for t in EMBEDDING_DTYPES]:
        with tempfile.TemporaryDirectory() as tmp:
            cb = open_casebase(Path(tmp) / "cases.db")
            with cb.write() as s:
                m = Model(fingerprint="0" * 64, backbone="bench", weights="none", source="bench", config={})
                s.add(m)
                s.flush()
                for i in range(n):
                    c = Case(sha256=hashlib.sha256(str(i).encode()).hexdigest(), label=f"class{i % 7}",
                             path=f"/data/archive/ham10000/images/ISIC_{i:07d}.jpg", group_id=f"HAM_{i // 3:07d}",
                             meta={"dx_type": "histo", "localization": "back"})
                    s.add(c)
                    s.flush()
                    v = rng.normal(size=d).astype(np.float32)
                    s.add(Embedding(case_id=c.id, model_id=m.id, vector=encode_vector(v / np.linalg.norm(v), dtype)))
                    data, shape, scale = encode_map(rng.random((map_side, map_side)).astype(np.float32))
                    s.add(Explanation(model_id=m.id, case_id=c.id, role="case", method="gradcam", target="class:class0",
                                      height=shape[0], width=shape[1], dtype="float16", scale=scale, data=data))
            with cb.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                try:
                    per_table = dict(conn.execute(text(
                        "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")).all())
                except Exception:  # SQLite built without dbstat
                    per_table = {}
            size = (Path(tmp) / "cases.db").stat().st_size
            cb.close()

        def b(*names):
            return sum(v for k, v in per_table.items() if any(k == nm or k.startswith(f"ix_{nm}") or k.startswith(f"sqlite_autoindex_{nm}") for nm in names)) / n

        got = out[f"{d}-{dtype}"] = {"total": size / n, "cases": b("cases"), "explanations": b("explanations"),
                                     "embeddings": b("embeddings"), "raw_map_data": map_side * map_side * 2}
        rows.append([d, dtype, f"{map_side}x{map_side}", f"{got['raw_map_data']}", f"{got['explanations']:.0f}",
                     f"{got['cases']:.0f}", f"{got['embeddings']:.0f}", f"{got['total']:.0f}"])
    print(f"\nCase base bytes per case (SQLite, {n} cases; tables with their indexes)")
    print(table(["dim", "embedding dtype", "map", "raw map bytes", "map row (table+index)", "case row", "embedding row", "whole file / case"], rows))
    write_json("casebase_bytes", {"n": n, "per_dim": out})


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1280])
    p.add_argument("--datasets", nargs="+", default=["clustered", "random"],
                   choices=["clustered", "random"])
    p.add_argument("--queries", type=int, default=100, help="queries for recall (default 100)")
    p.add_argument("--max-nlist", type=int, default=512,
                   help="cap on IVF lists: k-means and assignment dominate the IVF build on few "
                   "cores (default 512)")
    p.add_argument("--train-per-list", type=int, default=24,
                   help="k-means training vectors per IVF list (default 24)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-time budget; steps that would not fit are skipped (default 540)")
    p.add_argument("--out", default="benchmarks/results/scale.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Run:
    """Rows measured so far, the steps skipped, and the clock."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.load_before = os.getloadavg()
        self.threads = faiss.omp_get_max_threads()
        self.rows = []
        self.skipped = []
        self.truth = {}  # (d, n, kind) -> (queries, exact neighbours), for the HNSW phase
        self.rates = {}  # step -> seconds per unit of work, to estimate the next step
        # (d, dataset) -> (n, seconds per vector) of the largest HNSW built so far. Per dataset:
        # random vectors make a far slower graph to build than clustered ones.
        self.hnsw_rate = {}

    def left(self):
        return self.args.budget_s - (time.perf_counter() - self.start)

    def skip(self, what, why):
        LOG.info("SKIPPED %s: %s", what, why)
        self.skipped.append({"what": what, "why": why})
        return False

    def estimate(self, work):
        """Seconds for {step: units}, or None while some step has never been timed."""
        if any(step not in self.rates for step in work):
            return None
        return sum(self.rates[step] * units for step, units in work.items())

    def fits(self, what, work):
        """Whether the estimated work fits in the time left; records a skip if not."""
        est = self.estimate(work)
        if est is None:
            return self.left() > 0 or self.skip(what, "time budget spent")
        if 1.2 * est > self.left():
            return self.skip(what, f"estimated {est:.0f} s (+20% margin) > {self.left():.0f} s left")
        return True

    def timed(self, step, units, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        seconds = time.perf_counter() - t
        self.rates[step] = seconds / max(units, 1)
        return out, seconds

    def flat_and_ivf(self, d, n, kind):
        name = f"{kind} n={n} d={d}"
        nlist = min(index.vectors.nlist_for(n), self.args.max_nlist)
        work = {"data": n * d, "flat": n * d, "train": nlist * nlist * d,
                "assign": n * nlist * d, "ivf": n * d}
        if not self.fits(f"flat+ivf {name}", work):
            return
        need = 2.6 * n * d * 4  # data, flat copy, IVF copy
        if need > _available_bytes():
            return self.skip(f"flat+ivf {name}", f"needs ~{need / 2**30:.1f} GiB of memory")

        LOG.info("%s: generating", name)
        (xb, xq), _ = self.timed("data", n * d, dataset, kind, n, d, self.args.queries,
                                 self.args.seed)
        xids = np.arange(n, dtype=np.int64)

        LOG.info("%s: flat", name)
        rss = _rss()
        ix = index.build(d, "flat")
        (_, build_s) = self.timed("flat", n * d, index.add, ix, xb, xids)
        grew = _rss() - rss
        t = time.perf_counter()
        _, Iref = index.search(ix, xq, K)
        self.rates["flat"] += (time.perf_counter() - t) / (n * d)
        self.truth[(d, n, kind)] = (xq, Iref)
        self.row(kind, n, d, "flat", "exact", build_s, _size(ix), grew,
                 _latency(lambda q: index.search(ix, q, K), xq, self.threads), Iref, Iref)
        del ix

        del work["data"], work["flat"]
        if not self.fits(f"ivf {name}", work):
            return
        # Both IVF variants share one coarse quantizer and one assignment, timed once and
        # counted in each build time: each figure is what that index costs to build alone.
        LOG.info("%s: IVF%d training", name, nlist)
        rng = np.random.default_rng(self.args.seed + 1)
        sample = xb[np.sort(rng.choice(n, min(n, nlist * self.args.train_per_list), False))]
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = 1  # no warning for a deliberately small sample
        _, train_s = self.timed("train", nlist * nlist * d, ivf.train, sample)
        LOG.info("%s: assigning %d vectors", name, n)
        (_, assign), assign_s = self.timed("assign", n * nlist * d, quantizer.search, xb, 1)
        assign = assign.ravel()

        t_ivf = time.perf_counter()
        rss = _rss()
        t = time.perf_counter()
        add_preassigned(ivf, xb, assign, xids)
        self.sweep(kind, n, d, f"ivf IVF{nlist},Flat", ivf, train_s + assign_s
                   + time.perf_counter() - t, _rss() - rss, xq, Iref)
        del ivf

        sq_quantizer = faiss.clone_index(quantizer)
        sq = faiss.IndexIVFScalarQuantizer(sq_quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        rss = _rss()
        t = time.perf_counter()
        sq.train(sample)  # only the scalar quantizer: the coarse one is already trained
        add_preassigned(sq, xb, assign, xids)
        self.sweep(kind, n, d, f"ivf-sq8 IVF{nlist},SQ8", sq, train_s + assign_s
                   + time.perf_counter() - t, _rss() - rss, xq, Iref)
        del sq, sq_quantizer

        # IVF-PQ, as index.sizing builds it past AUTO_SQ8_BELOW: pq_bytes(d) code bytes a vector.
        m = index.pq_bytes(d)
        pq = faiss.IndexIVFPQ(faiss.clone_index(quantizer), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        pq.do_polysemous_training = False
        rss = _rss()
        t = time.perf_counter()
        pq.train(np.ascontiguousarray(xb[:max(len(sample), 256 * 40)]))  # PQ needs 256 points a centroid set
        add_preassigned(pq, xb, assign, xids)
        self.sweep(kind, n, d, f"ivf-pq IVF{nlist},PQ{m}", pq, train_s + assign_s
                   + time.perf_counter() - t, _rss() - rss, xq, Iref)
        self.rates["ivf"] = (time.perf_counter() - t_ivf) / (n * d)
        del pq, quantizer

    def sweep(self, kind, n, d, label, ivf, build_s, grew, xq, Iref):
        size = _size(ivf)
        for nprobe in NPROBES:
            if nprobe > ivf.nlist:
                break
            ivf.nprobe = nprobe
            _, I = ivf.search(xq, K)
            lat = _latency(lambda q: ivf.search(q, K), xq, self.threads)
            self.row(kind, n, d, label, f"nprobe={nprobe}", build_s, size, grew, lat, I, Iref)

    def hnsw(self, d, n, kind):
        name = f"hnsw {kind} n={n} d={d}"
        if (d, n, kind) not in self.truth:
            return self.skip(name, "no exact neighbours: flat was skipped")
        if (d, kind) not in self.hnsw_rate and n > HNSW_CALIBRATION:
            if self.left() < 60:
                return self.skip(name, f"{self.left():.0f} s left, too little to calibrate")
            xb, _ = dataset(kind, HNSW_CALIBRATION, d, 1, self.args.seed)
            ix = index.build(d, "hnsw")
            t = time.perf_counter()
            index.add(ix, xb, np.arange(HNSW_CALIBRATION))
            per_vector = (time.perf_counter() - t) / HNSW_CALIBRATION
            self.hnsw_rate[(d, kind)] = (HNSW_CALIBRATION, per_vector)
            LOG.info("HNSW %s d=%d: %.2f ms per vector at %d vectors", kind, d,
                     1000 * per_vector, HNSW_CALIBRATION)
            del ix, xb
        est = 0.0
        if (d, kind) in self.hnsw_rate:
            # Each insert searches a bigger graph with more cache misses: on this 2-core machine
            # the cost per vector grew as about n ** (1/3) (2.6x from 5k to 100k vectors at d=512),
            # faster than the textbook log(n).
            n_ref, per_vector = self.hnsw_rate[(d, kind)]
            est = per_vector * n * (n / n_ref) ** (1 / 3)
            est += self.rates["data"] * n * d
        if 1.2 * est > self.left():
            return self.skip(name, f"build estimated at {est:.0f} s (+20% margin) "
                             f"> {self.left():.0f} s left")

        LOG.info("%s: building (estimated %.0f s)", name, est)
        xb, _ = dataset(kind, n, d, self.args.queries, self.args.seed)
        xq, Iref = self.truth[(d, n, kind)]
        rss = _rss()
        ix = index.build(d, "hnsw")
        t = time.perf_counter()
        index.add(ix, xb, np.arange(n, dtype=np.int64))
        build_s = time.perf_counter() - t
        grew = _rss() - rss
        if n > self.hnsw_rate.get((d, kind), (0, 0))[0]:
            self.hnsw_rate[(d, kind)] = (n, build_s / n)
        del xb
        size = _size(ix)
        inner = faiss.downcast_index(ix.index)
        label = f"hnsw HNSW{inner.hnsw.nb_neighbors(1)},efC={inner.hnsw.efConstruction}"
        for ef in EF_SEARCHES:
            inner.hnsw.efSearch = ef
            _, I = index.search(ix, xq, K)
            lat = _latency(lambda q: index.search(ix, q, K), xq, self.threads)
            self.row(kind, n, d, label, f"efSearch={ef}", build_s, size, grew, lat, I, Iref)

    def row(self, kind, n, d, label, setting, build_s, size, grew, lat, I, Iref):
        ms, p99, nlat = lat
        r = {"dataset": kind, "n": n, "d": d, "index": label, "setting": setting,
             "build_s": round(build_s, 2), "index_mb": round(size / 2**20, 1),
             "bytes_per_vector": round(size / n, 1), "rss_growth_mb": round(grew / 2**20, 1),
             "peak_rss_mb": round(_peak_rss() / 2**20), "median_ms": round(ms, 3), "p99_ms": round(p99, 3),
             "latency_queries": nlat, "recall_at_10": round(_recall(I, Iref), 4)}
        LOG.info("%s", r)
        self.rows.append(r)

    def finish(self):
        elapsed = time.perf_counter() - self.start
        table = markdown(self.rows)
        lines = [table, ""]
        lines += [f"- skipped {s['what']}: {s['why']}" for s in self.skipped]
        lines.append(f"- clustered = {CLUSTERS} well-separated Gaussian clusters on the sphere "
                     f"(noise norm {SPREAD} x centre): the easy case, where IVF lists line up with "
                     "clusters; random = uniform on the sphere: the worst case. Real embeddings "
                     "lie between the two.")
        lines.append(target_verdict(self.rows))
        load = os.getloadavg()
        lines.append(f"- total {elapsed:.0f} s on {os.cpu_count()} cores, faiss {faiss.__version__}; "
                     f"latency = median and p99 over single-thread queries (faiss.omp_set_num_threads(1))")
        # Other work on the machine slows every figure down: say how busy it was.
        lines.append(f"- load average (1 min) {self.load_before[0]:.1f} at start, "
                     f"{load[0]:.1f} at end")
        print("\n".join(lines))
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "args": vars(self.args), "elapsed_s": round(elapsed, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "faiss": faiss.__version__,
                        "numpy": np.__version__, "loadavg_start": self.load_before,
                        "loadavg_end": os.getloadavg()},
            "clustered": {"clusters": CLUSTERS, "spread": SPREAD},
            "rows": self.rows, "skipped": self.skipped,
        }, indent=1))
        print(f"\nwrote {out}")


def dataset(kind, n, d, nq, seed):
    """Return (base, queries) of L2-normalised float32 vectors; queries are fresh draws."""
    rng = np.random.default_rng([seed, n, d, kind == "clustered"])
    x = rng.standard_normal((n + nq, d), dtype=np.float32)
    if kind == "clustered":
        centres = rng.standard_normal((CLUSTERS, d), dtype=np.float32)
        faiss.normalize_L2(centres)
        labels = rng.integers(0, CLUSTERS, n + nq)
        step = 100_000  # in blocks: a million-row temporary would double the memory peak
        for i in range(0, n + nq, step):
            block = x[i:i + step]
            block *= SPREAD / math.sqrt(d)
            block += centres[labels[i:i + step]]
    faiss.normalize_L2(x)
    return x[:n], np.ascontiguousarray(x[n:])


def markdown(rows):
    """Rows as a markdown table."""
    head = ("| dataset | n | d | index | setting | build s | bytes on disk /vector | RSS +MB | peak RSS MB "
            "| p50 ms (1 thread) | p99 ms | queries timed | recall@10 |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['n']:,} | {r['d']} | {r['index']} | {r['setting']} "
                   f"| {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['rss_growth_mb']:.0f} "
                   f"| {r['peak_rss_mb']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} "
                   f"| {r['latency_queries']} | {r['recall_at_10']:.3f} |")
    return "\n".join(out)


def target_verdict(rows):
    """One line on the target: an approximate index at >= 1M with recall >= 0.95 under 2 ms."""
    big = [r for r in rows if r["n"] >= 1_000_000 and r["setting"] != "exact"]
    if not big:
        return "- target (1M vectors, recall@10 >= 0.95, < 2 ms/query): NOT MEASURED in this run"
    hits = [r for r in big if r["recall_at_10"] >= 0.95 and r["median_ms"] < 2.0]
    if not hits:
        return "- target (1M vectors, recall@10 >= 0.95, < 2 ms/query): NOT MET by any measured index"
    return "- target (1M vectors, recall@10 >= 0.95, < 2 ms/query) met by: " + "; ".join(
        f"{r['dataset']} d={r['d']} {r['index']} {r['setting']} "
        f"({r['recall_at_10']:.3f}, {r['median_ms']:.2f} ms)" for r in hits)


def _latency(search_one, xq, threads):
    """(median ms, p99 ms, queries timed): one query at a time on one thread, within LATENCY_SECONDS
    (p99 of fewer than 100 queries is their slowest)."""
    faiss.omp_set_num_threads(1)
    try:
        search_one(xq[:1])  # warm-up: first touch of the index pages
        times = []
        start = time.perf_counter()
        for i in range(len(xq)):
            t = time.perf_counter()
            search_one(xq[i:i + 1])
            times.append(time.perf_counter() - t)
            if len(times) >= MIN_LATENCY_QUERIES and time.perf_counter() - start > LATENCY_SECONDS:
                break
    finally:
        faiss.omp_set_num_threads(threads)
    return 1000 * statistics.median(times), 1000 * float(np.percentile(times, 99)), len(times)


def _recall(I, Iref):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I, Iref)]))


def _size(ix):
    """Serialised size in bytes, counted without holding a second copy in memory."""
    total = 0

    def count(chunk):
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(ix, faiss.PyCallbackIOWriter(count))
    return total


def _peak_rss():
    """The process's peak resident set so far (ru_maxrss), in bytes: what the machine must hold."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return sys.maxsize


if __name__ == "__main__":
    main()
