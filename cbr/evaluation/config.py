"""The settings shared by both evaluation protocols (``EvalConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbr.data.sources import SourceSpec
from cbr.errors import CbrError
from cbr.evaluation.by_finding import check_by
from cbr.pipeline.settings import DEFAULT_COVERAGE, parse_where
from cbr.pipeline.vote import get_vote_rule
from explain.methods import check_method, FUSED_METHODS, get_cam_method, UnknownMethodError

__all__ = ["EvalConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """How every evaluation query is answered and where the report goes.

    Cross-validation adds a ``TrainConfig`` (the model of each fold); a held-out test set adds
    the members to use and ``strict``.
    """

    k: int = 5  # neighbours per query
    vote: str = "weighted"  # a name in cbr.pipeline.vote.VOTE_RULES
    explain: str = "none"  # a CAM method (localisation and faithfulness figures) or "none"
    batch_size: int = 32  # images per batch when indexing folds and in the softmax pass
    device: str | None = None  # "cpu", "cuda"; None: cuda when available
    num_workers: int | None = None  # decoding worker processes
    out_dir: str | Path | None = None  # the report folder; None writes no files
    compare: tuple[str, ...] = ()  # explanation methods scored side by side (cbr.evaluation.comparison)
    explain_budget: int | None = None  # cap on model evaluations per attribution map in the comparison
    ood: str | None = None  # a foreign dataset queried against each case base (typicality AUROC, FPR@95TPR)
    # CAM methods x these layer specs scored against masks (cbr.evaluation.sweep); () = no sweep
    sweep_methods: tuple[str, ...] = ()
    target_layers: tuple[str, ...] = ()
    map_images: int = 48  # images per fold (or per held-out set) in the sweep
    # DICOM/NIfTI/.npz: which frames, slices and split of DATA are read; its window decodes them
    # (cross-validation: the folds' models are built with it; --db: it must be the members' own)
    sources: SourceSpec = SourceSpec()
    where: tuple[tuple[str, str], ...] = ()  # neighbours only among cases whose metadata match (key, value)
    temperature: float | None = None  # of the weighted vote; None: fitted on each case base's calibration slice
    coverage: float = DEFAULT_COVERAGE  # of the conformal prediction sets (per-class coverage is reported)
    by: tuple[str, ...] = ("image",)  # what is queried and scored: whole images, and with "finding" each lesion too

    def __post_init__(self):
        object.__setattr__(self, "where", parse_where(self.where))
        object.__setattr__(self, "by", check_by(self.by))

    def check(self) -> None:
        """Fail on an unknown vote rule or CAM method, or k < 1, before any work."""
        get_vote_rule(self.vote)
        if self.explain != "none":
            try:
                get_cam_method(FUSED_METHODS.get(self.explain, self.explain))
            except (KeyError, ValueError) as e:
                raise CbrError(str(e.args[0] if e.args else e)) from None
        if self.compare:
            for name in self.compare:
                try:
                    check_method(name)
                except UnknownMethodError as e:
                    raise CbrError(str(e)) from None
        if self.k < 1:
            raise CbrError(f"-k {self.k}: ask for at least 1 neighbour")
