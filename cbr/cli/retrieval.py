"""``cbr index`` and ``cbr query``: building a case base and asking it."""

import json

import click

from cbr.cli import cli
from cbr.cli.options import (
    RegistryChoice,
    cam_names,
    db_option,
    ensemble_names,
    index_dir_option,
    json_option,
    manifest_options,
    progress_enabled,
    vote_names,
)

# The registries are plain dicts in light modules; listing their names here must not import torch.
BACKBONE_HINT = "a backbone name (see `cbr models`) or a checkpoint path from `cbr train`"


def _print_report(report, db):
    click.echo(f"Indexed {report.source} into {db}")
    click.echo(f"  models:        {', '.join(report.models)}")
    click.echo(f"  cases added:   {report.added}")
    if report.embedded:
        click.echo(f"  re-embedded:   {report.embedded} (existing cases, new model)")
    click.echo(f"  already there: {report.already}")
    dups = [p for p in report.problems if p.reason.startswith("duplicate")]
    click.echo(f"  duplicates:    {len(dups)}")
    bad = [p for p in report.problems if not p.reason.startswith("duplicate")]
    click.echo(f"  skipped:       {len(bad)}")
    for p in report.problems:
        click.echo(f"    {p.path}: {p.reason}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    if report.rebuilt:
        click.echo(f"  rebuilt:       {', '.join(report.rebuilt)}")
    click.echo(f"  elapsed:       {report.elapsed:.1f} s ({report.images_per_s:.1f} images/s)")


@cli.command("index")
@click.argument("data", required=False, type=click.Path(exists=True))
@db_option
@index_dir_option
@click.option("--model", "models", multiple=True, help=f"Embedder: {BACKBONE_HINT}. Repeat for an ensemble. [default: mobilenet_v2]")
@click.option("--weights", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True,
              help="Weights for backbone names (checkpoints carry their own).")
@click.option("--index-type", default="flat", show_default=True, help="flat, hnsw, ivf, or any faiss factory string.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--explain", "explain", type=RegistryChoice(cam_names, extra=("none",)), default="gradcam", show_default=True,
              help="CAM method for each case's stored map.")
@click.option("--target-layer", default=None, help="CAM layer for the stored maps, a module path inside the trunk "
              "(e.g. features.13) [default: the last convolutional block].")
@click.option("--rebuild", is_flag=True, help="Rebuild every index from the embeddings stored in the case base (no image is re-read).")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Decoding worker processes [default: 1 on 2 cores].")
@manifest_options
@json_option
def index_cmd(data, db, index_dir, models, weights, index_type, batch_size, explain, target_layer, rebuild, workers,
              manifest, as_json):
    """Index a labelled dataset into a case base (incremental and resumable).

    DATA is a folder with one sub-folder per class, or a CSV manifest with the columns
    path,label[,patient_id][,metadata...]. Bad files are skipped and listed with their reason.

    \b
    Example:
        cbr index data/brain_mri --db cases.db
        cbr index ham10000.csv --images HAM10000_images --label-column dx --group-column lesion_id
        cbr index data/ --model model.pt --model resnet50 --db cases.db
        cbr index data/ --explain layercam --target-layer features.13
        cbr index --rebuild --db cases.db
    """
    from cbr.store.casebase import open_casebase
    from cbr.pipeline.index import index_dataset

    if data is None and not rebuild:
        raise click.UsageError("give a DATA folder or CSV manifest, or --rebuild")
    cb = open_casebase(db, index_dir=index_dir)
    report = index_dataset(
        cb, data, models=models or ("mobilenet_v2",), weights=weights, index_type=index_type,
        batch_size=batch_size, explain=explain, rebuild=rebuild, manifest=manifest,
        progress=progress_enabled(), num_workers=workers, target_layer=target_layer,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif data is None:
        click.echo(f"Rebuilt {len(report.rebuilt)} index(es) of {db} from stored embeddings: {', '.join(report.rebuilt)}")
    else:
        _print_report(report, db)


def _print_answer(a):
    p = a.prediction
    label = "ABSTAINED" if p["abstained"] else p["label"]
    cred = "" if p["credibility"] is None else f"  credibility {p['credibility']:.3f}"
    click.echo(f"Query {a.query_id}: {a.image}")
    click.echo(f"  diagnosis: {label}  confidence {p['confidence']:.3f}{cred}")
    click.echo("  probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(p["probabilities"].items(), key=lambda kv: -kv[1])))
    for mem in a.members:
        if len(a.members) > 1:
            v = mem["vote"]
            click.echo(f"  member {mem['model']}: {v['label']} ({v['confidence']:.3f})")
        click.echo(f"  {'rank':>4}  {'case':>6}  {'label':<14} {'similarity':>10}  {'patient':<12} path")
        for n in mem["neighbours"]:
            click.echo(f"  {n['rank']:>4}  {n['case_id']:>6}  {n['label'][:14]:<14} {n['similarity']:>10.4f}  "
                       f"{str(n['patient_id'] or '-')[:12]:<12} {n['path']}")
    for note in a.notes:
        click.echo(f"  note: {note}")
    if a.explanation:
        click.echo(f"  maps:   {a.explanation} (and neighbour-*.jpg, panel.jpg beside it)")
    if a.report:
        click.echo(f"  report: {a.report}")


@cli.command("query")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@db_option
@index_dir_option
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True, help="Neighbours per member.")
@click.option("--vote", type=RegistryChoice(vote_names), default="weighted", show_default=True, help="Vote rule.")
@click.option("--ensemble", type=RegistryChoice(ensemble_names), default="confidence", show_default=True, help="How members combine.")
@click.option("--min-credibility", type=click.FloatRange(0, 1), default=None, help="With --vote credibility: abstain below this.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True, help="Softmax temperature of the weighted vote.")
@click.option("--patient", default=None, help="The query's patient id: that patient's cases are never retrieved.")
@click.option("--model", "models", multiple=True, help="Use only these members (name, checkpoint or fingerprint).")
@click.option("--explain", "explain", type=RegistryChoice(cam_names, extra=("none",)), default="gradcam", show_default=True,
              help="CAM method for the maps.")
@click.option("--scale", type=click.Choice(["shared", "per-image"]), default="shared", show_default=True, help="Colour scale of the maps.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="cbr-reports", show_default=True, help="Where overlays and reports go.")
@json_option
def query_cmd(images, db, index_dir, k, vote, ensemble, min_credibility, temperature, patient, models, explain,
              scale, out_dir, as_json):
    """Diagnose images from their nearest cases, with maps of where the network looked.

    Prints the prediction, its confidence, per-class probabilities and each neighbour, and writes
    overlays and a self-contained HTML report per query. Every query is recorded for auditing.

    \b
    Example:
        cbr query scan.png --db cases.db -k 5
        cbr query a.png b.png --vote credibility --min-credibility 0.1 --json
        cbr query scan.png --patient P017 --explain gradcam++
    """
    from cbr.store.casebase import open_casebase
    from cbr.pipeline.query import query_images

    cb = open_casebase(db, create=False, index_dir=index_dir)
    answers = query_images(cb, images, patient=patient, out_dir=out_dir, k=k, vote=vote, ensemble=ensemble,
                           explain=explain, min_credibility=min_credibility, temperature=temperature,
                           scale=scale, models=models or None)
    if as_json:
        for a in answers:
            click.echo(json.dumps(a.to_dict()))
    else:
        for a in answers:
            _print_answer(a)


@cli.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Folder for the phantoms, model, case base and reports.")
@click.option("--patients", type=click.IntRange(12, 10000), default=36, show_default=True, help="Synthetic patients (3 classes).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=8, show_default=True, help="Fine-tuning epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
def demo_cmd(out_dir, patients, epochs, seed, as_json):
    """Run the whole product offline on synthetic MRI phantoms.

    Generates phantom slices (normal, tumour, cyst; several slices per patient, lesion masks),
    fine-tunes MobileNetV2 briefly, indexes a case base, queries held-out patients and prints the
    accuracy, the pointing-game rate of the maps and the path of an HTML report.

    \b
    Example:
        cbr demo
        cbr demo --out /tmp/demo --patients 60
    """
    from dataclasses import asdict

    from cbr.pipeline.demo import run_demo

    result = run_demo(out_dir, patients=patients, epochs=epochs, seed=seed, progress=progress_enabled(),
                      log=(lambda *_: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    click.echo("")
    click.echo(f"{'image':<16} {'patient':<8} {'truth':<8} {'prediction':<10} {'conf':>5}  map in lesion")
    for r in result.rows:
        mark = "-" if r["pointing"] is None else ("yes" if r["pointing"] else "no")
        click.echo(f"{r['image']:<16} {r['patient']:<8} {r['label']:<8} {str(r['prediction']):<10} {r['confidence']:>5.2f}  {mark}")
    click.echo("")
    click.echo(f"held-out accuracy:          {result.accuracy:.3f}  (balanced {result.balanced_accuracy:.3f}, {result.queries} queries)")
    if result.pointing_game is not None:
        per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result.pointing_by_class.items()))
        click.echo(f"pointing game (lesions):    {result.pointing_game:.3f}  ({per})")
    click.echo(f"case base:                  {result.case_base}")
    click.echo(f"example report:             {result.report}")
    click.echo(f"audit it:                   cbr history --db {result.case_base}")
