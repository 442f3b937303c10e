"""``cbr history``, ``show``, ``report``, ``export``: reading the audit trail (``cbr feedback`` and
``cbr remove``, which change the case base, are cbr/cli/curation.py)."""

import json
from datetime import datetime

import click

from cbr.cli.terminal import echo, utc_time, warn
from cbr.cli.options import RegistryChoice, db_option, index_dir_option, json_option, scale_option
from cbr.files import is_stdout
from cbr.pipeline.audit.export import EXPORT_FORMATS, EXPORTS, export
from cbr.pipeline.audit.regions import export_regions
from cbr.pipeline.audit.trail import history, rerender_report, show
from cbr.pipeline.settings import DEFAULT_REPORTS
from cbr.reporting.uncertainty import shows_probabilities
from cbr.store.casebase import open_casebase

SINCE_FORMAT = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM] (UTC unless an offset is given)"


class IsoDateTime(click.ParamType):
    """An ISO 8601 date or datetime; a bad value is a usage error that shows the format."""

    name = "DATE"

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            self.fail(f"{value!r} is not an ISO date or datetime; use {SINCE_FORMAT}", param, ctx)


def export_kinds():
    return list(EXPORTS)


def export_formats():
    return EXPORT_FORMATS


def _open(db, index_dir, *, readonly=False):
    """``readonly=None``: commands that only read also open a read-only case base (a replica)."""
    return open_casebase(db, create=False, index_dir=index_dir, readonly=readonly)


@click.command("history")
@db_option
@index_dir_option
@click.option("--since", type=IsoDateTime(), default=None, help=f"Only queries since then: {SINCE_FORMAT}.")
@click.option("--label", default=None, help="Only queries whose latest expert feedback is this label.")
@click.option("--predicted", default=None, help="Only queries predicted as this label.")
@click.option("--disagreed", is_flag=True, help="Only queries whose latest feedback differs from the prediction.")
@click.option("--ood", is_flag=True, help="Only queries flagged out of distribution (unlike every case).")
@click.option("--abstained", is_flag=True, help="Only queries that abstained.")
@click.option("--reviewed/--unreviewed", default=None, help="Only queries with expert feedback / not yet reviewed.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many queries.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many first (paging).")
@json_option
def history_cmd(db, index_dir, since, label, predicted, disagreed, ood, abstained, reviewed, limit, offset, as_json):
    """List past queries, newest first, with their expert feedback.

    Feedback shows as - (none), confirmed, or corrected -> LABEL (the latest verdict), plus
    "retained" when the image was added as a case. Times are UTC.

    \b
    Example:
        cbr history --db cases.db
        cbr history --disagreed --since 2024-05-01
        cbr history --label tumour --predicted cyst --json
        cbr history --ood
        cbr history --unreviewed --abstained --limit 20 --offset 20
    """
    rows = history(_open(db, index_dir, readonly=None), since=since, label=label, predicted=predicted, disagreed=disagreed, limit=limit,
                   out_of_distribution=True if ood else None, abstained=True if abstained else None,
                   reviewed=reviewed, offset=offset)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        echo("no queries match")
        return
    w = max(len("feedback"), *(len(r["status"]) for r in rows))
    echo(f"{'id':>5}  {'time (UTC)':<19}  {'prediction':<14} {'conf':>5}  {'feedback':<{w}}  image")
    for r in rows:
        pred = "ABSTAINED" if r["abstained"] else str(r["prediction"])
        pred = f"OOD {pred}" if r.get("out_of_distribution") else pred
        echo(f"{r['query_id']:>5}  {utc_time(r['created_at']):<19}  {pred[:14]:<14} {r['confidence']:>5.3f}  "
                   f"{r['status']:<{w}}  {r['image']}")


def _map_text(m):
    if m is None:
        return "no map"
    h, w = m["shape"]
    return f"{m['method']} {m['target']} {h}x{w} raw max {m['scale']:.3g}"


