"""The settings that travel together through a query or an index run, as frozen dataclasses.

The CLI builds one from its options and hands it to the library; the defaults here are the CLI's
defaults. Importable without numpy or torch, so the CLI can read the defaults at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cbr.errors import CbrError, UnknownNameError
from cbr.models.similarity_maps import check_similarity, DEFAULT_SIMILARITY_MAP
from cbr.store.encoding import EMBEDDING_DTYPES
from explain.methods import METHOD_NAMES

__all__ = ["QueryConfig", "IndexConfig", "DEFAULT_REPORTS", "ENGINES", "SCALES", "NO_EXPLANATION", "check_explain",
           "with_overrides", "parse_where"]

# Where `cbr index` decodes, embeds and explains: here, or Ray Data actors (cbr.pipeline.engine).
ENGINES = ("local", "ray")

DEFAULT_REPORTS = "cbr-reports"  # where query reports go unless --out says otherwise
SCALES = ("shared", "per-image")  # colour scales of the maps in a report
NO_EXPLANATION = "none"  # the --explain value that turns the maps off
DEFAULT_OOD_ALPHA = 0.01  # typicality level: at most 1% of in-distribution queries flagged
DEFAULT_COVERAGE = 0.9  # prediction sets hold the true class of at least 90% of each class's queries


def check_explain(name: str) -> str:
    """``name`` if it is a CAM method (``explain.methods``) or ``none``, else UnknownNameError."""
    if name != NO_EXPLANATION and name not in METHOD_NAMES:
        raise UnknownNameError("explanation method", name, (*METHOD_NAMES, NO_EXPLANATION))
    return name


def parse_where(where) -> tuple[tuple[str, str], ...]:
    """A metadata filter as sorted ``(key, value)`` pairs, from ``key=value`` strings, pairs or a dict.

    Example:
        >>> parse_where(["site=back", "sex=female"])
        (('sex', 'female'), ('site', 'back'))
    """
    items = where.items() if isinstance(where, dict) else (where or ())
    pairs = {}
    for item in items:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
        else:
            (key, value), sep = item, "="
        key, value = str(key).strip(), str(value).strip()
        if not sep or not key:
            raise CbrError(f"--where {item!r}: write key=value, e.g. --where site=back (repeat for several)")
        if pairs.get(key, value) != value:
            raise CbrError(f"--where {key}: given twice with different values ({pairs[key]!r}, {value!r})")
        pairs[key] = value
    return tuple(sorted(pairs.items()))


def _models(models) -> tuple[str, ...] | None:
    return None if not models else tuple(str(m) for m in models)


@dataclass(frozen=True)
class QueryConfig:
    """How a query is answered, explained and rendered."""

    k: int = 5  # neighbours per member
    vote: str = "weighted"  # a VOTE_RULES name
    ensemble: str = "confidence"  # an ENSEMBLES name: how the members' votes combine
    min_credibility: float | None = None  # with the credibility vote: abstain below this p-value
    temperature: float | None = None  # of the weighted vote; None: fitted on the calibration slice
    explain: str = "layercam"  # a CAM method name, or "none"; the measured default (BackboneSpec.cam_method)
    scale: str = "shared"  # colour scale of the report's maps: one for all images, or per image
    models: tuple[str, ...] | None = None  # only these members (names, checkpoints, fingerprints)
    device: str = "cpu"  # torch device of the embedders
    render: bool = True  # write overlays and the HTML report of each recorded query
    out_dir: str = DEFAULT_REPORTS  # the reports go to out_dir/query-<id>/
    explain_budget: int | None = None  # cap on forward evaluations per attribution map (lime, ...)
    explain_neighbours: int | None = None  # similarity maps for the top n neighbours only; None = all k
    progress: bool = False  # a progress bar over the attribution maps, with their evaluations
    ood_alpha: float = DEFAULT_OOD_ALPHA  # typicality below this: out of distribution, no diagnosis
    answer_anyway: bool = False  # give the vote of an out-of-distribution query all the same
    where: tuple[tuple[str, str], ...] = ()  # only neighbours whose metadata match every (key, value)
    similarity_map: str = DEFAULT_SIMILARITY_MAP  # why-this-neighbour maps: SIMILARITY_MAPS (cbr/models/similarity_maps.py)
    coverage: float = DEFAULT_COVERAGE  # of the conformal prediction sets (cbr.pipeline.conformal)
    abstain_ambiguous: bool = False  # abstain (reason "ambiguous") when the set holds several classes

    def __post_init__(self):
        if self.k < 1:
            raise CbrError(f"-k {self.k}: ask for at least 1 neighbour")
        if not 0 <= self.ood_alpha < 1:
            raise CbrError(f"--ood-alpha {self.ood_alpha}: give a p-value level in [0, 1), e.g. 0.01 (0 never flags)")
        if not 0 < self.coverage < 1:
            raise CbrError(f"--coverage {self.coverage}: give a share in (0, 1), e.g. 0.9")
        if self.explain_budget is not None and self.explain_budget < 1:
            raise CbrError(f"--explain-budget {self.explain_budget}: allow at least 1 evaluation per map")
        if self.explain_neighbours is not None and self.explain_neighbours < 0:
            raise CbrError(f"--explain-neighbours {self.explain_neighbours}: give 0 or more")
        check_explain(self.explain)

        check_similarity(self.similarity_map)
        if self.scale not in SCALES:
            raise UnknownNameError("colour scale", self.scale, SCALES)
        object.__setattr__(self, "models", _models(self.models))
        object.__setattr__(self, "out_dir", str(self.out_dir))
        object.__setattr__(self, "where", parse_where(self.where))


@dataclass(frozen=True)
class IndexConfig:
    """How ``cbr index`` embeds, explains and indexes a dataset."""

    models: tuple[str, ...] = ("mobilenet_v2",)  # backbone names or checkpoint paths; one member each
    weights: str = "imagenet"  # for backbone names: a WEIGHTS name (checkpoints carry their own)
    index_type: str = "flat"  # flat, hnsw, ivf or a faiss factory string (new indexes only)
    batch_size: int = 32  # images per forward pass
    explain: str = "layercam"  # CAM method of each case's stored map, or "none" (measured: see cam_method)
    target_layer: str | None = None  # CAM layer inside the trunk; None = the last conv block (fast path)
    num_workers: int | None = None  # decoding worker processes; None = chosen from the CPU count
    device: str = "cpu"  # torch device of the embedders
    engine: str = "local"  # where decoding, embedding and maps run: ENGINES (pipeline/engine.py runs them)
    ray_address: str | None = None  # --engine ray: a running cluster; None starts a local one
    embedding_dtype: str = "float32"  # how embeddings are stored: EMBEDDING_DTYPES (store/encoding.py)
    contrast: str | None = None  # backbone names: cbr.data.contrast.CONTRASTS (None: none); checkpoints: their own
    tta: str | None = None  # test-time augmentation of the embeddings (models.config.TTAS); None: none / the checkpoint's
    crop: str | None = None  # foreground crop before letterboxing (cbr.data.crop.CROPS); None: none / the checkpoint's

    def __post_init__(self):
        check_explain(self.explain)
        if self.engine not in ENGINES:
            raise UnknownNameError("engine", self.engine, ENGINES)

        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise UnknownNameError("embedding dtype", self.embedding_dtype, EMBEDDING_DTYPES)
        object.__setattr__(self, "models", _models(self.models) or IndexConfig.models)


def with_overrides(config, cls, overrides: dict):
    """``config`` (or ``cls()``) with some fields replaced, for callers that set only one or two."""
    base = config if config is not None else cls()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides) if overrides else base
