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
