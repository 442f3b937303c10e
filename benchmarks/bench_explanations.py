"""Which explanation method to trust: the comparison table of ``cbr evaluate --explain all``, by hand.

Scores every explanation method (the CAMs and the captum attributions) on the same few images, for
the class target (when the model has a head) and the similarity target: pointing game and energy
pointing game against lesion masks (when the data has a ``mask`` column), deletion and insertion
AUC, the model-randomisation rank correlation, seconds and model evaluations per map
(cbr.evaluation.comparison). Writes explanations.png and a JSON of the rows.

Run:
    TORCH_HOME=../shared/weights .venv/bin/python benchmarks/bench_explanations.py \\
        --model demo-output/model.pt --data demo-output/phantoms/manifest.csv --heldout-of demo --images 8
    TORCH_HOME=../shared/weights .venv/bin/python benchmarks/bench_explanations.py \\
        --model mobilenet_v2 --data ../shared/data/brain_mri_yesno --images 8

``--heldout-of demo`` keeps only the images ``cbr demo`` held out of its case base (same split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="backbone name or checkpoint path")
    p.add_argument("--data", required=True, help="class folders or a CSV manifest")
    p.add_argument("--methods", default="all", help="a,b,c or all")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--heldout-of", choices=["demo"], default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-size", type=int, default=None, help="for a backbone name (checkpoints keep theirs)")
    p.add_argument("--skip", default="", help="methods to leave out, a,b")
    p.add_argument("--target-layer", default=None, help="CAM layer, e.g. features.13 (as cbr demo's case base)")
    p.add_argument("--targets", default="class,similarity", help="class, similarity or both")
    p.add_argument("--out", default="explanation-comparison")
    args = p.parse_args()

    import torch

    from cbr.data.dataset import read_dataset
    from cbr.evaluation.comparison import comparison_report, format_comparison, parse_methods
    from cbr.models.embedder import create_embedder

    torch.set_num_threads(args.threads)
    records = read_dataset(args.data).records
    if args.heldout_of == "demo":
        from cbr.data.splits import group_split

        _, test = group_split([r.label for r in records], [r.group for r in records], fraction=0.25, seed=0)
        records = [records[i] for i in test]
    embedder = create_embedder(args.model, input_size=args.input_size, target_layer=args.target_layer)
    methods = tuple(m for m in parse_methods(args.methods) if m not in args.skip.split(","))
    t0 = time.perf_counter()
    result = comparison_report(embedder, records, methods, out_dir=args.out,
                               images=args.images, budget=args.budget, progress=True,
                               targets=tuple(args.targets.split(",")))
    elapsed = time.perf_counter() - t0
    print(f"{args.model} on {args.data} ({len(records)} records), {machine()}, torch threads {args.threads}")
    print(format_comparison(result))
    print(f"figure: {result['figure']}   elapsed {elapsed:.0f} s")
    write_json("explanations", dict(result, model=args.model, data=args.data, elapsed_s=elapsed),
               out=str(Path(args.out) / "comparison.json"))


if __name__ == "__main__":
    main()
