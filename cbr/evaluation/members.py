"""Heterogeneous ensembles in cross-validation: each member and each ensemble rule on the same folds.

``cbr evaluate DATA --backbone A --backbone B ...`` trains one model per backbone on every fold and
indexes them all into the fold's case base: a case base with several members, as ``cbr index
--model A --model B`` makes. Every held-out image is then answered by each member alone (its
vote, and its own softmax head) and by the whole case base under every ensemble rule of
``cbr.pipeline.vote.ENSEMBLES`` (classic, confidence). All views see the same folds, the same
trained models and the same queries, so their figures compare directly.

A backbone given again is another member of its own: the same network trained again with the
next seed (``--backbone mobilenet_v2`` three times: seeds 0, 1, 2), a deep ensemble (Lakshminarayanan
et al., 2017) for users who have one pretrained network. Its members differ in the head's
initialisation, the batches and the augmentation draws, but hold out the same validation images,
so the ensemble is calibrated on cases none of them trained on.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from cbr.errors import CbrError
from cbr.evaluation.outcome import run_queries
from cbr.evaluation.scoring import score
from cbr.evaluation.softmax import add_softmax
from cbr.pipeline.query import Searcher
from cbr.pipeline.vote import ENSEMBLES

__all__ = ["Member", "MemberViews", "plan_members", "summary"]


@dataclass(frozen=True)
class Member:
    """One member of a cross-validated ensemble: its name in the figures, its backbone and seed."""

    name: str  # the backbone, or "<backbone> seed <seed>" where the backbone is given more than once
    backbone: str
    seed: int  # the head's initialisation, batches and augmentation (the validation split is shared)


def plan_members(backbones, seed: int, train: bool = True) -> tuple[Member, ...]:
    """The members of ``backbones`` in order; a repeated backbone's later members take the next seeds.

    Raises:
        CbrError: a repeated backbone without training (``--no-train``), which would be the same
            network twice.
    """
    names = tuple(backbones)
    repeated = sorted({b for b in names if names.count(b) > 1})
    if repeated and not train:
        raise CbrError(f"--backbone {repeated[0]} is given twice, which without training is the same network "
                       "twice; give each member once, or drop --no-train to train a deep ensemble")
    seen = Counter()
    members = []
    for b in names:
        s = seed + seen[b]
        seen[b] += 1
        members.append(Member(f"{b} seed {s}" if b in repeated else b, b, s))
    return tuple(members)


class MemberViews:
    """The outcomes of every member and every ensemble rule, pooled over the folds."""

    def __init__(self, plan, config):
        self.plan, self.config = tuple(plan), config
        self.members = {m.name: [] for m in self.plan}
        self.ensembles = {name: [] for name in ENSEMBLES}
        self.softmax_classes = None

    def query_fold(self, searcher, checkpoints, test_recs, fold: int, progress: bool, done=None) -> None:
        """Answer ``test_recs`` with each member alone and with every ensemble rule.

        Args:
            searcher: the fold's Searcher over all members (its own ensemble rule answered ``done``).
            checkpoints: the members' checkpoint files, in ``plan`` order.
            test_recs: the fold's held-out records.
            fold: the fold's number (1-based).
            progress: progress bars.
            done: the outcomes ``searcher`` already gave (reused for its ensemble rule), or None.
        """
        cfg = self.config
        for name in ENSEMBLES:
            if done is not None and name == searcher.ensemble_name:
                got = done
            else:
                got, _ = run_queries(searcher.with_options(ensemble=name), test_recs, fold=fold, progress=progress,
                                     desc=f"fold {fold} {name} ensemble")
            self.ensembles[name].extend(got)
        for member, ckpt in zip(self.plan, checkpoints):
            alone = Searcher(searcher.cb, k=cfg.k, vote=cfg.vote, explain="none", device=cfg.device,
                             answer_anyway=True, where=cfg.where, temperature=cfg.temperature,
                             coverage=cfg.coverage, models=(str(ckpt),))
            got, _ = run_queries(alone, test_recs, fold=fold, progress=progress, desc=f"fold {fold} {member.name}")
            classes = add_softmax(alone.members[0].embedder, got, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, device=cfg.device)
            self.softmax_classes = classes or self.softmax_classes
            self.members[member.name].extend(got)

    def _views(self) -> list[tuple[str, list]]:
        """(view name, its outcomes): members first, then the ensemble rules."""
        return ([(f"member {b}", o) for b, o in self.members.items()]
                + [(f"ensemble {n}", o) for n, o in self.ensembles.items()])

    def prediction_files(self) -> dict[str, str]:
        """{view: the report folder's file of its answers}."""
        return {name: _file_name(name) for name, _ in self._views()}

    def outcomes_by_file(self) -> dict[str, list]:
        """{file name: that view's outcomes} (``prediction_files``)."""
        return {_file_name(name): outcomes for name, outcomes in self._views()}

    def figures(self, classes) -> dict:
        """{"members": {member name: figures}, "ensembles": {rule: figures}} (see ``summary``)."""
        k = self.config.k
        return {"members": {b: summary(score(o, classes, k=k, softmax_classes=self.softmax_classes))
                            for b, o in self.members.items()},
                "ensembles": {n: summary(score(o, classes, k=k)) for n, o in self.ensembles.items()}}


def _file_name(view: str) -> str:
    """A view's answers file: no spaces, and no character a file system may refuse (``timm:`` names)."""
    return "predictions-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", view.replace(" ", "-")) + ".csv"


def summary(metrics: dict) -> dict:
    """The figures that compare members and ensembles: the vote's accuracy, its calibration (ECE with
    its interval, wrong answers shown at >= 0.95, the prediction sets' coverage) and (members) the
    softmax head's."""
    out = {key: metrics.get(key) for key in ("n", "balanced_accuracy", "accuracy", "ece", "ece_interval",
                                             "confident_errors", "prediction_sets")}
    soft = metrics.get("softmax")
    if soft:
        out["softmax_balanced_accuracy"] = soft.get("balanced_accuracy")
        out["softmax_ece"] = soft.get("ece")
    return out
