"""``cbr feedback`` and ``cbr remove``: an expert's verdict on a past query (and retaining it as a
case), and taking cases out of search.

Apart from the read-only audit commands (cbr/cli/audit.py): both change the case base, its indexes
and its calibration, so this module's imports reach the case writer and the calibration.
"""

import json

import click

from cbr.cli.options import db_option, index_dir_option, json_option
from cbr.cli.terminal import echo, utc_time
from cbr.pipeline.audit.feedback import add_feedback
from cbr.pipeline.audit.removal import remove_cases
from cbr.store.casebase import open_casebase


@click.command("feedback")
@click.argument("query_id", type=int)
@db_option
@index_dir_option
@click.option("--label", required=True, help="The expert's label (a label no case has yet starts a new class).")
@click.option("--note", default=None, help="Free-text comment stored with the verdict.")
@click.option("--by", default=None, help="Who gives the verdict.")
@click.option("--retain", is_flag=True, help="Add the query image to the case base with this label.")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="With --retain: the query image if it moved (its sha256 must match the query's).")
@click.option("--region", default=None, metavar="X0,Y0,X1,Y1",
              help="The expert's box on the lesion, in the query image's pixels; exported as a lesion mask "
              "for `cbr train --mask-guidance` (`cbr export --what regions --masks DIR`).")
@click.option("--new-class", "new_class", is_flag=True,
              help="Confirm that --label starts a new class; without it a label no case has is refused (a typo).")
@json_option
def feedback_cmd(query_id, db, index_dir, label, note, by, retain, image, region, new_class, as_json):
    """Record an expert's verdict on a query: confirm or correct it, and optionally retain it.

    Verdicts are never overwritten: each is a new row with its time. --retain adds the query
    image as a labelled case, embedded, explained and indexed in every member, like `cbr index`.

    \b
    Example:
        cbr feedback 12 --label tumour --by dr.lee --db cases.db
        cbr feedback 12 --label cyst --note "fluid level" --retain
        cbr feedback 12 --label cyst --retain --image /archive/scan-12.png
        cbr feedback 12 --label tumour --region 40,32,120,96
        cbr feedback 12 --label meningioma --new-class --retain
    """
    if image is not None and not retain:
        raise click.UsageError("--image is only used with --retain")
    cb = open_casebase(db, create=False, index_dir=index_dir, readonly=False)
    result = add_feedback(cb, query_id, label, note=note, by=by, retain=retain, image=image, region=region,
                          allow_new_class=new_class)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in result["messages"]:
        echo(line)


@click.command("remove")
@click.argument("case_ids", nargs=-1, required=True, type=int)
@db_option
@index_dir_option
@click.option("--reason", default=None, help="Why; stored with each case.")
@json_option
def remove_cmd(case_ids, db, index_dir, reason, as_json):
    """Take cases out of search, in the case base and in every index.

    The rows stay (marked removed, with time and reason), so past queries still show them.

    \b
    Example:
        cbr remove 17 18 --reason "mislabelled" --db cases.db
    """
    result = remove_cases(open_casebase(db, create=False, index_dir=index_dir, readonly=False), case_ids, reason=reason)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for note in result["notes"]:
        echo(f"note: {note}")
    if result["removed"]:
        why = f" (reason: {reason})" if reason else ""
        echo(f"removed {len(result['removed'])} case(s) from search: {', '.join(map(str, result['removed']))}{why}; "
             f"{result['members']} member index(es) saved")
    for a in result["already"]:
        echo(f"case {a['case_id']} was already removed on {utc_time(a['removed_at'])} UTC"
             + (f" ({a['reason']})" if a["reason"] else ""))
