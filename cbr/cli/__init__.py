"""Command-line interface: thin click commands over the library.

Modules here import only click at top level; each command imports the library (and so torch)
when it runs, which keeps ``cbr --help`` instant.
"""

import logging
import sys

import click

from cbr.errors import CbrError

__all__ = ["cli", "main"]


class CbrGroup(click.Group):
    """A group that turns library errors into one-line ``Error: ...`` messages (exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CbrError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=CbrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbr")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notices.")
@click.pass_context
def cli(ctx, quiet):
    """Case-based reasoning for medical images.

    Index labelled images into a case base, query new images against it, and audit every answer
    through the cases it rests on and where the network looked.

    \b
    Example:
        cbr demo
        cbr index data/brain_mri --db cases.db
        cbr query scan.png --db cases.db -k 5
    """
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s", stream=sys.stderr)


from cbr.cli import db as _db  # noqa: E402,F401  (commands register themselves on `cli`)
from cbr.cli import retrieval as _retrieval  # noqa: E402,F401
from cbr.cli import info as _info  # noqa: E402,F401
from cbr.cli import learning as _learning  # noqa: E402,F401
from cbr.cli import audit as _audit  # noqa: E402,F401


def main():
    cli(prog_name="cbr")
