"""Crash consistency: SIGKILL `cbr index` at random points, run it again, check the case base.

The trials of tests/test_reliability_crash.py, more of them: on ~60 phantoms at 48 px (tinycnn,
random init, batch 4), each trial starts either from an empty case base or from one holding the
first third, saves an index generation after every batch or only at the end, kills the indexer at
a random time (seeded) and runs it again to completion. "Consistent" means every check of
``check_consistency``: the index file matches its manifest (checksum, vector count), holds exactly
the case base's active ids, every image is one case with one embedding and one map per model, the
stored embeddings equal an uninterrupted run's, and no stray file is left in the index folder.

Modes:
  fork        (default) indexers are forked from a warm Python (as in the tests): the kill window
              is all real work.
  subprocess  every run is a fresh `python -m cbr index`; kills are drawn after the measured
              import time. Generations per batch need `CBR_SAVE_EVERY_S` support in cbr.pipeline.index.

Run: .venv/bin/python benchmarks/bench_crash.py [--trials 20] [--mode fork|subprocess] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, table, write_json  # noqa: E402
from test_reliability_crash import CrashHarness, ForkServer, fork_runner  # noqa: E402

IMPORTS = "import cbr.cli, cbr.pipeline.index, cbr.pipeline.query, torch, torchvision, faiss, pytorch_grad_cam"


def subprocess_runner(log_dir: Path):
    n = [0]

    def run(argv, kill_after, save_every=None):
        n[0] += 1
        log = log_dir / f"run-{n[0]}.log"
        env = dict(os.environ)
        if save_every is not None:
            env["CBR_SAVE_EVERY_S"] = str(save_every)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "cbr", *map(str, argv)], stdout=fh, stderr=subprocess.STDOUT, env=env)
            killed = False
            while proc.poll() is None:
                if kill_after is not None and time.monotonic() - t0 >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                time.sleep(0.002)
        return {"returncode": proc.returncode, "killed": killed, "elapsed": time.monotonic() - t0,
                "log": log.read_text(errors="replace")}

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--mode", choices=["fork", "subprocess"], default="fork")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file [default: benchmarks/results/crash.json]")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cbr-crash-") as tmp:
        root = Path(tmp)
        server = None
        startup = 0.0
        if args.mode == "fork":
            server = ForkServer(root / "server")
            runner = fork_runner(server)
        else:
            (root / "logs").mkdir()
            runner = subprocess_runner(root / "logs")
            s = time.monotonic()
            subprocess.run([sys.executable, "-c", IMPORTS], check=True)
            startup = time.monotonic() - s
        try:
            harness = CrashHarness(root / "work", runner, seed=args.seed, startup=startup)
            results = []
            for i in range(args.trials):
                r = harness.trial(i)
                results.append(r)
                print(f"trial {i}: {'consistent' if r['consistent'] else 'INCONSISTENT ' + '; '.join(r['problems'])}",
                      file=sys.stderr)
        finally:
            if server is not None:
                server.close()

    rows = [[r["trial"], r["scenario"], "every batch" if r["save_every_s"] == 0 else "at the end",
             f"{r['kill_after_s']:.2f}", "yes" if r["killed"] else "no (finished)", r["cases_at_start"],
             r["cases_before_rerun"], r["cases_after"], "yes" if r["consistent"] else "NO"] for r in results]
    print(f"# cbr index killed with SIGKILL ({args.mode} mode), then run again\n")
    print(f"{len(harness.expected)} phantoms at 48 px, tinycnn, batch 4; clean run {harness.duration['fresh']:.2f} s; "
          f"{machine()}\n")
    print(table(["trial", "start", "index saved", "kill at (s)", "killed", "cases at start", "cases before rerun",
                 "cases after", "consistent"], rows))
    n_ok = sum(r["consistent"] for r in results)
    n_killed = sum(r["killed"] for r in results)
    print(f"\n{n_ok}/{len(results)} consistent; {n_killed} runs killed mid-way, the rest finished before the kill.")
    path = write_json("crash", {"mode": args.mode, "seed": args.seed, "images": len(harness.expected),
                                "clean_run_s": harness.duration["fresh"], "startup_s": startup,
                                "elapsed_s": round(time.monotonic() - t0, 1), "trials": results}, args.out)
    print(f"results: {path}")
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
