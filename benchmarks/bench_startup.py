"""Start-up time of the CLI: `cbr --help` and `cbr query --help`, cold processes, medians.

Run: .venv/bin/python benchmarks/bench_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median, percentile, table, write_json  # noqa: E402

TARGET_S = 0.3


def _cbr() -> list[str]:
    exe = Path(sys.executable).with_name("cbr")
    return [str(exe)] if exe.exists() else [shutil.which("cbr") or "cbr"]


def measure(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(_cbr() + args, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    baseline = []
    for _ in range(a.repeats):  # the floor: a bare interpreter
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - t0)
    rows, results = [], {}
    for name, args in (("cbr --help", ["--help"]), ("cbr query --help", ["query", "--help"]),
                       ("cbr index --help", ["index", "--help"])):
        times = measure(args, a.repeats)
        results[name] = {"median_s": median(times), "p95_s": percentile(times, 0.95)}
        rows.append([name, f"{median(times):.3f}", f"{percentile(times, 0.95):.3f}",
                     "yes" if median(times) < TARGET_S else "no"])
    rows.append(["python -c pass (floor)", f"{median(baseline):.3f}", f"{percentile(baseline, 0.95):.3f}", ""])
    print(f"Start-up, {a.repeats} cold runs each; {machine()}")
    print(table(["command", "median s", "p95 s", f"< {TARGET_S} s"], rows))
    write_json("startup", {"repeats": a.repeats, "results": results, "python_floor_s": median(baseline)}, a.out)


if __name__ == "__main__":
    main()
