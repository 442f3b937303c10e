"""Out-of-distribution detection on real data: does typicality flag a foreign dataset, and how
often does it flag the case base's own kind of image?

For each pair (case base data, foreign data):
- the case base is ~80% of the in-distribution data (a grouped, stratified split: patients never
  straddle it), indexed with ``index_dataset`` (which calibrates typicality leave-one-out);
- in-distribution queries: the held-out ~20% (new patients), scored as the product's ``Searcher``
  scores them (embedded in batches; a spot check compares a few with ``Searcher.query``);
- leave-one-out: the calibration cases themselves, each scored without itself and its patient (the
  share flagged there is at most alpha by construction; reported because the issue asks for it);
- foreign queries: every image of the other dataset (or ``--limit`` of them).

Figures: share flagged (foreign, held-out, leave-one-out) at ``--alpha``, AUROC of typicality
(in-distribution = held-out, foreign), FPR at 95% TPR. Nothing is tuned on these data: the level is
the default alpha and k is the library's TYPICALITY_K.

Pairs: brain MRI -> chest X-ray, chest X-ray -> brain MRI, and with ``--demo DB`` the demo's phantom
case base against real brain MRI and real chest X-rays.

Run: TORCH_HOME=../shared/weights .venv/bin/python benchmarks/bench_ood.py [--model mobilenet_v2 | --model ckpt.pt]
         [--limit 600] [--demo /tmp/demo-ood/cases.db] [--alpha 0.01]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import table, write_json  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def datasets(root: Path) -> dict:
    """name -> (records, problems) of the two real datasets."""
    from cbr.data.dataset import ManifestSpec, read_dataset

    chest = root / "chest_xray_pneumonia"
    spec = ManifestSpec("filename", "class", "patient_key", (str(chest / "NORMAL"), str(chest / "PNEUMONIA")))
    return {"brain_mri_yesno": read_dataset(root / "brain_mri_yesno").records,
            "chest_xray_pneumonia": read_dataset(chest / "manifest.csv", spec).records}


def split(records, seed: int = 0):
    from cbr.data.splits import group_split

    labels = [r.label for r in records]
    groups = [r.group if r.group is not None else r.sha256 for r in records]
    train, held = group_split(labels, groups, fraction=0.2, seed=seed)
    return [records[i] for i in train], [records[i] for i in held]


def typicalities(searcher, records, alpha: float, batch: int = 32):
    """(typicality, flagged) of each record, as the Searcher computes it, with batched embedding.

    The query path embeds one image at a time; here the images are embedded 32 at a time and then
    scored with the same functions the Searcher uses (a search as deep as the calibration's k with
    the same exclusions, `knn_score`, `assess`). `spot_check` compares the two on a few images.
    """
    from sqlalchemy import select

    import index as ix
    from cbr.data.batches import iter_batches
    from cbr.pipeline.typicality import assess, knn_score
    from cbr.store.schema import Case

    with searcher.cb.read() as s:
        by_sha = {sha: cid for cid, sha in s.execute(select(Case.id, Case.sha256))}
        by_group: dict = {}
        for cid, g in s.execute(select(Case.id, Case.group_id).where(Case.group_id.is_not(None))):
            by_group.setdefault(g, []).append(cid)
    members, cals = searcher.members, searcher._typicality
    out = [None] * len(records)
    for idx, tensors, _bad in iter_batches(records, [m.embedder.preprocess for m in members], batch, 0):
        if not idx:
            continue
        exclude = [[by_sha[records[i].sha256]] if records[i].sha256 in by_sha else [] for i in idx]
        exclude = [e + by_group.get(records[i].group, []) if records[i].group is not None else e
                   for e, i in zip(exclude, idx)]
        scores = []
        for m, x, cal in zip(members, tensors, cals):
            D, _ = ix.search(m.index, m.embedder.embed(x).numpy(), cal.k, exclude=exclude)
            scores.append([knn_score(row, cal.k) for row in D])
        for j, i in enumerate(idx):
            t = assess([sc[j] for sc in scores], cals, alpha)
            out[i] = (t.value, t.out_of_distribution)
    return [o for o in out if o is not None]


def spot_check(searcher, records, alpha: float, n: int = 3) -> None:
    """The batched figures must be the Searcher's own, query for query."""
    fast = typicalities(searcher, records[:n], alpha)
    for r, (t, flag) in zip(records[:n], fast):
        p = searcher.query(r.path, patient=r.group, record=False, render=False).prediction
        assert abs(p["typicality"] - t) < 1e-9 and p["out_of_distribution"] == flag, (r.path, p, t)


def leave_one_out(searcher, alpha: float):
    """Share of the calibration cases flagged when each is tested against the others' scores."""
    from cbr.pipeline.typicality import TypicalityCalibration, assess

    flagged = []
    for cal in searcher._typicality:
        s = cal.scores
        for i in range(len(s)):
            rest = TypicalityCalibration(cal.k, np.delete(s, i))
            flagged.append(assess([s[i]], [rest], alpha).out_of_distribution)
    return float(np.mean(flagged)) if flagged else None


def measure(name, cb, foreign, held, alpha, limit):
    from cbr.evaluation.selective import ood_detection
    from cbr.pipeline.query import Searcher

    searcher = Searcher(cb, k=5, explain="none", render=False, ood_alpha=alpha)
    foreign = foreign[:limit]
    spot_check(searcher, foreign, alpha)
    t0 = time.perf_counter()
    t_in = typicalities(searcher, held, alpha) if held else []
    t_out = typicalities(searcher, foreign, alpha)
    elapsed = time.perf_counter() - t0
    det = ood_detection([t for t, _ in t_in], [t for t, _ in t_out], flagged_out=[f for _, f in t_out],
                        flagged_in=[f for _, f in t_in])
    cal = searcher._typicality[0]
    return dict(det, pair=name, loo_flagged=leave_one_out(searcher, alpha), calibration_cases=cal.n, k=cal.k,
                threshold=max(alpha, 1 / (cal.n + 1)), seconds=round(elapsed, 1))


