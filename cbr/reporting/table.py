"""The terminal summary of ``cbr evaluate``: one readable table for either protocol."""

from __future__ import annotations

import math

from cbr.reporting.comparison_table import format_comparison
from cbr.store.reliability import GUESS_WORDS, NO_BETTER

__all__ = ["format_table", "finding_table"]


def localisation_lines(loc: dict) -> list[str]:
    """The localisation figures: every map kind (the default first), then the two guesses on the same images."""
    lines = [f"localisation ({loc['n']} images with a lesion mask; default map: {loc['map']}): "
             "pointing game / energy pointing game / IoU"]
    kinds = [loc["map"]] + sorted(k for k in loc.get("by_map", {}) if k != loc["map"])
    for kind in kinds:
        b = loc.get("by_map", {}).get(kind, loc)
        verdict = f"  {NO_BETTER}" if b.get("no_better_than_a_guess") else ""
        lines.append(f"  {kind + ' maps':<24} {_f(b['pointing_game'])} / {_f(b['energy_pointing_game'])} / "
                     f"{_f(b['iou'])}{verdict}")
    for name, b in sorted((loc.get("baselines") or {}).items()):
        lines.append(f"  {GUESS_WORDS.get(name, name):<24} {_f(b['pointing_game'])} / "
                     f"{_f(b['energy_pointing_game'])} / {_f(b['iou'])}  (a guess)")
    return lines


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _interval(x) -> str:
    return "-" if not x else f"{_f(x[0])}–{_f(x[1])}"


def _calibration_lines(metrics: dict, soft) -> list[str]:
    """ECE's bootstrap interval, the confident errors, and the prediction sets' coverage per class."""
    out = [f"{'ECE 95% interval':<22}{_interval(metrics.get('ece_interval')):>12}"
           + (f"{_interval(soft.get('ece_interval')):>12}" if soft else "")]
    null = metrics.get("ece_if_calibrated")
    if null:
        out.append(f"{'ECE if calibrated':<22}{_f(null['median']):>10}   (95% of draws below {_f(null['p95'])}; a "
                   f"calibrated model scores at least the vote's ECE with p = {_f(null['p_value'])})")
    ce, sce = metrics.get("confident_errors") or {}, (soft or {}).get("confident_errors") or {}
    out.append(f"{'wrong with conf>=0.95':<22}{_f(ce.get('share')):>10}{_f(sce.get('share')) if soft else '':>10}"
               f"   ({ce.get('confident', '-')} of {ce.get('wrong', '-')} wrong answers of the vote)")
    sets = metrics.get("prediction_sets")
    if sets:
        per = ", ".join(f"{c} {_f(v['coverage'])}" for c, v in sets["per_class"].items() if v["n"])
        out.append(f"{'prediction sets':<22}coverage {_f(sets['coverage'])} (target {_f(sets.get('target'), 2)}), "
                   f"mean size {_f(sets['mean_set_size'], 2)}, one class {_f(sets['share_single'])}")
        out.append(f"{'  coverage per class':<22}{per}")
    sources = sorted(({(r.get("calibration") or {}).get("source") for r in metrics.get("folds") or []}
                      | {(metrics.get("calibration") or {}).get("source")}) - {None})
    if sources:
        where = "each fold's case base" if metrics.get("folds") else "the case base"
        out.append(f"{'vote calibrated on':<22}{', '.join(sources)} cases of {where}")
    return out


def _shown_backbone(cfg: dict) -> str:
    backbones = cfg.get("backbones")
    return " + ".join(backbones) + " (ensemble)" if backbones else str(cfg.get("backbone"))


