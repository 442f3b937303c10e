"""``cbr explain``: add maps made with another method to a past query."""

import json

import click

from cbr.cli.options import RegistryChoice, cam_names, db_option, index_dir_option, json_option, progress_enabled
from cbr.errors import UnknownNameError
from cbr.evaluation.comparison import parse_methods
from cbr.pipeline.addendum import add_explanation
from cbr.pipeline.settings import DEFAULT_REPORTS
from cbr.store.casebase import open_casebase


class MethodList(click.ParamType):
    """``a,b,c``, ``all`` or ``none``: explanation methods from the registry, as a tuple.

    The names are checked when the option is converted (exit 2 on an unknown one); listing them
    never imports torch.
    """

    name = "methods"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_methods(value)
        except UnknownNameError as e:
            self.fail(str(e), param, ctx)

    def get_metavar(self, param, *args, **kwargs):
        return "a,b,c|all|none"


@click.command("explain")
@click.argument("query_id", type=int)
@click.option("--method", "method", type=RegistryChoice(cam_names), required=True,
              help="Explanation method: a CAM or an attribution (lime, kernelshap, deeplift, integrated-gradients, "
              "occlusion).")
@click.option("--explain-budget", "budget", type=click.IntRange(1, 100000), default=None,
              help="Cap on the model evaluations of each attribution map. [default: the method's own]")
@click.option("--explain-neighbours", "neighbours", type=click.IntRange(0, 1000), default=None,
              help="Maps for the top n neighbours only. [default: all]")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="The query image, if it moved from its recorded path (its sha256 must match).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=DEFAULT_REPORTS, show_default=True,
              help="Where the query's report is re-written, with a switch between its methods.")
@db_option
@index_dir_option
@json_option
def explain_cmd(query_id, method, budget, neighbours, image, out_dir, db, index_dir, as_json):
    """Add maps made with another method to a past query, without searching again.

    The query's recorded neighbours get maps for the same targets as at query time (the query's
    similarity to its neighbours, each neighbour's similarity to the query, the predicted class).
    The new maps are appended, marked as added after the query; nothing stored is replaced.

    \b
    Example:
        cbr explain 12 --method lime --db cases.db
        cbr explain 12 --method integrated-gradients --explain-neighbours 2 --json
    """
    cb = open_casebase(db, create=False, index_dir=index_dir)
    added = add_explanation(cb, query_id, method, image=image, budget=budget, neighbours=neighbours,
                            progress=progress_enabled(), out_dir=out_dir)
    if as_json:
        click.echo(json.dumps(added.to_dict()))
        return
    click.echo(f"Query {added.query_id}: added {len(added.maps)} map(s) made with {added.method}"
               f" ({added.evaluations} model evaluations, {added.seconds:.1f} s)")
    for m in added.maps:
        who = "query" if m["case_id"] is None else f"case {m['case_id']}"
        click.echo(f"  {who:<10} {m['target']:<28} {m['shape'][0]}x{m['shape'][1]}")
    for note in added.notes:
        click.echo(f"  note: {note}")
    if added.report:
        click.echo(f"  report: {added.report}")
