"""Command-line interface: thin click commands over the library.

Modules here import only click at top level; each command imports the library (and so torch)
when it runs, which keeps ``cbr --help`` instant. The root group lives in ``group``; importing a
command module registers its commands on it.
"""

from cbr.cli.group import cli
# Importing a command module registers its commands on `cli`.
from cbr.cli import audit, db, explain, info, learning, retrieval, serve  # noqa: F401

__all__ = ["cli", "main"]


def main():
    cli(prog_name="cbr")