def member_lines(metrics: dict) -> list[str]:
    """Each ensemble member and ensemble rule on the same folds (``cbr evaluate --backbone A --backbone B``)."""
    if not metrics.get("members"):
        return []
    lines = ["", f"{'on the same folds':<28}{'vote bal.acc':>13}{'vote ECE':>10}{'softmax bal.acc':>16}{'softmax ECE':>12}"]
    views = [(f"member {b}", v) for b, v in metrics["members"].items()]
    views += [(f"ensemble {n}", v) for n, v in (metrics.get("ensembles") or {}).items()]
    for name, v in views:
        soft = v.get("softmax_balanced_accuracy")
        lines.append(f"{name[:27]:<28}{_f(v.get('balanced_accuracy')):>13}{_f(v.get('ece')):>10}"
                     f"{_f(soft) if soft is not None else '-':>16}"
                     f"{_f(v.get('softmax_ece')) if soft is not None else '-':>12}")
    lines += ["", f"{'':<28}{'ECE 95% interval':>17}{'wrong >= 0.95':>15}{'set coverage':>14}"
                  f"  {'lowest class':<22}{'set size':>8}"]
    lines += [f"{name[:27]:<28}{_view_calibration(v)}" for name, v in views]
    return lines


def _view_calibration(v: dict) -> str:
    """One view's ECE interval, wrong answers shown at >= 0.95, and its sets' coverage and size."""
    errors = v.get("confident_errors") or {}
    wrong = f"{errors['confident']} of {errors['wrong']}" if errors.get("wrong") is not None else "-"
    sets = v.get("prediction_sets") or {}
    lowest = min(((c["coverage"], name) for name, c in (sets.get("per_class") or {}).items()
                  if c.get("coverage") is not None), default=None)
    return (f"{_interval(v.get('ece_interval')):>17}{wrong:>15}"
            f"{_f(sets.get('coverage')) if sets else '-':>14}"
            f"  {f'{_f(lowest[0])} {lowest[1]}'[:21] if lowest else '-':<22}"
            f"{_f(sets.get('mean_set_size')) if sets else '-':>8}")


