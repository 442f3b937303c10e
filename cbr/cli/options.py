"""Options shared by several commands, written once."""

import functools
import sys

import click

from cbr.data.contrast import CONTRASTS
from cbr.data.crop import CROPS
from cbr.data.dataset import ManifestSpec
from cbr.data.sources import SourceSpec
from cbr.data.windows import WINDOWS
from cbr.errors import CbrError
from cbr.models.backbones import BACKBONES, TIMM_FORM
from cbr.models.config import TTAS, WEIGHTS
from cbr.pipeline.settings import SCALES
from cbr.pipeline.vote import ENSEMBLES, VOTE_RULES
from explain.methods import METHOD_NAMES

__all__ = ["db_option", "index_dir_option", "progress_enabled", "json_option", "weights_option", "scale_option",
           "source_options", "where_option", "contrast_option", "tta_option", "crop_option"]


def db_option(f):
    return click.option(
        "--db", default="cases.db", envvar="CBR_DB", show_default=True, show_envvar=True,
        help="Case base: a file path (SQLite) or any SQLAlchemy URL.",
    )(f)


def index_dir_option(f):
    return click.option(
        "--index-dir", type=click.Path(file_okay=False), envvar="CBR_INDEX_DIR", default=None,
        help="Folder of the FAISS files (default: beside a SQLite case base).",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def weights_option(f=None, *, help="Weights for backbone names (checkpoints carry their own)."):
    """``--weights``, its choices from ``cbr.models.config.WEIGHTS``; ``@weights_option(help=...)`` rewords it."""
    if f is None:
        return lambda g: weights_option(g, help=help)
    return click.option("--weights", type=click.Choice(WEIGHTS), default=WEIGHTS[0], show_default=True, help=help)(f)


def scale_option(f):
    return click.option("--scale", type=click.Choice(SCALES), default=SCALES[0], show_default=True,
                        help="Colour scale of the maps.")(f)


def where_option(f):
    return click.option("--where", "where", multiple=True, metavar="KEY=VALUE",
                        help="Retrieve only cases whose metadata (manifest columns) match; repeat to require several.")(f)


def contrast_option(f):
    return click.option("--contrast", type=click.Choice(list(CONTRASTS)), default=None,
                        help="Contrast normalisation before letterboxing, kept with the model (equalize, clahe: "
                        "for exposure that varies; measure it with cbr evaluate) [default: none, or a "
                        "checkpoint's own].")(f)


def crop_option(f):
    return click.option("--crop", type=click.Choice(list(CROPS)), default=None,
                        help="Crop to the foreground's bounding box (+4% margin) before letterboxing, kept with the "
                        "model: wide black, white or grey borders stop wasting the input [default: none, or a "
                        "checkpoint's own].")(f)


def tta_option(f):
    return click.option("--tta", type=click.Choice(list(TTAS)), default=None,
                        help="Test-time augmentation of the embeddings, kept with the model (flip: mean of the image's "
                        "and its mirror's; costs a second forward pass) [default: none, or a checkpoint's own].")(f)


def progress_enabled() -> bool:
    """Progress bars only for a person watching: not with --quiet, not when stderr is not a TTY."""
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
    return not quiet and sys.stderr.isatty()


class RegistryChoice(click.Choice):
    """A click.Choice whose names come from a registry, looked up only when needed.

    ``loader`` returns the registry's names; it runs when an option is validated or its help is
    shown, so the choices are the registry's as it is then. A name shaped
    ``prefix:<what>`` is a form: any value ``prefix:...`` passes here, and the library checks the rest.
    """

    def __init__(self, loader, extra=()):
        self._loader, self._extra, self._choices = loader, tuple(extra), None
        self.case_sensitive = True

    @property
    def choices(self):
        if self._choices is None:
            self._choices = tuple(self._loader()) + self._extra
        return self._choices

    @choices.setter
    def choices(self, value):
        self._choices = tuple(value)

    def convert(self, value, param, ctx):
        for choice in self.choices:
            prefix, sep, _ = choice.partition("<")
            if sep and choice.endswith(">") and isinstance(value, str) and value.startswith(prefix) \
                    and len(value) > len(prefix):
                return value
        return super().convert(value, param, ctx)


def cam_names():
    return METHOD_NAMES


def vote_names():
    return list(VOTE_RULES)


def ensemble_names():
    return list(ENSEMBLES)


def backbone_names():
    return [*BACKBONES, TIMM_FORM]


def manifest_options(f):
    """The four manifest options, handed to the command as one ``manifest`` (a ``ManifestSpec``)."""
    @functools.wraps(f)
    def wrapper(*args, path_column, label_column, group_column, images, **kwargs):
        spec = ManifestSpec(path_column, label_column, group_column, tuple(images))
        return f(*args, manifest=spec, **kwargs)

    wrapper = click.option("--path-column", default="path", show_default=True, help="Manifest column with image paths.")(wrapper)
    wrapper = click.option("--label-column", default="label", show_default=True, help="Manifest column with labels.")(wrapper)
    wrapper = click.option("--group-column", default=None, help="Manifest column with patient/group ids [default: patient_id if present].")(wrapper)
    return click.option("--images", multiple=True, type=click.Path(file_okay=False), help="Root folder(s) for manifest paths (repeatable).")(wrapper)


def _axis_names():
    return ("axial", "coronal", "sagittal")


def _source_option(name):
    """One of the clinical-format options (see ``source_options``)."""
    presets = ", ".join(WINDOWS)
    return {
        "window": click.option("--window", default=None, metavar="WINDOW",
                               help=f"VOI window for DICOM/NIfTI pixels: auto (the file's own), minmax, {presets}, "
                                    "or C,W (centre,width) [default: the model's own, auto]. Part of the model's "
                                    "preprocessing."),
        "frames": click.option("--frames", type=click.Choice(["all", "middle"]), default="all", show_default=True,
                               help="Multi-frame DICOM: every frame is a case, or only the middle one."),
        "slices": click.option("--slices", default="all", show_default=True, metavar="all|middle|every:N",
                               help="NIfTI: which slices become cases."),
        "axis": click.option("--axis", type=click.Choice(_axis_names()), default="axial", show_default=True,
                             help="NIfTI: the axis slices are cut along."),
        "volume": click.option("--volume", type=click.IntRange(0), default=0, show_default=True,
                               help="NIfTI 4D: which 3D volume (from 0)."),
        "split": click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="train",
                              show_default=True, help=".npz: which split's {split}_images and {split}_labels to read."),
        "classes": click.option("--classes", default=None, metavar="NAME0,NAME1,...",
                                help=".npz: class names in label order [default: the label numbers]."),
        "pseudonymise": click.option("--pseudonymise", default=None, metavar="KEY", envvar="CBR_PSEUDONYMISE_KEY",
                                     show_envvar=True,
                                     help="Store patient ids (DICOM PatientID, manifest patient column, --patient) as "
                                          "HMAC-SHA256 keyed hashes, and DICOM images under a neutral locator instead "
                                          "of their file names. The key is never stored: a case base indexed with it "
                                          "refuses a query or index run without it, or with another key."),
        "allow_burned_in": click.option("--allow-burned-in", is_flag=True,
                                        help="DICOM: accept images marked BurnedInAnnotation=YES (text such as names "
                                             "drawn into the pixels) [default: skip them, or refuse such a query]."),
    }[name]


SOURCE_OPTION_NAMES = ("window", "frames", "slices", "axis", "volume", "split", "classes", "pseudonymise",
                       "allow_burned_in")


def source_options(*names):
    """The clinical-format options (all, or ``names``), handed to the command as one ``sources``
    (a ``cbr.data.sources.SourceSpec``); a bad value is a usage error (exit 2)."""
    names = names or SOURCE_OPTION_NAMES

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            given = {n: kwargs.pop(n) for n in names}
            if "classes" in given:
                given["classes"] = tuple(c.strip() for c in given["classes"].split(",")) if given["classes"] else ()
            try:
                spec = SourceSpec(**given)
            except CbrError as e:
                raise click.UsageError(str(e)) from None
            return f(*args, sources=spec, **kwargs)

        for n in reversed(names):
            wrapper = _source_option(n)(wrapper)
        return wrapper

    return decorate
