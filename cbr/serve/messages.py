"""What a web client is told when something fails: the library's one-line message, without the
server's paths and without the CLI commands it suggests to an operator at a terminal.

The library's errors are written for ``cbr`` at a shell (``no query 9 in /srv/x.db; list them
with `cbr history --db /srv/x.db```). A browser user can run neither, and the paths tell a
stranger how the server is laid out, so: the case base's own name becomes "the case base", a
clause or parenthesis that suggests a command is dropped, and any other absolute path is cut to
its last part (a file's name, which the pages show anyway).
"""

from __future__ import annotations

import re

__all__ = ["public_message"]

_COMMAND = re.compile(r"`?\bcbr [a-z][a-z-]*\b")
_PAREN = re.compile(r"\s*\([^()]*\)")
_QUOTED_PATH = re.compile(r"""(['"])(/[^'"]*/)([^'"/]*)\1""")
# an absolute path, but not one of this server's own routes, which messages may point to
_PATH = re.compile(r"(?<![\w.:/])/(?!(?:api|queries|cases|neighbours|static|history)/)(?:[^\s'\"`;,()/]+/)+"
                   r"([^\s'\"`;,()/]*)")


def public_message(text: str, hide=()) -> str:
    """``text`` without server paths or CLI commands (see the module docstring).

    Args:
        text: a library error's message.
        hide: strings naming the case base (its path or URL); each becomes "the case base".
    """
    text = str(text)
    for name in sorted({str(h) for h in hide if h}, key=len, reverse=True):
        text = text.replace(f"'{name}'", "the case base").replace(name, "the case base")
    text = _PAREN.sub(lambda m: "" if _COMMAND.search(m.group(0)) else m.group(0), text)
    clauses = re.split(r"(?<=[;.])\s+", text)
    kept = [c for i, c in enumerate(clauses) if i == 0 or not _COMMAND.search(c)]
    text = " ".join(kept).rstrip(" ;")
    if _COMMAND.search(text):  # the first clause itself names a command: cut from there
        text = text[:_COMMAND.search(text).start()].rstrip(" ;:,(`") or "the request failed"
    text = _QUOTED_PATH.sub(lambda m: f"{m.group(1)}{m.group(3)}{m.group(1)}", text)
    return _PATH.sub(lambda m: m.group(1) or "(a folder)", text)
