"""Synthetic phantoms: time to write the default data set (30 patients x 3 slices at 128 px).

The demo and most tests generate phantoms, so they must stay cheap; goal: under 1 s of CPU on one
core (wall time on a shared machine is reported beside it). Medians of ``--repeats`` runs.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_phantoms.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, median, table, write_json  # noqa: E402

from cbr.data.phantom import make_phantoms  # noqa: E402

TARGET_CPU_S = 1.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON results file (default benchmarks/results/phantoms.json)")
    args = parser.parse_args(argv)
    walls, cpus = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            c0, t0 = _cpu(), time.perf_counter()
            make_phantoms(Path(tmp))
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu() - c0)
    wall, cpu = median(walls), median(cpus)
    print(machine())
    print(table(["what", "wall s (median)", "CPU s (median)", "goal"],
                [["make_phantoms() default set", f"{wall:.2f}", f"{cpu:.2f}", f"CPU < {TARGET_CPU_S:g} s"]]))
    write_json("phantoms", {"repeats": args.repeats, "wall_s": walls, "cpu_s": cpus, "target_cpu_s": TARGET_CPU_S,
                            "met": cpu < TARGET_CPU_S}, args.out)
    return 0 if cpu < TARGET_CPU_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
