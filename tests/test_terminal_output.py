"""What a command prints to a terminal: escaped control characters, and text as text."""

from __future__ import annotations

import io
import sys

import click
import pytest

from cbr.cli.terminal import TerminalStream, escaped_stdout


class _Tty(io.StringIO):
    """A terminal that records what reaches it."""

    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_text_not_bytes_reprs(monkeypatch):
    # click probes a stream with write(b""): a stream that took bytes printed every line as b'...'
    raw = _Tty()
    monkeypatch.setattr(sys, "stdout", raw)
    with escaped_stdout():
        click.echo("fold 1: balanced accuracy 0.701")
        click.echo("label \x1b[2J")
    assert raw.getvalue() == "fold 1: balanced accuracy 0.701\nlabel \\x1b[2J\n"


def test_terminal_stream_refuses_bytes():
    stream = TerminalStream(_Tty())
    with pytest.raises(TypeError, match="must be str, not bytes"):
        stream.write(b"\x1b[2J")
    assert stream.raw.getvalue() == ""
