"""How much an answer rests on, in words: the neighbours' evidence, the prediction set, a conflict
with a stored case. Shared by the terminal, the HTML report, the web pages and ``--json``."""

from __future__ import annotations

import html

from cbr.store.reliability import badge_text

__all__ = ["evidence", "finding_lines", "finding_notes", "unlike_text", "set_text", "conflicts", "conflict_text",
           "conflict_banner", "agreement", "answer_lines", "shows_probabilities", "CSS"]


def evidence(label, neighbours, members=None) -> dict:
    """What a confidence rests on: how many of the k neighbours carry ``label``, and their similarities;
    for an ensemble, also how many members gave ``label``.

    Args:
        label: the answer (None: an abstention; the most common neighbour label is counted).
        neighbours: ``(label, similarity)`` of each neighbour, best first.
        members: each ensemble member's answer (None where it abstained); one member adds nothing.

    Example:
        >>> evidence("yes", [("yes", 0.83), ("yes", 0.81)])["text"]
        '2 of 2 neighbours yes, similarity 0.81–0.83'
    """
    neighbours = [(str(lab), float(sim)) for lab, sim in neighbours]
    labels = [lab for lab, _ in neighbours]
    if label is None and labels:
        label = max(dict.fromkeys(labels), key=labels.count)  # ties: the nearest such label
    sims = [sim for _, sim in neighbours]
    agree = sum(lab == label for lab in labels)
    out = {"label": label, "agree": agree, "k": len(neighbours),
           "similarity": [round(min(sims), 6), round(max(sims), 6)] if sims else None}
    if not sims:
        out["text"] = "no neighbours"
    else:
        low, high = f"{min(sims):.2f}", f"{max(sims):.2f}"
        out["text"] = (f"{agree} of {len(neighbours)} neighbours {label}, similarity "
                       + (low if low == high else f"{low}–{high}"))
    if members is not None and len(members) > 1:
        # an ensemble's calibrated confidence overstates the answers its members split on (docs/results.md)
        out["members"] = {"agree": sum(m == label for m in members), "of": len(members)}
        out["text"] += f"; {out['members']['agree']} of {len(members)} members {label}"
    return out


def finding_notes(finding: dict | None) -> list[str]:
    """What a reader must know about the finding: the on-finding warning, or that no localiser
    marks it (cbr.pipeline.finding)."""
    finding = finding or {}
    return [line for line in (finding.get("warning"), finding.get("note")) if line]


def finding_lines(finding: dict | None, unlike: dict | None, reliability: dict | None = None) -> list[str]:
    """The terminal's lines on where the finding is, the nearest unlike case and the maps' badge."""
    lines = []
    f = finding or {}
    if f.get("box"):
        x0, y0, x1, y1 = f["box"]
        line = (f"finding: box {x0},{y0}-{x1},{y1} in the model's view ({100 * f['area']:.1f}% of the image, "
                f"localiser probability {f['probability']:.2f})")
        if f.get("on_finding") is not None:
            floor = f.get("on_finding_floor")
            line += (f"; class map on it: {100 * f['on_finding']:.0f}%"
                     + ("" if floor is None else f" (calibrated floor {100 * floor:.0f}%)"))
        lines.append(line)
    elif f.get("localiser"):
        lines.append("finding: the localiser marks no region in this image")
    if unlike_text(unlike):
        lines.append(unlike_text(unlike))
    if reliability:
        lines.append(badge_text(reliability))
    return lines


def unlike_text(unlike: dict | None) -> str | None:
    """The nearest unlike neighbour in words: "nearest case that is not malignant: case 12 benign,
    similarity 0.71 (0.05 below the nearest malignant case)"."""
    if not unlike:
        return None
    text = (f"nearest case of another label: case {unlike['case_id']} {unlike['label']}, similarity "
            f"{unlike['similarity']:.3f}")
    margin = unlike.get("margin")
    if margin is not None:
        text += f" ({abs(margin):.3f} {'below' if margin >= 0 else 'above'} the nearest case of the answer's label)"
    return text


def set_text(classes) -> str:
    """How a prediction set reads: "yes", or "uncertain between yes and no"."""
    classes = [str(c) for c in classes or ()]
    if not classes:  # possible with conformal sets: the image is unlike every class's calibration cases
        return "empty: no class is typical enough for this coverage"
    if len(classes) == 1:
        return classes[0]
    return "uncertain between " + ", ".join(classes[:-1]) + " and " + classes[-1]


def conflicts(own_cases, answer) -> list[dict]:
    """The cases the query image already is whose label is not the answer (none when abstained)."""
    if answer is None:
        return []
    return [{"case_id": int(cid), "label": str(lab)} for cid, lab in own_cases if lab != answer]


def conflict_text(found, answer) -> str | None:
    """One line for the banner above the answer; None without a conflict."""
    if not found:
        return None
    cases = "; ".join(f"case {c['case_id']}, labelled {c['label']!r}" for c in found)
    return (f"CONFLICT: this image already is {cases} in the case base, but the answer is {answer!r}: "
            "check that case's label before trusting either")


def conflict_banner(found, answer) -> str:
    """The HTML banner of a conflict, in red; empty without one."""
    text = conflict_text(found, answer)
    return "" if text is None else f"<div class='conflict'>{html.escape(text)}</div>"


def agreement(label, answer) -> str:
    """A neighbour's CSS class: "agree" with the answer, "disagree", or "" when there is none."""
    if answer is None:
        return ""
    return "agree" if label == answer else "disagree"


CSS = """
.conflict{background:#b00020;color:#fff;font-weight:600;font-size:1.1em;padding:12px 16px;border-radius:6px;margin:12px 0}
.agree{color:#1b7f3b}.disagree{color:#b00020}.evidence{font-size:1em;color:#333}
"""


def answer_lines(p: dict) -> list[str]:
    """What the answer rests on, one line each: the evidence beside the confidence, the prediction
    set and its coverage, and where the vote was calibrated (for text and HTML alike)."""
    lines = []
    ev = p.get("evidence")
    if ev:
        lines.append(f"evidence: {ev['text']}")
    if p.get("set") is not None:
        cov = p.get("coverage")
        line = f"prediction set: {set_text(p['set'])}"
        if cov is not None:
            line += f" (holds the true class of at least {cov:.0%} of each class's queries)"
        lines.append(line)
    cal = p.get("calibration") or {}
    if cal.get("too_few"):
        rare = ", ".join(f"{c} ({n} cases)" for c, n in sorted(cal["too_few"].items()))
        lines.append(f"too few calibration cases for that coverage, so always in the set: {rare}")
    ens = cal.get("ensemble")
    if ens:
        lines.append(f"ensemble confidence calibrated on the {ens['cases']} cases every member held out"
                     if "cases" in ens else f"ensemble confidence: {ens['why']}")
        members, held = (ev or {}).get("members") or {}, ens.get("split")
        if held and members and members["agree"] < members["of"]:
            lines.append(f"members split: confidence held to what the {held['cases']} calibration answers they split "
                         f"on support (at most {held['supported']:.3f})")
        sets = ens.get("sets") or {}
        lines.append(f"ensemble prediction set fitted on the {sets['cases']} cases every member held out"
                     if "cases" in sets else f"ensemble prediction set: {sets['why']}" if "why" in sets else "")
    lines = [line for line in lines if line]
    return lines


def shows_probabilities(p: dict) -> bool:
    """An abstained or out-of-distribution answer shows no probabilities: they would read as a diagnosis."""
    return not (p.get("abstained") or p.get("out_of_distribution"))
