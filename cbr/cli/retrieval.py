"""``cbr index`` and ``cbr query``: building a case base and asking it."""

from dataclasses import asdict
import json
import shlex

import click

from cbr.cli.terminal import echo, echo_problems, warn
from cbr.cli.options import (
    RegistryChoice,
    cam_names,
    db_option,
    ensemble_names,
    index_dir_option,
    json_option,
    manifest_options,
    progress_enabled,
    scale_option,
    source_options,
    vote_names,
    weights_option,
    where_option,
    contrast_option,
    crop_option,
    tta_option,
)
from cbr.data.dataset import DUPLICATE
from cbr.pipeline.demo import DemoConfig, run_demo
from cbr.pipeline.finding_search import parse_region
from cbr.pipeline.index import index_dataset
from cbr.pipeline.query import query_embeddings, query_images
from cbr.store.casebase import open_casebase
from cbr.store.encoding import EMBEDDING_DTYPES
from cbr.pipeline.settings import DEFAULT_REPORTS, ENGINES, IndexConfig, NO_EXPLANATION, QueryConfig
from cbr.models.similarity_maps import SIMILARITY_MAPS
from cbr.reporting.uncertainty import answer_lines, conflict_text, finding_lines, shows_probabilities

# The registries are plain dicts in light modules; listing their names here must not import torch.
BACKBONE_HINT = "a backbone name (see `cbr models`; timm:<name> for a timm model) or a checkpoint path from `cbr train`"


def _print_report(report, db):
    echo(f"Indexed {report.source} into {db}")
    echo(f"  models:        {', '.join(report.models)}")
    echo(f"  cases added:   {report.added}")
    if report.embedded:
        echo(f"  re-embedded:   {report.embedded} (existing cases, new model)")
    echo(f"  already there: {report.already}")
    dups = [p for p in report.problems if p.kind == DUPLICATE]
    echo(f"  duplicates:    {len(dups)}")
    echo(f"  skipped:       {len(report.problems) - len(dups)}")
    echo_problems(report.problems, report.notes)
    if report.rebuilt:
        echo(f"  rebuilt:       {', '.join(report.rebuilt)}")
    echo(f"  elapsed:       {report.elapsed:.1f} s ({report.images_per_s:.1f} images/s)")


