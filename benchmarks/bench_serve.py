"""`cbr serve` speed: warm query latency through HTTP against the library's warm Searcher.query in
the same run, throughput with concurrent clients, and the time from `cbr serve` to a first answer.

Run by hand (it prints a table; figures are medians and 95th percentiles):

    TORCH_HOME=/work/shared/weights .venv/bin/cbr demo --out /tmp/demo-serve
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_serve.py --db /tmp/demo-serve/cases.db

It works on a scratch copy of the case base, so the queries it makes do not enter the real audit
trail. Query images default to the demo's phantoms beside the case base.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _images(db: Path, source: str | None, n: int) -> list[Path]:
    manifest = Path(source) if source else db.parent / "phantoms" / "manifest.csv"
    if manifest.is_dir():
        found = sorted(p for p in manifest.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    else:
        with open(manifest, newline="") as fh:
            found = [manifest.parent / r["path"] for r in csv.DictReader(fh)]
    if not found:
        sys.exit(f"no query images in {manifest}; give --images")
    return [found[i % len(found)] for i in range(n)]


def _scratch_copy(db: Path, tmp: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            shutil.copy2(src, tmp / (db.name + suffix))
    shutil.copytree(Path(f"{db}.indexes"), tmp / f"{db.name}.indexes")
    return tmp / db.name


def _serve_in_thread(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _post(client, url, image: Path):
    with open(image, "rb") as fh:
        r = client.post(url + "/api/queries", files={"image": (image.name, fh, "image/png")})
    r.raise_for_status()
    return r.json()


def latency(db: Path, images: list[Path], warmup: int) -> dict:
    """Alternate library and HTTP queries on the same warm members, image by image."""
    import httpx

    from cbr.pipeline.query import Searcher
    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.serve.workbench import stored_map_method
    from cbr.store.casebase import open_casebase

    cb = open_casebase(db, create=False)
    data = db.parent / "serve-data"
    # As `cbr serve` by default: the CAM method of the case base's stored maps.
    searcher = Searcher(cb, out_dir=str(data / "reports"), explain=stored_map_method(cb))
    app = create_app(cb, ServeSettings(data_dir=data), searcher=searcher)
    server, thread, url = _serve_in_thread(app)
    lib, http = [], []
    try:
        with httpx.Client(timeout=300) as client:
            for image in images[:warmup]:
                searcher.query(image)
                _post(client, url, image)
            for i, image in enumerate(images):
                # The HTTP path stores the upload first and queries that copy; the library path
                # reads the file where it is. Both record the query and write its report. The
                # order alternates, so that neither always finds the neighbours' files cached.
                for path in (("lib", "http") if i % 2 == 0 else ("http", "lib")):
                    t0 = time.perf_counter()
                    if path == "lib":
                        searcher.query(image)
                    else:
                        _post(client, url, image)
                    (lib if path == "lib" else http).append(time.perf_counter() - t0)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return {"lib": lib, "http": http, "url": url, "app": app, "cb": cb, "searcher": searcher}


def throughput(db: Path, images: list[Path], clients: int, per_client: int, searcher) -> dict:
    """Queries per second from 1 client, then from ``clients`` concurrent clients."""
    import httpx

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings

    app = create_app(searcher.cb, ServeSettings(data_dir=db.parent / "serve-data"), searcher=searcher)
    server, thread, url = _serve_in_thread(app)
    out = {}
    try:
        total = clients * per_client
        for n in (1, clients):  # the same number of queries, from one client, then from several at once
            errors, done = [], []

            def worker(w):
                with httpx.Client(timeout=600) as client:
                    for i in range(total // n):
                        try:
                            done.append(_post(client, url, images[(w * (total // n) + i) % len(images)])["query_id"])
                        except Exception as e:  # noqa: BLE001 - counted and printed
                            errors.append(repr(e))

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            out[n] = {"queries": len(done), "errors": len(errors), "distinct": len(set(done)), "wall": wall,
                      "qps": len(done) / wall}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return out


def cold_start(db: Path, image: Path) -> dict:
    """`cbr serve` as a user starts it: seconds to the printed URL and to the first answer."""
    import httpx

    env = dict(os.environ)
    cmd = [str(Path(sys.executable).with_name("cbr")), "serve", "--db", str(db), "--port", "0",
           "--data-dir", str(db.parent / "serve-cold")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, said = None, []
        for line in proc.stdout:
            said.append(line.strip())
            m = re.search(r"open (http://\S+/)", line)
            if m:
                url = m.group(1).rstrip("/")
                break
        if url is None:
            raise RuntimeError("cbr serve printed no URL")
        t_url = time.perf_counter() - t0
        with httpx.Client(timeout=600) as client:
            _post(client, url, image)
        t_first = time.perf_counter() - t0
        t1 = time.perf_counter()
        with httpx.Client(timeout=600) as client:
            _post(client, url, image)
        t_second = time.perf_counter() - t1
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"url": t_url, "first": t_first, "second": t_second, "exit": proc.returncode, "said": said[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="/tmp/demo-serve/cases.db", help="case base (a scratch copy is used)")
    ap.add_argument("--images", default=None, help="a folder of images or a manifest [default: the demo's phantoms]")
    ap.add_argument("-n", type=int, default=20, help="timed queries per path")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=5)
    args = ap.parse_args()
    db = Path(args.db).resolve()
    images = _images(db, args.images, max(args.n, args.clients * args.per_client))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        scratch = _scratch_copy(db, Path(tmp))
        lat = latency(scratch, images[: args.n], args.warmup)
        thr = throughput(scratch, images, args.clients, args.per_client, lat["searcher"])
        lat["cb"].close()
        cold = cold_start(scratch, images[0])
    lib_p50, http_p50 = statistics.median(lat["lib"]), statistics.median(lat["http"])
    print(f"case base {db}, maps {lat['searcher'].explain}, k {lat['searcher'].k}, "
          f"{args.n} queries per path after {args.warmup} warm-up, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    print(f"{'measure':<44} {'p50':>9} {'p95':>9}")
    print(f"{'Searcher.query (library, warm)':<44} {lib_p50 * 1000:>7.0f}ms {_percentile(lat['lib'], 95) * 1000:>7.0f}ms")
    print(f"{'POST /api/queries (HTTP, warm)':<44} {http_p50 * 1000:>7.0f}ms {_percentile(lat['http'], 95) * 1000:>7.0f}ms")
    print(f"{'HTTP / library (p50 ratio; goal <= 1.3)':<44} {http_p50 / lib_p50:>9.2f}")
    # Each HTTP query runs next to the library query on the same image: the median of the paired
    # differences is the overhead, robust to the load drifting during the run.
    paired = statistics.median(h - l for h, l in zip(lat["http"], lat["lib"]))
    print(f"{'HTTP overhead, median of paired differences':<44} {paired * 1000:>7.0f}ms")
    for n, t in thr.items():
        per = args.clients * args.per_client // n
        print(f"{f'throughput, {n} client(s) x {per} queries':<44} {t['qps']:>7.2f}/s  "
              f"({t['queries']} answers, {t['distinct']} distinct ids, {t['errors']} errors, {t['wall']:.1f} s)")
    print(f"{'cbr serve start -> URL printed':<44} {cold['url']:>8.1f}s")
    print(f"{'cbr serve start -> first answer':<44} {cold['first']:>8.1f}s")
    print(f"{'second answer of that process':<44} {cold['second']:>8.2f}s")
    print(f"{'exit status after Ctrl-C':<44} {cold['exit']:>9}")
    print(f"(it said: {cold['said']})")


if __name__ == "__main__":
    main()
