"""Command-line interface: thin click commands over the library.

Modules here import only click at top level; each command imports the library (and so torch)
when it runs, which keeps ``cbr --help`` instant. The root group lives in ``group``; importing a
command module registers its commands on it.
"""

import sys

import click

from cbr.cli.group import cli, discard_stdout
# Importing a command module registers its commands on `cli`.
from cbr.cli import audit, db, explain, info, learning, retrieval, serve  # noqa: F401

__all__ = ["cli", "main", "help_argvs"]


def main():
    """The ``cbr`` command. A closed pipe (``cbr export ... | head -1``) ends it quietly with status 0."""
    try:
        cli(prog_name="cbr")
    except SystemExit:
        # Output still buffered meets the closed pipe here rather than in the interpreter's
        # final flush, which would print "Exception ignored" and exit 120.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            discard_stdout()
        raise


def help_argvs() -> list[list[str]]:
    """The argv of ``--help`` for the root and every command and sub-command, from the click tree."""
    out = [["--help"]]

    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            out.append(prefix + [name, "--help"])
            if isinstance(cmd, click.Group):
                walk(cmd, prefix + [name])

    walk(cli, [])
    return out
