"""Streamed IVF-PQ at 10M vectors: parallel shards merged on disk, a float16 sidecar, re-ranking.

Run by hand, not by pytest (a work folder of ~11 GB at 10M x 512):

    .venv/bin/python benchmarks/bench_scale_stream.py --n 1000000 --work /tmp/scale
    nohup .venv/bin/python benchmarks/bench_scale_stream.py --n 10000000 --nlist 4096 \\
        --work /tmp/scale10m --out benchmarks/results/scale_stream_10m.json > /tmp/scale10m.log 2>&1 &
    .venv/bin/python benchmarks/bench_scale_stream.py --real-spectrum 600   # cbr's embeddings, for comparison

The vectors are never all in memory: chunk c is drawn from a generator seeded by (seed, c), in
whichever process needs it. Steps: train IVF-PQ on the first chunks (the draws are i.i.d., so
they are a uniform sample), fill it in parallel shards (`index.shards`) while each worker also
writes its chunks' float16 rows to the sidecar (`index.refine`), merge the shards on disk, compute
the exact top 10 of the queries by streaming the chunks again, then time single-thread queries
(faiss.omp_set_num_threads(1)) for each nprobe and re-ranking factor R (R=0: the PQ order alone).

Families: `--pq MxBITS` (e.g. 64x6), `--pq Mx4fs` (4-bit fast-scan PQ: packed lists that faiss
cannot merge on disk, so filled in memory in this process; 32 B of codes per vector at 64x4fs),
`--coarse hnsw` (an HNSW32 graph over the centroids, for 16k+ lists) and `--opq` (a learnt
rotation first); all re-rank from the same float16 sidecar.

    .venv/bin/python benchmarks/bench_scale_stream.py --n 1000000 --nlist 1024 --pq 64x4fs --threads 1 \
        --factors 0 20 50 --work /tmp/scale
    .venv/bin/python benchmarks/bench_scale_stream.py --n 1000000 --nlist 4096 --coarse hnsw --pq 64x4fs \
        --threads 1 --factors 0 50 100 200 --work /tmp/scale

Data ("--data"):
- powerlaw (default): Gaussian with eigenvalues lambda_i = i^-alpha in a random orthonormal basis,
  L2-normalised. alpha = 1 is a generic choice, not fitted to our data: the spectra of trained
  deep-network representations decay as a power law with exponent near 1 (Stringer et al.,
  Nature 2019, for visual cortex and CNNs; Agrawal et al., NeurIPS 2022, "alpha-ReQ", for
  self-supervised image embeddings). `--real-spectrum` measures cbr's own embeddings beside it.
- real: Gaussian with the eigenvalues and mean measured on cbr's own embeddings (SPECTRUM_FILE,
  written by `--real-spectrum 800 --spectrum-out FILE`): the measured eigenvalues up to rank
  images/4, the fitted power law beyond, and the mean (75 % of the squared length of ImageNet
  MobileNetV2 embeddings of HAM10000), in a random basis, L2-normalised.

    .venv/bin/python benchmarks/bench_scale_stream.py --data real --n 10000000 --nlist 4096 --coarse hnsw \
        --opq --pq 64x4fs --train 65536 --niter 10 --threads 1 --nprobes 32 64 128 256 --factors 0 20 50 100

  Another index over the same vectors (same --data, --n, --dim, --seed) reuses the first run's
  float16 sidecar and exact truth (`--sidecar`, checked against the generator) instead of writing
  10 GB again, and may take its trained OPQ rotation (`--opq-from`); `--opq-dim` rotates onto
  fewer dimensions than d (a multiple of M):

    .venv/bin/python benchmarks/bench_scale_stream.py --data real --n 10000000 --nlist 4096 --opq --opq-dim 480 \
        --pq 96x4fs --train 262144 --niter 10 --workers 1 --threads 1 --nprobes 128 160 192 --factors 300 400 \
        --work W96 --sidecar W/real-10000000-512-OPQ64_512-IVF4096-PQ64x4fs.sidecar
- clustered: bench_scale.py's 1000 Gaussian clusters with isotropic noise. In 512 dimensions that
  noise makes a point's 10 nearest neighbours almost equidistant (cosines within ~0.03), so no
  compressed code can order them: a worst case for PQ, reported as such.
"""

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import index  # noqa: E402
from index import refine, shards  # noqa: E402

