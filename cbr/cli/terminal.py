"""Printing stored text to a terminal: labels, paths, notes and names come from files and people,
so every control character is shown as an escape and never reaches the terminal itself."""

import click

__all__ = ["echo"]


def echo(text="", **kwargs) -> None:
    """``click.echo`` of one line of a table or message, with control characters escaped
    (an ESC in a label must not retitle the terminal or hide the lines above)."""
    from cbr.data.text import for_terminal

    click.echo(for_terminal(text), **kwargs)
