"""Cold processes on the demo case base: the read-only commands, and a cold `cbr query` against
the torch floor, medians.

(1) Read-only commands (`history`, `show`, `report`, `export`, `models`, `db current`, and
    `--help` of every command), each a fresh process; goal < 1 s wall each.
(2) A cold `cbr query` (one image, k=5, gradcam maps, report written) against the floor: in the
    same run, interleaved, `python -c` importing torch and torchvision, building the case base's
    backbone and loading its weights (torchvision's ImageNet file of that backbone, the same
    tensors a checkpoint holds); goal <= 1.5x.

The case base is copied to a temporary folder first, so the queries leave the demo's untouched.

Run: TORCH_HOME=/work/shared/weights .venv/bin/python benchmarks/bench_startup.py \
         --demo /tmp/demo-speed [--repeats 7]   (build it with `cbr demo --out /tmp/demo-speed`)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cbr.cli import help_argvs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, table, write_json  # noqa: E402

READ_ONLY_TARGET_S = 1.0
COLD_QUERY_TARGET = 1.5

FLOOR = """
import sys, torch, torchvision.models
model = getattr(torchvision.models, sys.argv[1])()
model.load_state_dict(torch.load(sys.argv[2], map_location="cpu", weights_only=True))
"""


def _cbr() -> list[str]:
    exe = Path(sys.executable).with_name("cbr")
    return [str(exe)] if exe.exists() else [shutil.which("cbr") or "cbr"]


CPU_S: dict[str, list[float]] = {}  # command -> user + system seconds of each run


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _wall(cmd: list[str], name: str | None = None) -> float:
    """Wall seconds of one run; its CPU seconds go to CPU_S[name] (less inflated by a busy machine)."""
    c0, t0 = _cpu(), time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    CPU_S.setdefault(name or " ".join(cmd), []).append(_cpu() - c0)
    return elapsed




def read_only_commands(db: str, query_id: int, out: str) -> dict[str, list[str]]:
    return {
        "history": ["history", "--db", db],
        "show": ["show", str(query_id), "--db", db],
        "report": ["report", str(query_id), "--db", db, "--out", out],
        "export queries": ["export", "--what", "queries", "--db", db],
        "export cases": ["export", "--what", "cases", "--db", db],
        "models": ["models"],
        "db current": ["db", "current", "--db", db],
    }


def _backbone(db: str) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT backbone FROM models ORDER BY id LIMIT 1").fetchone()[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="/tmp/demo-speed", help="folder of `cbr demo --out`")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--help-repeats", type=int, default=3, help="runs of each --help")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    demo = Path(a.demo)
    if not (demo / "cases.db").is_file():
        sys.exit(f"no case base in {demo}; build one with `cbr demo --out {demo}`")
    from cbr.models.backbones import BACKBONES
    from cbr.models.weights import hub_dir, weights_file_name

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(demo / "cases.db", tmp / "cases.db")
        shutil.copytree(demo / "cases.db.indexes", tmp / "cases.db.indexes")
        db = str(tmp / "cases.db")
        image = sorted((demo / "phantoms" / "images").glob("*.png"))[0]
        query = _cbr() + ["query", str(image), "--db", db, "-k", "5", "--explain", "gradcam", "--out", str(tmp / "q")]
        subprocess.run(query, check=True, stdout=subprocess.DEVNULL)  # a query for show/report to read
        query_id = sqlite3.connect(db).execute("SELECT max(id) FROM queries").fetchone()[0]

        rows, results = [], {}
        bare = [_wall([sys.executable, "-c", "pass"], "python") for _ in range(a.repeats)]
        rows.append(["`python -c pass` (the interpreter alone)", f"{median(bare):.3f}",
                     f"{median(CPU_S['python']):.3f}", ""])
        for name, args in read_only_commands(db, query_id, str(tmp / "r")).items():
            times = [_wall(_cbr() + args, name) for _ in range(a.repeats)]
            results[name] = median(times)
            rows.append([f"`cbr {name}`", f"{median(times):.3f}", f"{median(CPU_S[name]):.3f}",
                         "yes" if median(times) < READ_ONLY_TARGET_S else "NO"])
        helps = {" ".join(args): median([_wall(_cbr() + args) for _ in range(a.help_repeats)])
                 for args in help_argvs()}
        slowest = max(helps, key=helps.get)
        results["--help"] = helps
        rows.append([f"`--help` of {len(helps)} commands: slowest `cbr {slowest}`", f"{helps[slowest]:.3f}",
                     f"{median(CPU_S[' '.join(_cbr() + slowest.split())]):.3f}",
                     "yes" if helps[slowest] < READ_ONLY_TARGET_S else "NO"])

        backbone = _backbone(db)
        weights = hub_dir() / "checkpoints" / weights_file_name(backbone)
        floor_cmd = [sys.executable, "-c", FLOOR, BACKBONES[backbone].builder, str(weights)]
        floor, cold = [], []
        for _ in range(a.repeats):  # interleaved, so load changes hit both alike
            floor.append(_wall(floor_cmd, "floor"))
            cold.append(_wall(query, "cold"))
        ratio = median(cold) / median(floor)
        rows.append(["floor: import torch+torchvision, build + load " + backbone, f"{median(floor):.3f}",
                     f"{median(CPU_S['floor']):.3f}", ""])
        rows.append(["cold `cbr query` (k=5, gradcam, report)", f"{median(cold):.3f}", f"{median(CPU_S['cold']):.3f}",
                     ""])
        rows.append([f"ratio cold query / floor (goal <= {COLD_QUERY_TARGET})", f"{ratio:.2f}", "",
                     "yes" if ratio <= COLD_QUERY_TARGET else "NO"])

    load = os.getloadavg()[0]
    print(f"Cold processes, {a.repeats} runs each (--help: {a.help_repeats}); load average {load:.1f}; {machine()}")
    print(table(["command", "median wall s", "median CPU s", "goal met (wall)"], rows))
    write_json("startup", {"repeats": a.repeats, "load_average": load, "read_only_median_s": results,
                           "cpu_median_s": {k: median(v) for k, v in CPU_S.items()},
                           "floor_median_s": median(floor), "cold_query_median_s": median(cold),
                           "cold_over_floor": ratio}, a.out)


if __name__ == "__main__":
    main()
