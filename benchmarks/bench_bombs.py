"""Decompression bombs (issue 24): exit code, message and peak RSS of `cbr` on each.

Each bomb of ``tests/bombs.py`` is generated in a temporary folder and given to ``cbr query`` (or
``cbr index``) in a subprocess under ``RLIMIT_DATA`` (``--limit-gb``, 3 by default), with
``OMP_NUM_THREADS=1``; the peak RSS is the child's own (``os.wait4``). For comparison: a normal
48x48 query, and an 8-bit PNG of the same 10000x10000 pixels as the 16-bit one. The case base is
a tiny random-init CNN over phantoms, built first.

Run: .venv/bin/python benchmarks/bench_bombs.py [--limit-gb 3] [--out results/bench_bombs.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, table, write_json  # noqa: E402

TINY = ["--model", "tinycnn", "--weights", "none"]


def run(args, cwd: Path, limit: int):
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(cwd / "out.txt", "wb") as fo, open(cwd / "err.txt", "wb") as fe:
        p = subprocess.Popen([sys.executable, "-m", "cbr", *map(str, args)], cwd=cwd, stdout=fo, stderr=fe,
                             preexec_fn=cap, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    err = (cwd / "err.txt").read_text(errors="replace").strip().splitlines()
    out = (cwd / "out.txt").read_text(errors="replace").strip().splitlines()
    said = next((line for line in err if line.startswith("Error:")), None)
    if said is None and any("Traceback" in line for line in err):
        said = "traceback: " + err[-1]
    if said is None:
        said = next((line.strip() for line in out if "decoded size" in line), out[0] if out else "")
    return os.waitstatus_to_exitcode(status), said, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import bombs
    from PIL import Image

    from cbr.data.phantom import make_phantoms

    limit = int(a.limit_gb * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_phantoms(root / "ph", patients=3, slices=2, size=48, seed=0)
        db = root / "cases.db"
        subprocess.run([sys.executable, "-m", "cbr", "index", str(manifest), "--db", str(db), *TINY,
                        "--workers", "0"], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        normal = next((root / "ph" / "images").iterdir())
        Image.new("L", (10000, 10000)).save(root / "big8.png")
        data = root / "data"
        from badfiles import make_good

        make_good(data / "tumour", "tumour", 2, seed=1)
        bombs.nifti_header_only(data / "tumour" / "long.nii")
        runs = [
            ("normal 48x48 PNG query", ["query", normal, "--db", db, "--no-record"]),
            ("8-bit 10000x10000 PNG query (comparison)", ["query", root / "big8.png", "--db", db, "--no-record"]),
            ("16-bit 10000x10000 PNG query (194 KB)", ["query", bombs.png16(root / "big16.png"), "--db", db,
                                                       "--no-record"]),
            ("same, cbr --max-decoded-mb 100", ["--max-decoded-mb", "100", "query", root / "big16.png", "--db", db,
                                                "--no-record"]),
            ("deflated DICOM 8192x8192x16 query (2 MB)", ["query", bombs.deflated_dicom(root / "bomb.dcm"), "--db", db,
                                                          "--no-record"]),
            ("NIfTI-2 header 8x8x50,000,000 in a folder (644 B)", ["index", data, "--db", root / "x.db", *TINY,
                                                                   "--workers", "0"]),
            ("1024^3 uint8 .nii.gz query (1 MB)", ["query", bombs.nifti_gz(root / "cube.nii.gz"), "--db", db,
                                                   "--no-record"]),
            ("npz header (10^7,1000,1000) index", ["index", bombs.npz_header_bomb(root / "h.npz"), "--db",
                                                   root / "y.db", *TINY, "--workers", "0"]),
            ("npz zip bomb 3.5 GB index (3.4 MB)", ["index", bombs.npz_zip_bomb(root / "z.npz"), "--db",
                                                    root / "z.db", *TINY, "--workers", "0"]),
            ("npz zip bomb query", ["query", f"{root / 'z.npz'}#split=train&index=0", "--db", db, "--no-record"]),
        ]
        rows = []
        for what, args in runs:
            rc, said, peak = run(args, root, limit)
            said = said.replace(str(root) + "/", "")
            rows.append({"input": what, "exit": rc, "peak_rss_mib": round(peak), "said": said[:150]})
            print(f"{what}: exit {rc}, peak RSS {peak:.0f} MiB: {said[:150]}", flush=True)
    print(table(["input", "exit", "peak RSS MiB", "message"],
                [[r["input"], r["exit"], r["peak_rss_mib"], r["said"]] for r in rows]))
    print("machine:", machine())
    write_json("bench_bombs", {"limit_data_gb": a.limit_gb, "runs": rows}, a.out)


if __name__ == "__main__":
    main()
