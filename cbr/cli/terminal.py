"""Printing stored text to a terminal: labels, paths, notes and names come from files and people,
so every control character is shown as an escape and never reaches the terminal itself."""

import io
import sys
from contextlib import contextmanager

import click

from cbr.data.text import for_terminal

__all__ = ["echo", "echo_problems", "warn", "TerminalStream", "escaped_stdout", "utc_time"]


class TerminalStream(io.TextIOBase):
    """A terminal's stdout that escapes every control character but the newline, whatever prints
    to it (an export, a table, a file name in a message); ``raw`` is the terminal itself.

    It has no ``buffer``: bytes written past it would reach the terminal unescaped."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, text) -> int:
        # A text stream refuses bytes: click probes with write(b"") and, were they taken, would
        # treat this as a binary stream and print every line as b'...'.
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.raw.write(for_terminal(text, keep_newlines=True))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self.raw, "encoding", None)

    @property
    def errors(self):
        return getattr(self.raw, "errors", None)


@contextmanager
def escaped_stdout():
    """While a command runs, stdout escapes control characters if it is a terminal (a file or a
    pipe gets the bytes as they are: `cbr export > cases.csv` must keep them)."""
    raw = sys.stdout
    try:
        tty = raw.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty or isinstance(raw, TerminalStream):
        yield
        return
    sys.stdout = TerminalStream(raw)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = raw


def echo(text="", **kwargs) -> None:
    """``click.echo`` of one line of a table or message, with control characters escaped
    (an ESC in a label must not retitle the terminal or hide the lines above)."""
    click.echo(for_terminal(text), **kwargs)


def echo_problems(problems, notes) -> None:
    """The files a run skipped, one indented line each with its reason, then the run's notes."""
    for p in problems:
        echo(f"    {p.path}: {p.reason}")
    for note in notes:
        echo(f"  note: {note}")


def warn(text) -> None:
    """A warning that must be read before the answer: escaped as `echo` does, then in bold red
    (plain where the output is not a terminal)."""
    out = sys.stdout.raw if isinstance(sys.stdout, TerminalStream) else None  # our own colour codes
    click.echo(click.style(for_terminal(text), fg="red", bold=True), file=out)


def utc_time(iso) -> str:
    """A stored ISO time as ``YYYY-MM-DD HH:MM:SS`` (stored times are UTC); "" for none."""
    return (iso or "")[:19].replace("T", " ")
