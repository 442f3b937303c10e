"""``cbr import``: embeddings computed elsewhere into a case base."""

import json

import click

from cbr.cli.options import db_option, index_dir_option, json_option, progress_enabled, weights_option
from cbr.cli.terminal import echo, echo_problems
from cbr.pipeline.importer import FINGERPRINT_KEY, ImportConfig, import_embeddings
from cbr.store.casebase import open_casebase
from cbr.store.encoding import EMBEDDING_DTYPES


@click.command("import")
@click.argument("embeddings", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="The backbone name or checkpoint (from `cbr train`) that computed them.")
@weights_option
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="With an .npy matrix: a CSV with the columns path,label,group,metadata, row for row.")
@click.option("--fingerprint", default=None,
              help=f"The model's fingerprint, when the file does not carry it (Parquet metadata {FINGERPRINT_KEY!r} "
                   "or a fingerprint column).")
@db_option
@index_dir_option
@click.option("--index-type", default=ImportConfig.index_type, show_default=True,
              help="Of a new index: as `cbr index --index-type`.")
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=ImportConfig.batch_size, show_default=True,
              help="Rows per read and per transaction.")
@click.option("--embedding-dtype", type=click.Choice(EMBEDDING_DTYPES), default=ImportConfig.embedding_dtype,
              show_default=True, help="How embeddings are stored.")
@json_option
def import_cmd(embeddings, model, weights, manifest, fingerprint, db, index_dir, index_type, batch_size,
               embedding_dtype, as_json):
    """Import embeddings computed elsewhere (a Ray or GPU job) as cases, then index them.

    EMBEDDINGS is a Parquet file with the columns path, label, group, metadata (a JSON object) and
    embedding (one vector per row), optionally sha256 (else the file at path is hashed) and
    fingerprint; or an .npy matrix with --manifest CSV giving the same columns row for row. The
    vectors must come from --model: its dimension and fingerprint are checked before anything is
    written. Rows already stored are skipped, so an interrupted import is finished by running it
    again. Neighbour maps of imported cases are computed from their files at query time.

    \b
    Example:
        cbr import embeddings.parquet --model model.pt --db cases.db
        cbr import vectors.npy --manifest rows.csv --model mobilenet_v2 --fingerprint 3f2a... --db cases.db
    """
    config = ImportConfig(model=model, weights=weights, manifest=manifest, fingerprint=fingerprint,
                          index_type=index_type, batch_size=batch_size, embedding_dtype=embedding_dtype)
    cb = open_casebase(db, index_dir=index_dir)
    report = import_embeddings(cb, embeddings, config, progress=progress_enabled())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    echo(f"Imported {report.source} into {db}")
    echo(f"  model:         {report.model}")
    echo(f"  cases added:   {report.added}")
    if report.embedded:
        echo(f"  embedded:      {report.embedded} (existing cases, this model)")
    echo(f"  already there: {report.already}")
    echo(f"  skipped:       {len(report.problems)}")
    echo_problems(report.problems, report.notes)
    echo(f"  elapsed:       {report.elapsed:.1f} s")
