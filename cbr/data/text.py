"""Text that people type into the case base: labels, patient ids, reviewer names and notes.

Each is checked and normalised where it comes in (manifest rows, class folder names, ``.npz``
classes, ``cbr feedback``, ``cbr query --patient``), so that everything downstream (the vote, the
overlays' captions, the HTML report, the terminal, CSV exports) can rely on it:

* Unicode NFC, so that a composed and a decomposed ``café`` are one class, not two;
* labels, patient ids and names hold no control characters (newline, tab, ESC, DEL, C1), no
  line/paragraph separators and no bidirectional overrides (which make text display reversed): a
  label with a newline broke every rendering of every query that retrieved it, and an escape
  sequence in a label reached the reader's terminal;
* notes keep their newlines and tabs (CR LF becomes LF) but no other control character.

:func:`for_terminal` is the other half: what is already stored is printed with every control
character shown as an escape, never sent to the terminal.
"""

from __future__ import annotations

import unicodedata

from cbr.errors import CbrError

__all__ = ["TextError", "MAX_LABEL_CHARS", "MAX_NOTE_CHARS", "clean_label", "clean_note", "text_problem",
           "check_candidates", "for_terminal"]

MAX_LABEL_CHARS = 1000  # labels, patient ids and names
MAX_NOTE_CHARS = 100_000

# Bidirectional embeddings, overrides and isolates: they reorder what a reader sees.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class TextError(CbrError):
    """A label, patient id, name or note cannot be stored as given."""


def _bad_char(text: str, allowed: str = "") -> str | None:
    for ch in text:
        if ch in allowed:
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI:
            return ch
    return None


def _describe(ch: str) -> str:
    names = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x1b": "an escape character (ESC)"}
    return names.get(ch, f"the control character U+{ord(ch):04X}")


def text_problem(text: str, what: str = "label") -> str | None:
    """Why ``text`` cannot be a label (or patient id, name), or None when it can (after NFC)."""
    ch = _bad_char(text)
    if ch is not None:
        return f"{what} contains {_describe(ch)}; remove it"
    if len(text) > MAX_LABEL_CHARS:
        return f"{what} is {len(text)} characters long; the limit is {MAX_LABEL_CHARS}"
    return None


def clean_label(text, what: str = "label", *, where: str = "") -> str:
    """``text`` in NFC with outer spaces removed; :class:`TextError` if it holds a control character.

    Args:
        text: the label, patient id or name as given.
        what: what it is, for the message ("label", "patient id", "--by").
        where: what to name before it in the message (a manifest row, an option).

    Example:
        >>> clean_label("cafe\\u0301") == "caf\\u00e9"
        True
    """
    text = unicodedata.normalize("NFC", str(text)).strip()
    reason = text_problem(text, what)
    if reason is not None:
        raise TextError(f"{where}{reason}")
    return text


def clean_note(text, what: str = "note") -> str:
    """A note in NFC: newlines and tabs kept (CR LF -> LF), any other control character refused."""
    text = unicodedata.normalize("NFC", str(text)).replace("\r\n", "\n").replace("\r", "\n")
    ch = _bad_char(text, allowed="\n\t")
    if ch is not None:
        raise TextError(f"{what} contains {_describe(ch)}; remove it (newlines and tabs are kept)")
    if len(text) > MAX_NOTE_CHARS:
        raise TextError(f"{what} is {len(text)} characters long; the limit is {MAX_NOTE_CHARS}")
    return text


def for_terminal(text, *, keep_newlines: bool = False) -> str:
    """``text`` safe to print: control characters, separators and bidi overrides become escapes
    (``\\x1b``, ``\\n``...), so stored text can never move the cursor or retitle the terminal."""
    text = str(text)
    allowed = "\n" if keep_newlines else ""
    if _bad_char(text, allowed) is None:
        return text
    out = []
    for ch in text:
        if ch not in allowed and (unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if unicodedata.category(ch) != "Cs" else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def check_candidates(candidates) -> tuple[list, list]:
    """Labels and patient ids of a reader's candidates in NFC; a candidate whose label or patient
    id cannot be stored becomes a Problem naming its row (``row 3: label contains a newline``)."""
    import dataclasses

    from cbr.data.records import Problem, printable_path

    kept, problems = [], []
    for c in candidates:
        label = unicodedata.normalize("NFC", c.label).strip()
        group = None if c.group is None else unicodedata.normalize("NFC", c.group).strip() or None
        reason = text_problem(label, "label") or (None if group is None else text_problem(group, "patient id"))
        if reason is not None:
            problems.append(Problem(printable_path(c.path), f"{c.at}{reason}"))
            continue
        kept.append(c if (label, group) == (c.label, c.group) else dataclasses.replace(c, label=label, group=group))
    return kept, problems
