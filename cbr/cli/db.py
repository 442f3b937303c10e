"""``cbr db``: schema migrations and health of the case base."""

import json

import click

from cbr.cli.options import db_option, index_dir_option, json_option
from cbr.cli.terminal import echo
from cbr.store.casebase import current, open_casebase, upgrade
from cbr.store.health import check_casebase


@click.group()
def db():
    """Case base schema: upgrade and inspect (Alembic).

    \b
    Example:
        cbr db current --db cases.db
    """


@db.command("upgrade")
@db_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(db, revision):
    """Create the case base or upgrade its schema to the latest revision.

    Opening a case base with any other command upgrades it too; this is for doing it on purpose.

    \b
    Example:
        cbr db upgrade --db cases.db
    """
    before, after = upgrade(db, revision)
    if before == after:
        click.echo(f"{db}: already at revision {after}")
    else:
        click.echo(f"{db}: upgraded from {before or 'empty'} to {after}")


@db.command("current")
@db_option
def db_current(db):
    """Show the case base's schema revision and the newest one this cbr knows.

    \b
    Example:
        cbr db current --db cases.db
    """
    info = current(db)
    state = "up to date" if info["up_to_date"] else ("newer than this cbr" if not info["known"] else "upgrade available")
    click.echo(f"{db}: revision {info['current'] or 'empty'} (head {info['head']}, {state})")


@db.command("check")
@db_option
@index_dir_option
@json_option
def db_check(db, index_dir, as_json):
    """Check a case base: SQLite's integrity, the index files, and the rows that belong together.

    Exits 1 when something needs a rebuild or a restore; warnings are repaired by cbr itself.
    Works on a read-only case base.

    \b
    Example:
        cbr db check --db cases.db
        cbr db check --db "sqlite:///replica.db?mode=ro&uri=true" --json
    """
    cb = open_casebase(db, create=False, migrate=False, index_dir=index_dir, readonly=True)
    try:
        health = check_casebase(cb)
    finally:
        cb.close()
    if as_json:
        click.echo(json.dumps(health.to_dict(), indent=2))
    else:
        for line in health.errors:
            echo(f"error: {line}")
        for line in health.warnings:
            echo(f"warning: {line}")
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in health.counts.items() if not k.startswith("index"))
        if health.ok:
            echo(f"{health.casebase}: ok ({counts})" + (f"; {len(health.warnings)} warning(s)" if health.warnings else ""))
    if not health.ok:
        raise click.ClickException(f"case base {health.casebase} has {len(health.errors)} problem(s); see above")
