"""Command-line interface: thin click commands over the library.

The root group lives in ``group``; it imports a command's module only when that command runs or
shows its help (click's lazy loading). Command modules import the library at their top; the library
defers only heavy third-party packages (torch, faiss, ...), so ``cbr --help`` stays instant.
"""

import sys

import click

from cbr.cli.group import cli, discard_stdout

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

    def walk(group, prefix, ctx):
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            out.append(prefix + [name, "--help"])
            if isinstance(cmd, click.Group):
                walk(cmd, prefix + [name], click.Context(cmd, info_name=name, parent=ctx))

    walk(cli, [], click.Context(cli, info_name="cbr"))
    return out
