"""A large case base end to end: `cbr import` of N synthetic embeddings, then warm queries by embedding.

Run by hand, not by pytest (N = 1M: a 1 GB float16 matrix, ~2-4 GB of case base):

    .venv/bin/python benchmarks/bench_scale_e2e.py make --n 1000000 --work /work/runs/scale/e2e
    /usr/bin/time -v .venv/bin/cbr import /work/runs/scale/e2e/emb.npy --manifest /work/runs/scale/e2e/rows.csv \\
        --model resnet18 --weights none --fingerprint "$(cat /work/runs/scale/e2e/fingerprint)" \\
        --embedding-dtype float16 --index-type ivf-sq8 --db /work/runs/scale/e2e/cases.db
    .venv/bin/python benchmarks/bench_scale_e2e.py query --db /work/runs/scale/e2e/cases.db --work /work/runs/scale/e2e

The vectors come from bench_scale_stream.py's real-spectrum generator (the eigenvalues and mean
of cbr's own embeddings), d = 512, written a chunk at a time into an .npy opened as a memory map,
so no step holds them all. Labels are drawn at random among 7 classes (the vote is not what is
measured here); every row gives its sha256, so no image file is read. The model is resnet18 with
random weights ("--weights none"): only its dimension and fingerprint matter to `cbr import`.

``query`` opens the case base once, answers --warmup queries, then times --queries more: each a
fresh vector of the same distribution, answered by ``Searcher.query_embedding`` (``cbr query
--embedding``) with ``--explain none``, recorded like any query. It prints p50/p99 end to end,
the stages (search, vote, database), the page faults a query and the process's peak RSS (VmHWM).

``recall`` measures cbr's own search (``search_members``: the index as `cbr import` built it, its
nprobe and re-rank from the sidecar) against the exact answer: the best k stored rows by inner
product, found by streaming emb.npy a chunk at a time. It prints recall@k and the search's CPU per
query (p50), with the index's bytes a vector. The index is timed twice over the same queries: at
first each search pays the first touch of its candidates' pages of the sidecar, as in a `cbr
query` process; the repeat finds them mapped, as a long-lived `cbr serve` lane does (``--warmup N``
makes N other searches first). ``--nprobe`` and ``--factor`` trace other points of the front,
``--exclude N`` times searches that exclude N case ids, as a query by image does:

    .venv/bin/python benchmarks/bench_scale_e2e.py recall --db cases.db --work W --k 10 --queries 200
"""

import argparse
import csv
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale_stream import Chunks  # noqa: E402
from cbr.models.embedder import create_embedder  # noqa: E402
from cbr.pipeline.query import Searcher  # noqa: E402
import index as ix  # noqa: E402
from cbr.pipeline.search import exact_similarities, search_members, shortlist  # noqa: E402
from cbr.store.member import load_members  # noqa: E402
from cbr.store.schema import Case  # noqa: E402
from cbr.store.casebase import open_casebase  # noqa: E402

DIM = 512
MODEL = "resnet18"
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def make(a) -> None:
    """Write emb.npy (float16, n x 512), rows.csv (path,label,group,metadata,sha256) and fingerprint."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    chunks = Chunks("real", a.n, DIM, a.chunk, a.seed)
    out = np.lib.format.open_memmap(work / "emb.npy", mode="w+", dtype=np.float16, shape=(a.n, DIM))
    rng = np.random.default_rng(a.seed)
    t = time.perf_counter()
    with open(work / "rows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "metadata", "sha256"])
        for c in range(chunks.count):
            x, ids = chunks(c)
            out[ids[0]:ids[0] + len(ids)] = x
            labels = rng.integers(0, len(CLASSES), len(ids))
            for i, lab in zip(ids, labels):
                w.writerow([f"img/{i}.png", CLASSES[lab], f"P{i // 3}", "",
                            hashlib.sha256(f"case {i}".encode()).hexdigest()])
    out.flush()
    del out
    fp = create_embedder(MODEL, weights="none").fingerprint
    (work / "fingerprint").write_text(fp)
    print(json.dumps({"rows": a.n, "seconds": round(time.perf_counter() - t, 1), "fingerprint": fp,
                      "npy_bytes": (work / "emb.npy").stat().st_size, "csv_bytes": (work / "rows.csv").stat().st_size}))


def query(a) -> None:
    """Time warm queries by embedding, end to end, and report the process's peak memory."""
    chunks = Chunks("real", a.n or 1, DIM, 1000, a.seed)
    xq = chunks.draw(np.random.default_rng([a.seed, DIM, 2 * 10**9]), a.warmup + a.queries)
    t = time.perf_counter()
    cb = open_casebase(a.db, create=False, index_dir=a.index_dir)
    searcher = Searcher(cb, k=a.k, explain="none", render=False)
    opened = time.perf_counter() - t
    server0 = _server_cpu(a.pg_data)
    times, cpu, stages, faults = [], [], {}, []
    for i, v in enumerate(xq):
        t, c, f = time.perf_counter(), time.process_time(), _faults()
        answer = searcher.query_embedding([v], name=f"bench-query-{i}")
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            faults.append(np.subtract(_faults(), f))
            for k, s in answer.timings.items():
                stages.setdefault(k, []).append(s)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    print(json.dumps({"db": a.db, "queries": len(times), "k": a.k, "open_s": round(opened, 2),
                      "p50_ms": ms(times), "p99_ms": round(1000 * float(np.percentile(times, 99)), 2),
                      "max_ms": round(1000 * max(times), 2),
                      # page faults a query: minor (a page mapped from the page cache), major (read from disk)
                      "faults_p50": {"minor": float(np.median([f[0] for f in faults])),
                                     "major": float(np.median([f[1] for f in faults]))},
                      # this process's CPU (the database server's, for PostgreSQL, is not in it)
                      "cpu_p50_ms": ms(cpu), "cpu_p99_ms": round(1000 * float(np.percentile(cpu, 99)), 2),
                      # PostgreSQL's backends on this machine (warm-up included), per query: mean
                      "server_cpu_ms_per_query": round(1000 * (_server_cpu(a.pg_data) - server0) / len(xq), 2),
                      "stages_p50_ms": {k: ms(v) for k, v in stages.items()},
                      "peak_rss_mb": _vm("VmHWM"), "rss_mb": _vm("VmRSS"),
                      # of which the process's own memory; the rest is mapped files (the index's
                      # re-rank sidecar above all: page cache, shared by every query process)
                      "rss_anon_mb": _vm("RssAnon"), "rss_file_mb": _vm("RssFile"), "load": os.getloadavg()}, indent=1))


