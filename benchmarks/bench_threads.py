"""Training and query speed on a shared CPU: torch's default threads, sleeping ones, and one thread.

torch's CPU kernels run on OpenMP threads (one per core by default). Between parallel regions
GNU OpenMP lets its idle threads spin for a while before they sleep. On a machine whose cores
another job also uses, those spinning threads take turns from the threads with work to do: each
step of a fine-tune then waits on a thread that is not running. ``OMP_WAIT_POLICY=PASSIVE`` makes
them sleep at once (and costs a wake-up at every parallel region); ``OMP_NUM_THREADS=1`` has no
thread to wait on.

Each measurement is a fresh process (the policy is read when OpenMP starts) that runs
MobileNetV2 (random weights) on random images: "train", a training step on a batch as `cbr train`
does; "embed", a forward pass of one image without gradients, as a query does. --warmup steps,
then --steps timed ones. "Beside" runs --busy CPU-bound processes (a pure-Python loop each) at the same time.
Wall and CPU seconds per step are the medians over --repeats runs; the configurations are
interleaved so that the machine's drift falls on all of them alike.

Run: .venv/bin/python benchmarks/bench_threads.py [--steps 8] [--repeats 3] [--busy 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, table, write_json  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch, torchvision
steps, warmup, batch, size = map(int, sys.argv[1:5])
train = sys.argv[5] == "train"
torch.manual_seed(0)
model = torchvision.models.mobilenet_v2(weights=None, num_classes=3)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 3, (batch,))
def step():
    if not train:
        with torch.no_grad():
            return model(x[:1])
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
model.train(train)
for _ in range(warmup):
    step()
cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
cpu1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
print(json.dumps({"wall": (t1 - t0) / steps, "cpu": cpu / steps, "threads": torch.get_num_threads()}))
"""

BUSY = "while True: pass"
SETTINGS = {"default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
MODES = ("train", "embed")


def run_child(setting: dict, mode, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(setting)
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(args.warmup), str(args.batch),
                          str(args.size), mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(busy: int, args) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        runs = {(mode, name): [] for mode in MODES for name in SETTINGS}
        for _ in range(args.repeats):
            for mode, name in runs:
                runs[mode, name].append(run_child(SETTINGS[name], mode, args))
        return runs
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside, for the second half")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/threads.json)")
    a = p.parse_args(argv)
    load = os.getloadavg()[0]
    results, rows = {}, []
    for busy in (0, a.busy):
        runs = measure(busy, a)
        results[f"busy={busy}"] = {f"{mode} {name}": rs for (mode, name), rs in runs.items()}
        for (mode, name), rs in runs.items():
            base = median([r["wall"] for r in runs[mode, "default"]])
            wall, cpu = median([r["wall"] for r in rs]), median([r["cpu"] for r in rs])
            rows.append([busy, mode, name, rs[0]["threads"], f"{wall * 1000:.1f}", f"{cpu * 1000:.1f}",
                         f"{base / wall:.2f}x"])
    print(f"{machine()}; 1-minute load {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; MobileNetV2, "
          f"train: batch {a.batch} at {a.size} px; embed: 1 image; {a.steps} steps after {a.warmup}, median of {a.repeats} runs")
    print(table(["busy processes beside", "step", "environment", "threads", "wall ms / step", "CPU ms / step",
                 "speed vs default"], rows))
    write_json("threads", {"args": vars(a), "load_start": load, "results": results}, a.out)


if __name__ == "__main__":
    main()