@click.command("index")
@click.argument("data", required=False, type=click.Path(exists=True))
@db_option
@index_dir_option
@click.option("--model", "models", multiple=True, help=f"Embedder: {BACKBONE_HINT}. Repeat for an ensemble. [default: mobilenet_v2]")
@weights_option
@click.option("--index-type", default=IndexConfig.index_type, show_default=True,
              help="flat, hnsw, ivf, ivf-sq8, ivf-pq, ivf-pq-fs, auto (by size: flat < 100k, ivf-sq8 < 1M, "
              "else ivf-pq-fs), or a faiss factory string.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=IndexConfig.batch_size, show_default=True)
@click.option("--explain", "explain", type=RegistryChoice(cam_names, extra=(NO_EXPLANATION,)),
              default=IndexConfig.explain, show_default=True, help="CAM method for each case's stored map.")
@click.option("--target-layer", default=None, help="CAM layer for the stored maps, a module path inside the trunk "
              "(e.g. features.13) [default: the last convolutional block].")
@click.option("--rebuild", is_flag=True, help="Rebuild every index from the embeddings stored in the case base (no image is re-read).")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Decoding worker processes [default: 1 on 2 cores].")
@click.option("--engine", type=click.Choice(ENGINES), default=IndexConfig.engine, show_default=True,
              help="Where images are decoded, embedded and explained: here, or on Ray (pip install 'cbr[ray]').")
@click.option("--ray-address", default=None, help="--engine ray: the cluster to use (e.g. ray://head:10001) "
              "[default: start a local one].")
@click.option("--embedding-dtype", type=click.Choice(EMBEDDING_DTYPES), default=IndexConfig.embedding_dtype,
              show_default=True, help="How embeddings are stored: float32 (exact rebuilds) or float16 (half the bytes).")
@contrast_option
@tta_option
@crop_option
@manifest_options
@source_options()
@json_option
def index_cmd(data, db, index_dir, models, weights, index_type, batch_size, explain, target_layer, rebuild, workers,
              engine, ray_address, embedding_dtype, contrast, tta, crop, manifest, sources, as_json):
    """Index a labelled dataset into a case base (incremental and resumable).

    DATA is a folder with one sub-folder per class, a CSV manifest with the columns
    path,label[,patient_id][,metadata...], or a MedMNIST-style .npz. Images may be PNG/JPEG,
    DICOM (found by content, with or without an extension; every frame a case), or NIfTI
    volumes (every slice a case). Bad files are skipped and listed with their reason.

    \b
    Example:
        cbr index data/brain_mri --db cases.db
        cbr index ham10000.csv --images HAM10000_images --label-column dx --group-column lesion_id
        cbr index data/ --model model.pt --model resnet50 --db cases.db
        cbr index data/ --explain layercam --target-layer features.13
        cbr index --rebuild --db cases.db
        cbr index xrays/ --contrast clahe --tta flip
        cbr index mri/ --crop foreground
        cbr index dicom_by_class/ --window ct-lung --pseudonymise "$KEY"
        cbr index volumes/ --slices every:4 --axis axial
        cbr index pneumoniamnist.npz --split train --classes normal,pneumonia
        cbr index archive.csv --engine ray --ray-address ray://head:10001 --db postgresql+psycopg://cbr@db/cases
    """
    if data is None and not rebuild:
        raise click.UsageError("give a DATA folder or CSV manifest, or --rebuild")
    config = IndexConfig(models=models or IndexConfig.models, weights=weights, index_type=index_type,
                         batch_size=batch_size, explain=explain, target_layer=target_layer, num_workers=workers,
                         engine=engine, ray_address=ray_address, embedding_dtype=embedding_dtype, contrast=contrast,
                         tta=tta, crop=crop)
    cb = open_casebase(db, index_dir=index_dir)
    report = index_dataset(cb, data, config, manifest=manifest, rebuild=rebuild, progress=progress_enabled(),
                           sources=sources)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif data is None:
        click.echo(f"Rebuilt {len(report.rebuilt)} index(es) of {db} from stored embeddings: {', '.join(report.rebuilt)}")
    else:
        _print_report(report, db)


def _print_answer(a):
    p = a.prediction
    reason = p.get("abstain_reason")
    label = (f"ABSTAINED ({reason})" if reason else "ABSTAINED") if p["abstained"] else p["label"]
    cred = "" if p["credibility"] is None else f"  credibility {p['credibility']:.3f}"
    typ = "" if p.get("typicality") is None else f"  typicality {p['typicality']:.3g}"
    echo(f"Query {a.query_id if a.query_id is not None else '(not recorded)'}: {a.image}")
    if a.region:
        echo(f"  region: {a.region['box']} ({a.region['source']}); searched among the cases' findings, each "
             "neighbour's own finding box beside it")
    if p.get("out_of_distribution"):
        echo(f"  WARNING: out of distribution, unlike every case in this case base (typicality {p['typicality']:.3g}); "
             + ("no diagnosis is given" if p["abstained"] else "the vote below is shown only because of --answer-anyway"))
    if conflict_text(p.get("conflict"), p["label"]):
        warn("  " + conflict_text(p["conflict"], p["label"]))
    echo(f"  diagnosis: {label}  confidence {p['confidence']:.3f}{cred}{typ}")
    for line in answer_lines(dict(p, calibration=a.calibration)):
        echo(f"  {line}")
    if shows_probabilities(p):  # an abstention's probabilities would read as a diagnosis
        echo("  probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(p["probabilities"].items(),
                                                                               key=lambda kv: -kv[1])))
    for mem in a.members:
        if len(a.members) > 1:
            v = mem["vote"]
            echo(f"  member {mem['model']}: {v['label']} ({v['confidence']:.3f}; {mem['evidence']['text']})")
        echo(f"  {'rank':>4}  {'case':>6}  {'label':<14} {'similarity':>10}  {'patient':<12} path")
        for n in mem["neighbours"]:
            status = n.get("image_status")
            echo(f"  {n['rank']:>4}  {n['case_id']:>6}  {n['label'][:14]:<14} {n['similarity']:>10.4f}  "
                 f"{str(n['patient_id'] or '-')[:12]:<12} {n['path']}"
                 + (f"  [{status}]" if status not in (None, "ok") else "")
                 + (f"  finding {n['finding']}" if n.get("finding") else ""))
    for line in finding_lines(a.finding, a.nearest_unlike, a.map_reliability):
        echo(f"  {line}")
    for note in a.notes:
        if not note.startswith("out of distribution:"):  # the warning above says it
            echo(f"  note: {note}")
    if a.explanation:
        echo(f"  maps:   {a.explanation} (and neighbour-*.jpg, panel.jpg beside it)")
    if a.report:
        echo(f"  report: {a.report}")