def format_table(metrics: dict) -> str:
    """A readable summary of a metrics dict from either protocol."""
    cfg = metrics.get("config", {})
    soft = metrics.get("softmax")
    lines = []
    if metrics.get("protocol") == "cross-validation":
        what = (f"{cfg.get('folds')}-fold patient-grouped cross-validation"
                f" ({'fine-tuned ' + _shown_backbone(cfg) if cfg.get('train') else _shown_backbone(cfg) + ' as is'})")
    else:
        what = f"held-out test set against {cfg.get('casebase')}"
    lines.append(f"{what}: {metrics['n']} images, {len(metrics['classes'])} classes, k={cfg.get('k')}, "
                 f"vote {cfg.get('vote')}")
    lines.append("")
    lines.append(f"{'':<22}{'vote':>10}{'softmax' if soft else '':>10}")
    rows = [("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("AUC (macro OvR)", "auc"),
            ("ECE (10 equal-mass)", "ece"), ("smooth ECE", "smooth_ece")]
    for name, key in rows:
        lines.append(f"{name:<22}{_f(metrics.get(key)):>10}{_f(soft.get(key)) if soft else '':>10}")
    lines += _calibration_lines(metrics, soft)
    lines.append(f"{'precision@' + str(cfg.get('k')):<22}{_f(metrics.get('precision_at_k')):>10}")
    lines.append(f"{'mAP':<22}{_f(metrics.get('map')):>10}")
    ab = metrics.get("abstention") or {}
    lines.append(f"{'abstention rate':<22}{_f(ab.get('rate')):>10}   accuracy on answered {_f(ab.get('accuracy_answered'))}")
    sel = metrics.get("selective")
    if sel and sel.get("aurc") is not None:
        at = {c: (v or {}).get("accuracy") for c, v in sel["accuracy_at"].items()}
        lines.append(f"{'AURC':<22}{_f(sel['aurc']):>10}   accuracy at 90% coverage {_f(at.get('0.9'))}, at 95% "
                     f"{_f(at.get('0.95'))}; flagged out of distribution {_f(sel.get('ood_flagged_in'))}")
    ood = metrics.get("ood")
    if ood:
        lines.append(f"{'OOD AUROC':<22}{_f(ood['auroc']):>10}   FPR at 95% TPR {_f(ood['fpr_at_95_tpr'])}; foreign "
                     f"queries flagged {_f(ood['flagged_out'])} ({ood['n_out']} queries)")
    lines.append("")
    lines.append(f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c, v in metrics["per_class"].items():
        lines.append(f"{str(c)[:21]:<22}{_f(v['precision']):>10}{_f(v['recall']):>10}{_f(v['f1']):>10}{v['support']:>9}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    width = max([len(str(c)) for c in metrics["classes"]] + [6])
    lines.append(" " * (width + 2) + "".join(f"{str(c)[:width]:>{width + 2}}" for c in metrics["classes"]))
    for c, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        lines.append(f"{str(c)[:width]:<{width + 2}}" + "".join(f"{v:>{width + 2}}" for v in row))
    loc = metrics.get("localisation")
    if loc:
        lines.append("")
        lines += localisation_lines(loc)
    faith = metrics.get("faithfulness")
    if faith:
        lines.append(f"faithfulness ({faith['n']} images, {faith['target']}): deletion AUC {_f(faith['deletion_auc'])} "
                     f"vs random map {_f(faith['random_deletion_auc'])} (lower is better); sanity: rank "
                     f"correlation with {faith['randomised_block']} re-initialised {_f(faith['randomisation_spearman'])}")
        if "deletion_raw_auc" in faith:  # reports written before the pooled figures lack them
            lines.append(f"  un-normalised deletion AUC {_f(faith['deletion_raw_auc'])} vs random map "
                         f"{_f(faith['random_deletion_raw_auc'])} (score intact {_f(faith['intact_score'])}, fully "
                         f"deleted {_f(faith['deleted_score'])}; "
                         f"{faith['non_positive_gaps']} images not lower deleted)")
    if metrics.get("comparison"):
        lines += ["", format_comparison(metrics["comparison"])]
    lines += member_lines(metrics)
    if metrics.get("folds"):
        lines.append("")
        parts = []
        for r in metrics["folds"]:
            s = _f(r.get("balanced_accuracy"))
            if r.get("softmax_balanced_accuracy") is not None:
                s += f"/{_f(r['softmax_balanced_accuracy'])}"
            parts.append(s)
        lines.append("balanced accuracy per fold (vote" + ("/softmax" if soft else "") + "): " + "  ".join(parts))
    leak = metrics.get("leakage")
    if leak is not None:
        lines.append("")
        lines.append(f"leakage: {leak['same_image']} same image, {leak['in_training_set']} in a model's training set, "
                     f"{leak['same_group']} same patient/group; {leak['images']} image(s) in all, "
                     + (f"{leak['excluded']} excluded (--strict)" if leak["excluded"] else
                        ("included (use --strict to exclude)" if leak["images"] else "none found")))
    if metrics.get("problems"):
        lines.append(f"skipped {len(metrics['problems'])} file(s); see problems in metrics.json")
    lines.append(f"elapsed {metrics.get('elapsed_s', 0):.1f} s")
    return "\n".join(line.rstrip() for line in lines)


def finding_table(fs: dict) -> str:
    """``cbr evaluate --by finding``: the region queries beside the same images queried whole."""
    k = fs.get("k")
    lines = [f"search by finding ({fs.get('images', 0)} masked images):",
             f"  {'':<10} {'queries':>8} {f'precision@{k}':>13} {'accuracy':>9} {'balanced':>9} {'out of distr.':>14}"]
    for name in ("by_finding", "by_image"):
        f = fs.get(name) or {}
        lines.append(f"  {name.replace('_', ' '):<10} {f.get('n', 0):>8} {_f(f.get('precision_at_k')):>13} "
                     f"{_f(f.get('accuracy')):>9} {_f(f.get('balanced_accuracy')):>9} {f.get('out_of_distribution', 0):>14}")
    return "\n".join(lines)
