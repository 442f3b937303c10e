"""The explanation-method comparison (cbr.evaluation.comparison) as one text table."""

from __future__ import annotations

import numpy as np

from cbr.store.reliability import NO_BETTER

__all__ = ["format_comparison"]


def _f(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def format_comparison(result: dict) -> str:
    """The comparison as one text table; the localisation columns only when masks exist."""
    loc = result.get("masks", 0) > 0
    head = f"{'method':<30}{'target':<12}"
    if loc:
        head += f"{'pointing':>9}{'energy':>8}"
    head += f"{'deletion':>10}{'insertion':>10}{'rand. rho':>10}{'s/map':>8}{'evals/map':>10}"
    fold = f" of fold {result['fold']}" if result.get("fold") else ""
    lines = [f"explanation methods on {result['n']} images{fold} ({result['masks']} with a lesion mask); "
             f"deletion: lower is better, insertion: higher is better; rand. rho: rank correlation with "
             f"{result['randomised_block']} re-initialised (lower is better)", "", head]
    for r in result["rows"]:
        line = f"{r['method'][:29]:<30}{r['target']:<12}"
        if loc:
            line += f"{_f(r['pointing_game'], 2):>9}{_f(r['energy_pointing_game'], 2):>8}"
        ev = "-" if r["evaluations_per_map"] is None else f"{r['evaluations_per_map']:.0f}"
        line += (f"{_f(r['deletion_auc']):>10}{_f(r['insertion_auc']):>10}{_f(r['randomisation_spearman'], 2):>10}"
                 f"{_f(r['seconds_per_map'], 2):>8}{ev:>10}")
        lines.append((line.rstrip() + (f"  {NO_BETTER}" if r.get("no_better_than_a_guess") else "")).rstrip())
    centre = (result.get("guesses") or {}).get("centre")
    if loc and centre is not None:
        lines.append(f"{'a centre guess':<30}{'-':<12}{_f(centre, 2):>9}")
    # Per target, the same for every map: the intact and the fully deleted image do not depend on it.
    flat = {}
    for r in result["rows"]:
        flat[r["target"]] = max(flat.get(r["target"], 0), r.get("non_positive_gaps") or 0)
    for target, count in flat.items():
        if count:
            lines.append(f"{target}: {count} of {result['n']} images scored no lower fully deleted; deletion and "
                         f"insertion weigh each image by its score's drop")
    return "\n".join(lines)