LOG = logging.getLogger("bench_scale_stream")
K = 10
ALPHA = 1.0
CLUSTERS, SPREAD = 1000, 1.0  # as bench_scale.py's clustered data


class Chunks:
    """Chunk c (rows c*size ..) of n unit vectors, regenerated from (seed, c) on demand."""

    _basis = {}

    def __init__(self, data, n, dim, size, seed=0, alpha=ALPHA):
        self.data, self.n, self.dim, self.size, self.seed, self.alpha = data, n, dim, size, seed, alpha

    @property
    def count(self):
        return -(-self.n // self.size)

    def __call__(self, c):
        rows = min(self.size, self.n - c * self.size)
        x = self.draw(np.random.default_rng([self.seed, self.dim, c]), rows)
        return x, np.arange(c * self.size, c * self.size + rows, dtype=np.int64)

    def queries(self, m):
        """Fresh draws from the same distribution, not in the base."""
        return self.draw(np.random.default_rng([self.seed, self.dim, 10**9]), m)

    def draw(self, rng, rows):
        x = rng.standard_normal((rows, self.dim), dtype=np.float32)
        if self.data == "powerlaw":
            x *= (np.arange(1, self.dim + 1, dtype=np.float32) ** (-self.alpha / 2))
            x = x @ self.basis()
        elif self.data == "real":
            scale, mean = real_scales(self.dim)
            x *= scale
            x = x @ self.basis()
            x += mean * self.basis()[-1]  # the mean: a direction beyond the top ranks' (their variance is tiny)
        else:
            centres = self.centres()
            x *= SPREAD / np.sqrt(self.dim)
            x += centres[rng.integers(0, CLUSTERS, rows)]
        faiss.normalize_L2(x)
        return x

    def basis(self):
        key = (self.seed, self.dim)
        if key not in Chunks._basis:  # once per process: a random rotation, the same everywhere
            g = np.random.default_rng([self.seed, self.dim, 7]).standard_normal((self.dim, self.dim))
            Chunks._basis[key] = np.linalg.qr(g)[0].T.astype(np.float32)
        return Chunks._basis[key]

    def centres(self):
        key = ("c", self.seed, self.dim)
        if key not in Chunks._basis:
            c = np.random.default_rng([self.seed, self.dim, 8]).standard_normal((CLUSTERS, self.dim))
            Chunks._basis[key] = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        return Chunks._basis[key]


class IntoSidecar:
    """A shard worker's source: each chunk also goes, as float16, into its rows of the sidecar,
    and the chunk's exact top K for the queries into truth/<c>.npz (one pass over the data, not two;
    the seconds this takes are recorded and taken out of the build time)."""

    def __init__(self, chunks, base, queries, truth_dir):
        self.chunks, self.base, self.queries, self.truth_dir = chunks, base, queries, truth_dir

    def __call__(self, c):
        x, ids = self.chunks(c)
        refine.put_rows(self.base, int(ids[0]), x, ids)
        t = time.perf_counter()
        s = self.queries @ x.T
        top = np.argpartition(-s, K, axis=1)[:, :K]
        np.savez(Path(self.truth_dir) / f"{c}.npz", d=np.take_along_axis(s, top, 1), i=ids[top],
                 seconds=time.perf_counter() - t)
        return x, ids


def main(argv=None):
    """Build, measure, print a markdown table and write JSON."""
    a = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.real_spectrum:
        measured = real_spectrum(a.real_spectrum)
        if a.spectrum_out:
            Path(a.spectrum_out).write_text(json.dumps(measured, indent=1))
        return print(json.dumps({k: v for k, v in measured.items() if k != "eigenvalues"}, indent=1))
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    chunks = Chunks(a.data, a.n, a.dim, a.chunk, a.seed, a.alpha)
    m = a.pq or str(index.pq_bytes(a.dim))
    nlist = a.nlist or min(index.vectors.nlist_for(a.n), 4096)
    coarse = "_HNSW32" if a.coarse == "hnsw" else ""  # an HNSW graph over the centroids finds the lists
    factory = f"IVF{nlist}{coarse},PQ{m}"
    if a.opq:  # a learnt rotation onto --opq-dim dimensions, or the largest multiple of M <= d
        mm = int(m.split("x")[0])
        factory = f"OPQ{mm}_{a.opq_dim or a.dim // mm * mm},{factory}"
    name = f"{a.data}-{a.n}-{a.dim}-{factory.replace(',', '-')}"
    path, side = work / f"{name}.index", Path(a.sidecar) if a.sidecar else work / f"{name}.sidecar"
    faiss.omp_set_num_threads(a.threads)
    out = {"args": vars(a), "factory": factory, "spectrum": generated_spectrum(chunks)}
    xq = chunks.queries(a.queries)
    truth_dir = side.parent / f"{a.data}-{a.n}-{a.dim}-truth-{a.queries}" if a.sidecar else \
        work / f"{a.data}-{a.n}-{a.dim}-truth-{a.queries}"
    if a.sidecar:
        check_reused(chunks, side, truth_dir)
    truth_dir.mkdir(exist_ok=True)

    if a.reuse and path.exists():
        LOG.info("reusing %s", path)
    else:
        LOG.info("%s: training on %d vectors", name, a.train)
        t = time.perf_counter()
        sample = np.concatenate([chunks(c)[0] for c in range(-(-a.train // a.chunk))])[:a.train]
        ix = faiss.index_factory(a.dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(ix))
        if hasattr(ivf, "do_polysemous_training"):  # not on fast scan
            ivf.do_polysemous_training = False  # only for Hamming-filtered search, never used here
        ivf.cp.min_points_per_centroid = 1
        ivf.cp.niter = a.niter
        if a.opq_from:
            reuse_rotation(ix, a.opq_from)
        ix.train(sample)
        del sample
        out["train_s"] = time.perf_counter() - t
        LOG.info("trained in %.0f s; filling %d shards from %d chunks", out["train_s"], a.workers, chunks.count)
        t = time.perf_counter()
        if a.sidecar:  # the same vectors: only the index is new
            source = chunks
        else:
            refine.create_sidecar(side, a.n, a.dim)
            source = IntoSidecar(chunks, side, xq, truth_dir)
        if fast_scan(factory):
            build_in_memory(ix, source, chunks.count, path)
            workers = 1
        else:
            plan = shards.ShardPlan(source, chunks.count, workers=a.workers, threads=1)
            shards.build_sharded(ix, plan, path)
            workers = a.workers
        truth_cpu = 0 if a.sidecar else sum(float(np.load(f)["seconds"]) for f in truth_dir.glob("*.npz"))
        out["truth_in_workers_s"] = truth_cpu / workers
        out["add_merge_s"] = time.perf_counter() - t - out["truth_in_workers_s"]
        out["build_s"] = out["train_s"] + out["add_merge_s"]
        LOG.info("filled and merged in %.0f s", out["add_merge_s"])
    out["peak_rss_build_mb"] = _peak_mb(resource.RUSAGE_SELF)
    out["peak_rss_worker_mb"] = _peak_mb(resource.RUSAGE_CHILDREN)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["worker_cpu_s"] = kids.ru_utime + kids.ru_stime  # the shard workers' CPU time, all together

    t = time.perf_counter()
    Iref = merged_truth(truth_dir, chunks.count)
    out["truth_s"] = time.perf_counter() - t + out.get("truth_in_workers_s", 0)
    LOG.info("exact neighbours in %.0f s", out["truth_s"])

    rss0 = _rss_mb()
    ix = faiss.read_index(str(path)) if fast_scan(factory) else shards.load_sharded(path)
    sidecar = refine.open_sidecar(side)
    out["index_open_rss_mb"] = _rss_mb() - rss0
    rows_file, ids_file = refine.sidecar_files(side)
    lists = 0 if fast_scan(factory) else Path(shards.ivfdata_path(ix)).stat().st_size
    out["bytes_per_vector"] = {
        "index": (path.stat().st_size + lists) / a.n,
        "sidecar_f16": Path(rows_file).stat().st_size / a.n,
        "sidecar_ids": Path(ids_file).stat().st_size / a.n,
    }
    timed = a.sweep_queries or a.queries  # a re-run may time fewer queries (--reuse)
    out["rows"] = sweep(ix, sidecar, xq[:timed], Iref[:timed], a.nprobes, a.factors)
    out["query_rss_mb"] = _rss_mb()
    # File pages of the memory-mapped lists and sidecar count in RSS but are page cache, which the
    # kernel takes back under pressure; anonymous memory is what the process really holds.
    out["query_rss_split_mb"] = _rss_split_mb()
    out["elapsed_s"] = time.perf_counter() - t_start
    out["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    print(report(out, a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")


def reuse_rotation(ix, path):
    """Give ``ix`` the trained OPQ rotation of the index at ``path`` (``--opq-from``): training
    then fits only the lists and codes (faiss trains only a chain's untrained transforms)."""
    src = faiss.read_index(str(path))
    if not isinstance(ix, faiss.IndexPreTransform) or not isinstance(src, faiss.IndexPreTransform):
        raise SystemExit("--opq-from: both indexes must begin with an OPQ rotation (--opq)")
    mine, theirs = (faiss.downcast_VectorTransform(i.chain.at(0)) for i in (ix, src))
    if (mine.d_in, mine.d_out) != (theirs.d_in, theirs.d_out) or not theirs.is_trained:
        raise SystemExit(f"--opq-from: {path} has no trained {mine.d_in} -> {mine.d_out} rotation")
    faiss.copy_array_to_vector(faiss.vector_to_array(theirs.A), mine.A)
    faiss.copy_array_to_vector(faiss.vector_to_array(theirs.b), mine.b)
    mine.is_trained = True


def check_reused(chunks, side, truth_dir):
    """Refuse a reused sidecar (``--sidecar``) whose rows are not this run's vectors (another
    --data, --n, --dim or --seed), or whose truth folder is incomplete: the first and last chunks'
    first rows must equal the generator's, rounded to float16."""
    if len(list(truth_dir.glob("*.npz"))) != chunks.count:
        raise SystemExit(f"--sidecar: {truth_dir} lacks the exact top {K} of some chunks; build without --sidecar")
    sidecar = refine.open_sidecar(side)
    for c in (0, chunks.count - 1):
        x, ids = chunks(c)
        if sidecar.dim != chunks.dim or len(sidecar.rows) != chunks.n or not np.array_equal(
                sidecar.rows[sidecar.rows_of(ids[:100])], x[:100].astype(np.float16)):
            raise SystemExit(f"--sidecar: {side} holds other vectors than --data {chunks.data} --n {chunks.n} "
                             f"--dim {chunks.dim} --seed {chunks.seed}; build without --sidecar")


def fast_scan(factory):
    """Whether ``factory`` is a 4-bit fast-scan PQ (``PQ..x4fs``): its lists are packed in blocks of
    32 codes, which faiss cannot merge on disk, so it is filled in memory, here (32 B per vector
    at PQ64x4fs: 32 MB per million)."""
    return "x4fs" in factory  # PQ..x4fs, or PQ..x4fsr (codes of the residual from the list's centroid)


def build_in_memory(ix, source, count, path):
    """Fill ``ix`` chunk by chunk in this process (the sidecar and the truth as the shard workers
    do) and write it to ``path``."""
    for c in range(count):
        x, ids = source(c)
        ix.add_with_ids(np.ascontiguousarray(x), ids)
    faiss.write_index(ix, str(path))


def merged_truth(truth_dir, count):
    """Exact top K of each query over all chunks, from each chunk's exact top K."""
    parts = [np.load(Path(truth_dir) / f"{c}.npz") for c in range(count)]
    d = np.concatenate([p["d"] for p in parts], axis=1)
    i = np.concatenate([p["i"] for p in parts], axis=1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(i, order, 1)


def sweep(ix, sidecar, xq, Iref, nprobes, factors):
    """Single-thread latency (p50, p99) and recall@10 of every query, per (nprobe, R); warm cache:
    every setting first runs all queries once untimed."""
    faiss.omp_set_num_threads(1)
    ivf = faiss.extract_index_ivf(ix)
    rows = []
    quantizer = faiss.downcast_index(ivf.quantizer)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        if isinstance(quantizer, faiss.IndexHNSW):
            # faiss searches the graph with efSearch (16) even for nprobe lists: at 256 of 8,192
            # lists that missed 27 % of the nearest lists. A queue of nprobe finds them all.
            quantizer.hnsw.efSearch = max(nprobe, 16)
        for r in factors:
            def one(q):
                if r == 0:
                    return index.search(ix, q, K)
                return refine.refined_search(ix, sidecar, q, K, factor=r)
            found, times, cpu = [], [], []
            for i in range(len(xq)):
                one(xq[i:i + 1])
            for i in range(len(xq)):
                t, c = time.perf_counter(), time.thread_time()
                _, I = one(xq[i:i + 1])
                times.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
                found.append(I[0])
            rec = float(np.mean([len(set(f) & set(g)) / K for f, g in zip(found, Iref)]))
            row = {"nprobe": nprobe, "R": r, "candidates": K * max(r, 1), "recall_at_10": round(rec, 4),
                   "p50_ms": round(1000 * statistics.median(times), 3),
                   "p99_ms": round(1000 * float(np.percentile(times, 99)), 3),
                   # CPU time of the one searching thread: what a query costs when it has a core
                   # to itself, which the shared machine's wall clock does not show.
                   "cpu_p50_ms": round(1000 * statistics.median(cpu), 3),
                   "cpu_p99_ms": round(1000 * float(np.percentile(cpu, 99)), 3)}
            LOG.info("%s", row)
            rows.append(row)
    return rows


# Measured once and kept in the repository (benchmarks/results/ is not), so `--data real` runs anywhere.
SPECTRUM_FILE = Path(__file__).resolve().parent / "spectra" / "mobilenet_v2_ham10000.json"


def real_scales(dim, path=SPECTRUM_FILE):
    """Standard deviations per principal direction, and the mean's length, of cbr's own embeddings
    (``--real-spectrum N --spectrum-out FILE`` measures them): the measured eigenvalues for the ranks
    that N images estimate well (up to N/4), the power law fitted to them beyond, scaled so that
    the variance plus the squared mean total 1 (unit vectors), as measured."""
    m = json.loads(Path(path).read_text())
    ev = np.asarray(m["eigenvalues"], dtype=np.float64)
    top = min(len(ev), m["images"] // 4, dim)
    ranks = np.arange(1, dim + 1, dtype=np.float64)
    lam = np.empty(dim)
    lam[:top] = ev[:top]
    lam[top:] = ev[top - 1] * (ranks[top:] / top) ** (-m["power_law_exponent_fit"])
    # The real share of variance beyond `top` is what the measured total leaves; the tail keeps its shape.
    tail = max(m["variance_total"] - ev[:top].sum(), 0.0)
    if dim > top and lam[top:].sum() > 0:
        lam[top:] *= tail / lam[top:].sum()
    lam *= m["variance_total"] / lam.sum()
    return np.sqrt(lam).astype(np.float32), np.float32(np.sqrt(m["mean_sq_norm"]))


def generated_spectrum(chunks):
    """Share of variance in the top principal components of one generated chunk (unit vectors)."""
    x, _ = chunks(0)
    return _shares(x[:20000])


def real_spectrum(n_images):
    """PCA spectrum of cbr's default embeddings (ImageNet MobileNetV2, d=1280) of HAM10000 images."""
    import torch

    from cbr.data.image import read_image
    from cbr.models.embedder import create_embedder

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    files = sorted(root.glob("*/*.jpg"))
    files = files[:: max(1, len(files) // n_images)][:n_images]  # spread over the classes
    os.environ.setdefault("TORCH_HOME", str(root.parents[1] / "weights"))
    emb = create_embedder("mobilenet_v2")
    t = time.perf_counter()
    out = []
    for i in range(0, len(files), 32):
        batch = torch.stack([emb.preprocess(read_image(f)[0]) for f in files[i:i + 32]])
        out.append(emb.embed(batch).numpy())
    x = np.concatenate(out).astype(np.float64)
    LOG.info("embedded %d images in %.0f s", len(x), time.perf_counter() - t)
    centred = x - x.mean(axis=0)
    ev = np.linalg.svd(centred, compute_uv=False) ** 2 / len(x)
    return {"images": len(x), "dim": x.shape[1], "source": str(root), "model": "mobilenet_v2 (ImageNet)",
            **_shares(x), "mean_sq_norm": float(np.sum(x.mean(axis=0) ** 2)), "variance_total": float(ev.sum()),
            "eigenvalues": [float(v) for v in ev]}


def _shares(x):
    x = x - x.mean(axis=0)
    ev = np.linalg.svd(x, compute_uv=False) ** 2
    total = ev.sum()
    shares = {f"top_{k}": round(float(ev[:k].sum() / total), 3) for k in (8, 16, 32, 64, 128)}
    # Slope of log eigenvalue against log rank over ranks 2..min(100, n/4): for comparison with alpha.
    top = min(100, len(ev) // 4)
    slope = np.polyfit(np.log(np.arange(2, top + 1)), np.log(ev[1:top]), 1)[0]
    return {"variance_share": shares, "power_law_exponent_fit": round(float(-slope), 2),
            "participation_ratio": round(float(total ** 2 / (ev ** 2).sum()), 1)}


def report(out, a):
    head = "| nprobe | R | candidates | recall@10 | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms |"
    lines = [f"{a.data}, n={a.n:,}, d={a.dim}, {out['factory']} (inner product), {a.sweep_queries or a.queries} queries, "
             f"{a.workers} shard workers", "", head, "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['nprobe']} | {r['R'] or '- (PQ order)'} | {r['candidates']} | "
                     f"{r['recall_at_10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r.get('cpu_p50_ms', float('nan')):.2f} | {r.get('cpu_p99_ms', float('nan')):.2f} |")
    b = out["bytes_per_vector"]
    lines += ["", f"- bytes on disk per vector: index {b['index']:.1f} (codes, ids, lists); sidecar "
              f"{b['sidecar_f16']:.0f} (float16 rows) + {b['sidecar_ids']:.0f} (ids)",
              f"- build: train {out.get('train_s', float('nan')):.0f} s, fill shards + merge "
              f"{out.get('add_merge_s', float('nan')):.0f} s (workers' CPU {out['worker_cpu_s']:.0f} s); "
              f"exact truth {out['truth_s']:.0f} s",
              f"- peak RSS: main process {out['peak_rss_build_mb']:.0f} MB, largest worker "
              f"{out['peak_rss_worker_mb']:.0f} MB; query process {out['query_rss_mb']:.0f} MB "
              f"({out['query_rss_split_mb']}) "
              f"(index opened: +{out['index_open_rss_mb']:.0f} MB)",
              f"- generated data spectrum: {out['spectrum']}",
              f"- total {out['elapsed_s']:.0f} s; load average {out['loadavg']['start'][0]:.1f} at start, "
              f"{out['loadavg']['end'][0]:.1f} at end"]
    for clock in ("p50_ms", "cpu_p50_ms"):
        hits = [r for r in out["rows"] if r["recall_at_10"] >= 0.95 and r.get(clock, 1e9) < 5
                and b["index"] < 64]
        lines.append(f"- goal (recall@10 >= 0.95, {clock} < 5 ms, index < 64 B/vector): " + (
            "met by " + "; ".join(f"nprobe={r['nprobe']} R={r['R']} ({r['recall_at_10']:.3f}, "
                                  f"{r[clock]:.2f} ms)" for r in hits) if hits else "NOT met"))
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=["powerlaw", "real", "clustered"], default="powerlaw",
                   help="real: the eigenvalues and mean measured on cbr's embeddings (SPECTRUM_FILE)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="power-law exponent (default 1.0)")
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 4 sqrt(n), at most 4096)")
    p.add_argument("--pq", default="", help="PQ codes: M, MxBITS or Mx4fs (4-bit fast scan), e.g. 64x6 (default "
                   "index.pq_bytes(dim), 8 bits)")
    p.add_argument("--opq", action="store_true", help="rotate with OPQ first (M need not divide d)")
    p.add_argument("--opq-dim", type=int, default=0,
                   help="with --opq: dimensions after the rotation, a multiple of M (default the largest <= d)")
    p.add_argument("--opq-from", default="",
                   help="with --opq: take the trained rotation of this index (same --opq-dim and M) instead of "
                   "training one")
    p.add_argument("--sidecar", default="",
                   help="reuse this float16 sidecar (base path, as written by an earlier run with the same --data, "
                   "--n, --dim and --seed) and the exact truth folder beside it, instead of writing new ones")
    p.add_argument("--coarse", choices=["flat", "hnsw"], default="flat",
                   help="coarse quantizer: exact over the centroids, or an HNSW32 graph (for 16k+ lists)")
    p.add_argument("--train", type=int, default=100_000, help="training sample (default 100k)")
    p.add_argument("--niter", type=int, default=25, help="k-means iterations of the coarse quantizer (faiss: 25)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="faiss threads for training (default 2)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--sweep-queries", type=int, default=0, help="time only the first N queries")
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--factors", type=int, nargs="+", default=[0, 5, 10, 20, 40])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench-scale-stream")
    p.add_argument("--reuse", action="store_true", help="reuse an index already built in --work")
    p.add_argument("--real-spectrum", type=int, default=0, metavar="IMAGES",
                   help="only measure the PCA spectrum of cbr's embeddings of this many HAM10000 images")
    p.add_argument("--spectrum-out", default="", help="with --real-spectrum: write it (eigenvalues included) here")
    p.add_argument("--out", default="benchmarks/results/scale_stream.json")
    return p.parse_args(argv)


def _peak_mb(who):
    return resource.getrusage(who).ru_maxrss / 1024


def _rss_split_mb():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