def recall(a) -> None:
    """cbr's search at k against the exact top k over the stored rows (emb.npy), and its CPU."""
    from sqlalchemy import select

    chunks = Chunks("real", a.n or 1, DIM, 1000, a.seed)
    # another stream than query's, so these vectors were never recorded as queries
    xq = chunks.draw(np.random.default_rng([a.seed, DIM, 3 * 10**9]), a.queries).astype(np.float32)
    cached = Path(a.work) / f"truth-k{a.k}-q{a.queries}-s{a.seed}.npy"  # the exact answer, once per emb.npy
    if cached.exists() and cached.stat().st_mtime > (Path(a.work) / "emb.npy").stat().st_mtime:
        truth = np.load(cached)
    else:
        truth = _exact_top(Path(a.work) / "emb.npy", xq, a.k, a.chunk)
        np.save(cached, truth)
    cb = open_casebase(a.db, create=False, index_dir=a.index_dir)
    member = load_members(cb)[0]
    index = member.index
    if a.nprobe:  # another point of the front, through the same search
        import faiss

        faiss.extract_index_ivf(index).nprobe = a.nprobe
    if a.factor:
        import cbr.pipeline.search as search

        search.FAST_SCAN_LARGE_RERANK_FACTOR = search.FAST_SCAN_RERANK_FACTOR = a.factor
    hits, cpu, index_cpu = [], [], []
    want = shortlist(a.k, index)
    with cb.read() as s:
        # --warmup queries of a third stream first: a long-lived process (a serve lane) has mapped
        # the sidecar's pages that a fresh one maps at its first touch of each
        for q in chunks.draw(np.random.default_rng([a.seed, DIM, 4 * 10**9]), a.warmup).astype(np.float32):
            search_members(s, [member], [q[None, :]], a.k, [])
        row_of, faults, repeat_cpu, repeat_faults = {}, [], [], []

        def index_alone(cpu_out, faults_out):  # its search, then the exact re-rank of its shortlist
            for q in xq:
                c, f = time.process_time(), _faults()
                _, ids = ix.search(index, q[None, :], want)
                exact_similarities(s, member.model_id, member.sidecar, q, ids[0][ids[0] >= 0])
                cpu_out.append(time.process_time() - c)
                faults_out.append(np.subtract(_faults(), f))

        index_alone(index_cpu, faults)
        # the same again: every page its shortlists touch is now mapped and in the page cache, so
        # this is the index's CPU apart from the page cache (a warm serve lane's, at best)
        index_alone(repeat_cpu, repeat_faults)
        for q in xq:  # cbr's search: the same, and the hits' case rows read
            c = time.process_time()
            found = search_members(s, [member], [q[None, :]], a.k, [])[0]
            cpu.append(time.process_time() - c)
            hits.append([h.case.id for h in found])
        # cbr's search without --exclude random case ids, as a query by image is searched without
        # its own image's cases (and, with --patient, the patient's)
        rng, excluded_cpu = np.random.default_rng([a.seed, 5]), []
        for q in xq if a.exclude else []:
            gone = sorted(set(rng.integers(1, int(index.ntotal) + 1, a.exclude).tolist()))
            c = time.process_time()
            search_members(s, [member], [q[None, :]], a.k, gone)
            excluded_cpu.append(time.process_time() - c)
        ids = sorted({i for h in hits for i in h})
        for i in range(0, len(ids), 10_000):
            for cid, path in s.execute(select(Case.id, Case.path).where(Case.id.in_(ids[i:i + 10_000]))):
                row_of[cid] = int(Path(path).stem)  # make writes img/<row>.png
    got = [[row_of[i] for i in h] for h in hits]
    rec = [len(set(g) & set(t.tolist())) / a.k for g, t in zip(got, truth)]
    # the newest generation's index file (the sidecar's .f16.npy/.ids.npy beside it are counted apart)
    files = sorted(Path(cb.index_dir).glob(f"model-{member.model_id}-*.faiss"), key=lambda f: f.stat().st_mtime)
    index_bytes = files[-1].stat().st_size if files else 0
    print(json.dumps({"db": a.db, "queries": len(xq), "warmup": a.warmup, "k": a.k,
                      "ntotal": int(index.ntotal),
                      "candidates": want, "nprobe": _nprobe(index),
                      "recall_at_k": round(float(np.mean(rec)), 4),
                      "index_cpu_p50_ms": round(1000 * statistics.median(index_cpu), 2),
                      "index_faults_p50": np.median(faults, axis=0).tolist(),  # (minor, major) a search
                      "index_cpu_repeat_p50_ms": round(1000 * statistics.median(repeat_cpu), 2),
                      "index_cpu_repeat_p90_ms": round(1000 * float(np.percentile(repeat_cpu, 90)), 2),
                      "index_faults_repeat_p50": np.median(repeat_faults, axis=0).tolist(),
                      "search_cpu_p50_ms": round(1000 * statistics.median(cpu), 2),
                      "search_cpu_p90_ms": round(1000 * float(np.percentile(cpu, 90)), 2),
                      "excluded": a.exclude,
                      "excluded_search_cpu_p50_ms": (round(1000 * statistics.median(excluded_cpu), 2)
                                                     if excluded_cpu else None),
                      "index_bytes": index_bytes, "bytes_per_vector": round(index_bytes / max(1, index.ntotal), 1),
                      "peak_rss_mb": _vm("VmHWM"), "load": os.getloadavg()}, indent=1))


