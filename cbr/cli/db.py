"""``cbr db``: schema migrations of the case base."""

import click

from cbr.cli import cli
from cbr.cli.options import db_option


@cli.group()
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
    from cbr.store.casebase import upgrade

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
    from cbr.store.casebase import current

    info = current(db)
    state = "up to date" if info["up_to_date"] else ("newer than this cbr" if not info["known"] else "upgrade available")
    click.echo(f"{db}: revision {info['current'] or 'empty'} (head {info['head']}, {state})")