@click.command("query")
@click.argument("images", nargs=-1, required=False, type=click.Path())
@click.option("--embedding", "embedding", type=click.Path(dir_okay=False), default=None,
              help="Query by embeddings computed elsewhere by the case base's model instead of IMAGES: an .npy of "
              "one vector or one per row (with --explain none: there is no image to explain).")
@db_option
@index_dir_option
@click.option("-k", "k", type=click.IntRange(1, 1000), default=QueryConfig.k, show_default=True, help="Neighbours per member.")
@click.option("--vote", type=RegistryChoice(vote_names), default=QueryConfig.vote, show_default=True, help="Vote rule.")
@click.option("--ensemble", type=RegistryChoice(ensemble_names), default=QueryConfig.ensemble, show_default=True,
              help="How members combine.")
@click.option("--min-credibility", type=click.FloatRange(0, 1), default=None, help="With --vote credibility: abstain below this.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Softmax temperature of the weighted vote. [default: fitted by likelihood on the case base's "
              "calibration slice, shown in --json]")
@click.option("--patient", default=None, help="The query's patient id: that patient's cases are never retrieved "
              "(hashed with --pseudonymise KEY in a pseudonymised case base) [default: a DICOM query's PatientID].")
@click.option("--model", "models", multiple=True, help="Use only these members (name, checkpoint or fingerprint).")
@where_option
@click.option("--explain", "explain", type=RegistryChoice(cam_names, extra=(NO_EXPLANATION,)), default=QueryConfig.explain,
              show_default=True, help="Method for the maps: a CAM, or an attribution (lime, kernelshap, deeplift, "
              "integrated-gradients, occlusion) that costs many model evaluations per map.")
@click.option("--similarity-map", type=click.Choice(tuple(SIMILARITY_MAPS)), default=QueryConfig.similarity_map,
              show_default=True, help="Why-this-neighbour maps of a CAM method: region matching (linked regions of the "
              "query and the case; measured to localise better) or a CAM of the global cosine.")
@click.option("--explain-budget", type=click.IntRange(1, 100000), default=None,
              help="Cap on the model evaluations of each attribution map (LIME/KernelSHAP samples, "
              "integrated-gradients steps, occlusion positions). [default: 200 samples, 32 steps, 225 positions]")
@click.option("--explain-neighbours", type=click.IntRange(0, 1000), default=None,
              help="Similarity maps for the top n neighbours only (the others show their stored map). [default: all]")
@scale_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=DEFAULT_REPORTS, show_default=True,
              help="Where overlays and reports go.")
@click.option("--ood-alpha", type=click.FloatRange(0, 1, max_open=True), default=QueryConfig.ood_alpha, show_default=True,
              help="Out of distribution (no diagnosis) when the query's typicality p-value is at most this; 0 never flags.")
@click.option("--answer-anyway", is_flag=True, help="Show the vote of an out-of-distribution query all the same (it stays flagged).")
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=QueryConfig.coverage,
              show_default=True, help="Of the prediction set: it holds the true class of at least this share of each "
              "class's queries (conformal, calibrated on cases the model never trained on).")
@click.option("--abstain-ambiguous", is_flag=True, help="No diagnosis (abstain_reason 'ambiguous') when the prediction "
              "set holds more than one class.")