def _nprobe(index):
    """The nprobe the searched index was given (None for a kind without lists)."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        return None


def _exact_top(path: Path, xq: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Row numbers of the k stored rows with the largest inner product with each query, exactly."""
    emb = np.load(path, mmap_mode="r")
    best_s = np.full((len(xq), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(xq), k), dtype=np.int64)
    for lo in range(0, emb.shape[0], chunk):
        scores = xq @ np.asarray(emb[lo:lo + chunk], dtype=np.float32).T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        i = np.concatenate([best_i, top + lo], 1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def _server_cpu(pg_data) -> float:
    """CPU seconds of the processes of the PostgreSQL server whose data folder is ``pg_data`` (its
    postmaster's children: the backends); 0 without one."""
    if not pg_data:
        return 0.0
    postmaster = Path(pg_data, "postmaster.pid").read_text().split()[0]
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] != postmaster:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


def _faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    m = sub.add_parser("make")
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--chunk", type=int, default=100_000)
    q = sub.add_parser("query")
    q.add_argument("--db", required=True)
    q.add_argument("--index-dir", default=None, help="where a PostgreSQL case base's index files are")
    q.add_argument("--pg-data", default=None, help="the PostgreSQL server's data folder: its backends' CPU is reported")
    q.add_argument("--n", type=int, default=0)
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--warmup", type=int, default=5)
    q.add_argument("--queries", type=int, default=20)
    r = sub.add_parser("recall")
    r.add_argument("--db", required=True)
    r.add_argument("--index-dir", default=None)
    r.add_argument("--n", type=int, default=0)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--queries", type=int, default=200)
    r.add_argument("--chunk", type=int, default=250_000)
    r.add_argument("--warmup", type=int, default=0, help="searches made before the timed ones")
    r.add_argument("--nprobe", type=int, default=0, help="lists probed instead of the index's own")
    r.add_argument("--factor", type=int, default=0, help="candidates a wanted hit instead of cbr's for fast-scan")
    r.add_argument("--exclude", type=int, default=0,
                   help="also time cbr's search with this many random case ids excluded (a query's own image)")
    for s in (m, q, r):
        s.add_argument("--work", default="/work/runs/scale/e2e")
        s.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    {"make": make, "query": query, "recall": recall}[a.step](a)


if __name__ == "__main__":
    main()
