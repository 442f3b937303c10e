"""Text that people type into the case base: labels, patient ids, reviewer names and notes.

Each is checked and normalised where it comes in (manifest rows, class folder names, ``.npz``
classes, ``cbr feedback``, ``cbr query --patient``), so that everything downstream (the vote, the
overlays' captions, the HTML report, the terminal, CSV exports) can rely on it:

* Unicode NFC, so that a composed and a decomposed ``café`` are one class, not two;
* labels, patient ids and names hold no control characters (newline, tab, ESC, DEL, C1), no
  line/paragraph separators and no bidirectional overrides (which make text display reversed): a
  label with a newline broke every rendering of every query that retrieved it, and an escape
  sequence in a label reached the reader's terminal;
* labels, patient ids and names hold no default-ignorable code point either (zero-width space
  and joiners, soft hyphen, variation selectors, tags...): ``tumour`` and ``tumour`` + U+200B
  render alike but would be two classes;
* a new label in several scripts that looks like an existing class (``tumоur`` with a Cyrillic
  ``о``) is stored, with a warning (:func:`confusable_with`): a label wholly in another script is
  a language, not a trick;
* notes keep their newlines and tabs (CR LF becomes LF) but no other control character.

:func:`for_terminal` is the other half: what is already stored is printed with every control
character shown as an escape, never sent to the terminal.
"""

from __future__ import annotations

import dataclasses
import unicodedata

from cbr.data.records import printable_path, Problem
from cbr.errors import CbrError

__all__ = ["TextError", "MAX_LABEL_CHARS", "MAX_NOTE_CHARS", "clean_label", "clean_note", "text_problem",
           "check_candidates", "for_terminal", "confusable_with", "lookalike_note"]

MAX_LABEL_CHARS = 1000  # labels, patient ids and names
MAX_NOTE_CHARS = 100_000

# Bidirectional embeddings, overrides and isolates: they reorder what a reader sees.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): the format characters (Cf)
# but those below, plus these ranges (Other_Default_Ignorable_Code_Point and variation selectors).
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2065, 0x2065),
                     (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))
# Format characters that are visible (prepended concatenation marks, interlinear annotation,
# Egyptian hieroglyph format controls), hence not default-ignorable.
_VISIBLE_FORMAT = ((0x0600, 0x0605), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
                   (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F))


def _in(ranges, o: int) -> bool:
    return any(lo <= o <= hi for lo, hi in ranges)


def _ignorable(ch: str) -> bool:
    """Whether ``ch`` is default-ignorable: drawn as nothing at all."""
    o = ord(ch)
    if unicodedata.category(ch) == "Cf":
        return not _in(_VISIBLE_FORMAT, o)
    return _in(_IGNORABLE_RANGES, o)


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
    ch = next((c for c in text if _ignorable(c)), None)
    if ch is not None:
        name = unicodedata.name(ch, "")
        return (f"{what} contains the invisible character U+{ord(ch):04X}{f' ({name})' if name else ''}, which "
                "would make a label that looks like another; remove it")
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


def _skeleton(text: str) -> str:
    """``text`` with each character replaced by the one its look-alikes share (after NFKC and case
    folding), so that two labels that render alike have the same skeleton (UTS #39, roughly)."""
    classes = _lookalike_classes()
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(classes.get(ch, ch) for ch in folded)


_LOOKALIKES: dict | None = None


def _lookalike_classes() -> dict:
    """Each character of Unicode's confusables data -> one representative of its look-alikes."""
    global _LOOKALIKES
    if _LOOKALIKES is None:
        from confusable_homoglyphs.confusables import confusables_data

        parent: dict = {}

        def find(c):
            while parent.setdefault(c, c) != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        for ch, glyphs in confusables_data.items():
            for g in glyphs:
                a, b = find(ch), find(g["c"])
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the lowest code point leads: Latin where there is one
        _LOOKALIKES = {c: find(c) for c in list(parent) if len(c) == 1}
    return _LOOKALIKES


def confusable_with(label: str, classes) -> str | None:
    """The existing class that a new, mixed-script ``label`` renders like, or None.

    Only a label mixing scripts is suspect (``tumоur``: Latin with a Cyrillic ``о``); one wholly
    in another script is a language. The caller warns and stores it: the check cannot tell a
    trick from a real name, and refusing would lose the row.

    Example:
        >>> confusable_with("tum\u043eur", {"tumour", "cyst"})
        'tumour'
    """
    from confusable_homoglyphs.confusables import is_mixed_script

    if label in classes or not is_mixed_script(label):
        return None
    skeleton = _skeleton(label)
    return next((c for c in sorted(classes) if c != label and _skeleton(c) == skeleton), None)


def lookalike_note(label: str, other: str) -> str:
    """The warning for a label that renders like the class ``other``."""
    odd = ", ".join(f"U+{ord(ch):04X}" for ch in dict.fromkeys(label) if ch not in other)
    return (f"label {label!r} is confusable with the class {other!r}: it mixes scripts ({odd}); "
            "if it is meant to be that class, correct the label")

