"""Options shared by several commands, written once."""

import sys

import click

__all__ = ["db_option", "index_dir_option", "progress_enabled", "json_option"]


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


def progress_enabled() -> bool:
    """Progress bars only for a person watching: not with --quiet, not when stderr is not a TTY."""
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
    return not quiet and sys.stderr.isatty()


class RegistryChoice(click.Choice):
    """A click.Choice whose names come from a registry, looked up only when needed.

    ``loader`` returns the registry's names; it runs when an option is validated or its help is
    shown, never at import, so ``cbr --help`` does not import numpy or torch.
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


def cam_names():
    from explain.methods import METHOD_NAMES

    return METHOD_NAMES


def vote_names():
    from cbr.pipeline.vote import VOTE_RULES

    return list(VOTE_RULES)


def ensemble_names():
    from cbr.pipeline.vote import ENSEMBLES

    return list(ENSEMBLES)


def backbone_names():
    from cbr.models.backbones import BACKBONES

    return list(BACKBONES)


def manifest_options(f):
    """The four manifest options, handed to the command as one ``manifest`` (a ``ManifestSpec``)."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, path_column, label_column, group_column, images, **kwargs):
        from cbr.data.dataset import ManifestSpec

        spec = ManifestSpec(path_column, label_column, group_column, tuple(images))
        return f(*args, manifest=spec, **kwargs)

    wrapper = click.option("--path-column", default="path", show_default=True, help="Manifest column with image paths.")(wrapper)
    wrapper = click.option("--label-column", default="label", show_default=True, help="Manifest column with labels.")(wrapper)
    wrapper = click.option("--group-column", default=None, help="Manifest column with patient/group ids [default: patient_id if present].")(wrapper)
    return click.option("--images", multiple=True, type=click.Path(file_okay=False), help="Root folder(s) for manifest paths (repeatable).")(wrapper)