def calibration_cost(sizes, dim: int = 1280, group: int = 3) -> list[list]:
    """Seconds to calibrate (typicality and credibility) a flat index of n random unit vectors,
    patients of ``group`` images: what `cbr index`, retain and remove pay on top of their work."""
    import index as ix
    from cbr.pipeline.calibration import _credibility_rows
    from cbr.pipeline.typicality import leave_one_out_scores, search_excluding

    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(1, n + 1, dtype=np.int64)
        index = ix.build(dim, "flat")
        ix.add(index, x, ids)
        groups = {int(i): f"p{int(i) // group}" for i in ids}
        t0 = time.perf_counter()
        leave_one_out_scores(index, ids, x, groups)
        t1 = time.perf_counter()
        by_group: dict = {}
        for i in ids.tolist():
            by_group.setdefault(groups[i], []).append(i)
        pick = np.sort(np.random.default_rng(0).choice(n, size=min(500, n), replace=False))
        D, I = search_excluding(index, x[pick], 50, [by_group[groups[int(ids[p])]] for p in pick])
        _credibility_rows(ids[pick], D, I, {int(i): ("a", groups[int(i)]) for i in ids})
        t2 = time.perf_counter()
        out.append([n, f"{t1 - t0:.2f}", f"{t2 - t1:.2f}"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="mobilenet_v2", help="backbone name (ImageNet weights) or checkpoint path")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--limit", type=int, default=None, help="foreign queries per pair (default: all)")
    ap.add_argument("--demo", default=None, help="the demo's case base (cbr demo --out DIR: DIR/cases.db)")
    ap.add_argument("--pairs", default="brain,chest", help="which real pairs: brain, chest (comma-separated)")
    ap.add_argument("--train-epochs", type=int, default=0,
                    help="fine-tune --model (a backbone name) on each case base's own part first, for N epochs")
    ap.add_argument("--img-size", type=int, default=160, help="input side of the fine-tuned model")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--cost", default="", help="only time calibration at these case counts, e.g. 1000,10000")
    args = ap.parse_args()

    from cbr.pipeline.index import index_dataset
    from cbr.store.casebase import open_casebase

    if args.cost:
        rows = calibration_cost([int(n) for n in args.cost.split(",")])
        print(table(["cases", "typicality calibration (s)", "credibility calibration (s)"], rows))
        write_json("bench_ood_cost", {"rows": rows}, args.out)
        return
    data = datasets(Path(args.data))
    rows = []
    pairs = {"brain": ("brain_mri_yesno", "chest_xray_pneumonia"), "chest": ("chest_xray_pneumonia", "brain_mri_yesno")}
    weights = "imagenet" if not Path(args.model).exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        for key in [p for p in args.pairs.split(",") if p]:
            home, away = pairs[key]
            train, held = split(data[home])
            cb = open_casebase(Path(tmp) / f"{home}.db")
            model, kw = args.model, ({"weights": weights} if weights else {})
            if args.train_epochs:
                from cbr.learn.config import TrainConfig
                from cbr.learn.train import train_model

                model, kw = str(Path(tmp) / f"{home}.pt"), {}
                train_model(out=model, records=train, config=TrainConfig(
                    backbone=args.model, epochs=args.train_epochs, img_size=args.img_size, num_workers=0, device="cpu"))
            index_dataset(cb, None, records=train, models=[model], explain="none", num_workers=0, **kw)
            row = measure(f"{home} ({len(train)} cases) <- {away}", cb, data[away], held, args.alpha, args.limit)
            rows.append(row)
            print(f"  {row['pair']}: done in {row['seconds']} s", flush=True)
    if args.demo:
        from sqlalchemy import select

        from cbr.data.dataset import read_dataset
        from cbr.store.schema import Case

        cb = open_casebase(args.demo, create=False)
        with cb.read() as s:
            cases = set(s.scalars(select(Case.sha256)))
        # the demo's held-out phantoms (unseen patients) are its in-distribution queries
        phantoms = read_dataset(Path(args.demo).parent / "phantoms" / "manifest.csv").records
        held = [r for r in phantoms if r.sha256 not in cases]
        for away in ("brain_mri_yesno", "chest_xray_pneumonia"):
            row = measure(f"demo phantoms <- {away}", cb, data[away], held, args.alpha, args.limit)
            rows.append(row)
            print(f"  {row['pair']}: done in {row['seconds']} s", flush=True)

    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    tuned = f" fine-tuned {args.train_epochs} epochs at {args.img_size} px on each case base" if args.train_epochs else ""
    print(f"\nmodel {args.model}{tuned}, alpha {args.alpha}, k {rows[0]['k'] if rows else '-'}")
    print(table(["case base <- foreign", "cal. cases", "threshold", "foreign flagged", "held-out flagged",
                 "LOO flagged", "AUROC", "FPR@95TPR", "n in", "n out"],
                [[r["pair"], r["calibration_cases"], f(r["threshold"]), f(r["flagged_out"]), f(r["flagged_in"]),
                  f(r["loo_flagged"]), f(r["auroc"]), f(r["fpr_at_95_tpr"]), r["n_in"], r["n_out"]] for r in rows]))
    write_json("bench_ood", {"model": args.model, "train_epochs": args.train_epochs, "alpha": args.alpha,
                             "limit": args.limit, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