@click.option("--region", default=None, help="Search by finding: the region x0,y0,x1,y1 (the image's pixels), or "
              "'auto' (the lesion localiser's strongest region), among the case base's findings.")
@click.option("--no-record", is_flag=True, help="Answer without storing the query or writing a report "
              "(works on a read-only case base, e.g. a replica).")
@source_options("window", "axis", "volume", "pseudonymise", "allow_burned_in")
@json_option
def query_cmd(images, embedding, db, index_dir, k, vote, ensemble, min_credibility, temperature, patient, models, where,
              explain, similarity_map, explain_budget, explain_neighbours, scale, out_dir, ood_alpha, answer_anyway,
              coverage, abstain_ambiguous, region, no_record, sources, as_json):
    """Diagnose images from their nearest cases, with maps of where the network looked.

    Prints the prediction, its confidence, per-class probabilities and each neighbour, and writes
    overlays and a self-contained HTML report per query. Every query is recorded for auditing.

    \b
    Example:
        cbr query scan.png --db cases.db -k 5
        cbr query a.png b.png --vote credibility --min-credibility 0.1 --json
        cbr query scan.png --patient P017 --explain gradcam++
        cbr query scan.png --no-record --db "sqlite:////replica/cases.db?mode=ro&uri=true"
        cbr query scan.png --explain lime --explain-budget 100 --explain-neighbours 2
        cbr query scan.png --similarity-map cosine   # global-cosine CAMs instead of region matching
        cbr query odd.png --ood-alpha 0.05 --answer-anyway
        cbr query scan.png --coverage 0.95 --abstain-ambiguous   # no answer unless the set is one class
        cbr query lesion.jpg --where site=back --where sex=female
        cbr query scan.png --region 120,80,200,160   # search among the cases' findings (lesions)
        cbr query ct/IM0042                  # DICOM, any name; a multi-frame file: its middle frame
        cbr query ct/IM0042 --pseudonymise "$KEY"   # its PatientID, hashed as at index time, is left out
        cbr query "cine.dcm#frame=12" "brain.nii.gz#axis=axial&slice=40" "pneumoniamnist.npz#split=test&index=7"
        cbr query --embedding vectors.npy --explain none   # vectors from a GPU job: no image, no model run
    """
    if bool(images) == bool(embedding):
        raise click.UsageError("give IMAGES or --embedding FILE.npy (one of the two)")
    if embedding and region is not None:
        raise click.UsageError("--region needs an image; a query by --embedding searches whole-image embeddings")
    config = QueryConfig(k=k, vote=vote, ensemble=ensemble, min_credibility=min_credibility, temperature=temperature,
                         explain=explain, scale=scale, models=models, out_dir=out_dir, explain_budget=explain_budget,
                         explain_neighbours=explain_neighbours, progress=progress_enabled(), ood_alpha=ood_alpha,
                         answer_anyway=answer_anyway, where=where, similarity_map=similarity_map, coverage=coverage,
                         abstain_ambiguous=abstain_ambiguous)
    cb = open_casebase(db, create=False, index_dir=index_dir, readonly=None if no_record else False)
    if embedding:
        answers = query_embeddings(cb, embedding, config, patient=patient, record=not no_record)
    else:
        answers = query_images(cb, images, config, patient=patient, sources=sources, record=not no_record,
                               region=parse_region(region))
    if as_json:
        for a in answers:
            click.echo(json.dumps(a.to_dict()))
    else:
        for a in answers:
            _print_answer(a)


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Folder for the phantoms, model, case base and reports.")
@click.option("--patients", type=click.IntRange(12, 10000), default=36, show_default=True, help="Synthetic patients (3 classes).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=8, show_default=True, help="Fine-tuning epochs.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the phantoms, the split and the fine-tuning.")
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
    result = run_demo(out_dir, DemoConfig(patients=patients, epochs=epochs, seed=seed), progress=progress_enabled(),
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
    click.echo(f"review it in a browser:     cbr serve --db {shlex.quote(result.case_base)}")