def _print_record(r):
    p = r["prediction"]
    label = "ABSTAINED" if p["abstained"] else p["label"]
    cred = "" if p["credibility"] is None else f"  credibility {p['credibility']:.3f}"
    echo(f"Query {r['query_id']}  {utc_time(r['created_at'])} UTC")
    echo(f"  image:      {r['image']}  (sha256 {r['sha256'][:12]}...)")
    if r["patient_id"]:
        echo(f"  patient:    {r['patient_id']}")
    if p.get("out_of_distribution"):
        echo(f"  WARNING:    out of distribution, unlike every case in this case base (typicality "
                   f"{p['typicality']:.3g}); " + ("no diagnosis was given" if p["abstained"] else "answered with --answer-anyway"))
    if p.get("abstain_reason"):
        label = f"{label} ({p['abstain_reason']})"
    typ = "" if p.get("typicality") is None else f"  typicality {p['typicality']:.3g}"
    if p.get("conflict_text"):
        warn(f"  {p['conflict_text']}")
    echo(f"  diagnosis:  {label}  confidence {p['confidence']:.3f}{cred}{typ}")
    for line in p.get("lines") or []:
        echo(f"  {line}")
    for note in r.get("notes", []):
        if not note.startswith("out of distribution:"):
            echo(f"  note:       {note}")
    if shows_probabilities(p):
        echo("  probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(p["probabilities"].items(),
                                                                               key=lambda kv: -kv[1])))
    echo(f"  vote rule {r['vote_rule']}, k = {r['k']}, ensemble {r['ensemble']}, explanations {r['explain_method']}")
    for mem in r["members"]:
        v = mem["vote"]
        echo(f"  member {mem['model_id']}: {mem['model']} ({mem['weights']}), fingerprint {mem['fingerprint'][:12]}; "
                   f"vote {v['label']} ({v['confidence']:.3f})")
        for m in mem["query_maps"]:
            echo(f"    query map: {_map_text(m)}")
        echo(f"    {'rank':>4}  {'case':>6}  {'label':<14} {'similarity':>10}  {'patient':<10} map; path")
        for n in mem["neighbours"]:
            m = n["map"] or n["case_map"]
            kind = "" if m is None else (" (stored case map)" if n["map"] is None else "")
            removed = "  [removed since]" if n["removed"] else ""
            echo(f"    {n['rank']:>4}  {n['case_id']:>6}  {n['label'][:14]:<14} {n['similarity']:>10.4f}  "
                       f"{str(n['patient_id'] or '-')[:10]:<10} {_map_text(m)}{kind}; {n['path']}{removed}")
    if r["feedback"]:
        echo("  feedback:")
        for f in r["feedback"]:
            verdict = "confirmed" if f["label"] == p["label"] else "corrected"
            extra = "".join([f" by {f['by']}" if f["by"] else "", f": {f['note']}" if f["note"] else "",
                             f"  [retained as case {f['retained_case_id']}]" if f["retained_case_id"] else "",
                             _region_text(f.get("region"))])
            echo(f"    #{f['id']} {utc_time(f['created_at'])}  {verdict} {f['label']}{extra}")
    else:
        echo("  feedback:   none")
    if r["report"]:
        echo(f"  report:     {r['report']}")


def _region_text(region) -> str:
    """The expert's lesion box, as ``cbr feedback --region`` takes it."""
    return f"  [lesion box x0,y0,x1,y1 = {','.join(str(v) for v in region)} px]" if region else ""


@click.command("show")
@click.argument("query_id", type=int)
@db_option
@index_dir_option
@json_option
def show_cmd(query_id, db, index_dir, as_json):
    """Show a past query's full record, rebuilt from the case base.

    The prediction and probabilities, vote rule and k, each member's neighbours (label,
    similarity, path, patient, stored map), the model fingerprints and every expert feedback.

    \b
    Example:
        cbr show 12 --db cases.db
        cbr show 12 --json
    """
    record = show(_open(db, index_dir, readonly=None), query_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        _print_record(record)


@click.command("report")
@click.argument("query_id", type=int)
@db_option
@index_dir_option
@click.option("--out", type=click.Path(), default=None,
              help=f"Report file (or an existing folder; - is stdout) [default: {DEFAULT_REPORTS}/query-ID/report.html].")
@scale_option
def report_cmd(query_id, db, index_dir, out, scale):
    """Re-create a past query's self-contained HTML report from the case base.

    Needs none of the files written at query time; a case whose image is gone is drawn as a
    placeholder with its stored map.

    \b
    Example:
        cbr report 12 --db cases.db
        cbr report 12 --out audit/query-12.html --scale per-image
    """
    path = rerender_report(_open(db, index_dir), query_id, out, scale=scale)
    if not is_stdout(out):
        echo(f"report: {path}")


@click.command("export")
@db_option
@index_dir_option
@click.option("--what", type=RegistryChoice(export_kinds), required=True, help="Which rows.")
@click.option("--format", "fmt", type=RegistryChoice(export_formats), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file (written atomically; a FIFO is written through; - is stdout) [default: stdout].")
@click.option("--masks", type=click.Path(file_okay=False), default=None,
              help="With --what regions: write each box as a mask image in this folder, with a training "
              "manifest (regions.csv: path, label, patient, mask) for `cbr train --mask-guidance`.")
def export_cmd(db, index_dir, what, fmt, out, masks):
    """Export queries, cases, feedback or expert regions as CSV or JSON for analysis outside cbr.

    \b
    Columns:
        queries:  id, created_at, image, sha256, patient_id, k, vote_rule, ensemble, prediction,
                  confidence, abstained, probabilities, feedback_label (latest), abstain_reason,
                  typicality, out_of_distribution
        cases:    id, sha256, path, label, group_id, origin, dataset, added_at, removed_at,
                  removed_reason, metadata, query_id, feedback_id
        feedback: id, query_id, label, note, by, created_at, retained_case_id, region
        regions:  query_id, feedback_id, image, label, patient_id, region (each reviewed query's
                  latest expert box, with its latest verdict's label)
    JSON columns (probabilities, metadata) are JSON text in CSV. Times are UTC.

    \b
    Example:
        cbr export --what queries --format csv --out queries.csv --db cases.db
        cbr export --what cases --format json | jq '.[] | select(.origin == "retain")'
        cbr export --what regions --masks boxes/ && cbr train boxes/regions.csv --mask-guidance 1
    """
    if masks is not None:
        if what != "regions" or out is not None:
            raise click.UsageError("--masks is only used with --what regions (and writes its own regions.csv, "
                                   "so drop --out)")

        result = export_regions(_open(db, index_dir, readonly=None), masks)
        for p in result["problems"]:
            echo(f"skipped query {p['query_id']}: {p['reason']}")
        echo(f"wrote {result['rows']} mask(s) and the manifest {result['manifest']}")
        return

    n = export(_open(db, index_dir, readonly=None), what, fmt, out)
    if out is not None and not is_stdout(out):
        echo(f"exported {n} {what} row(s) to {out}")
