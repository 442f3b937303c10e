"""The root ``cbr`` click group; command modules register their commands on it."""

import logging
import os
import sys

import click

from cbr.errors import CbrError

__all__ = ["CbrGroup", "cli", "discard_stdout"]


class CbrGroup(click.Group):
    """A group that turns library errors into one-line ``Error: ...`` messages (exit 1)."""

    def invoke(self, ctx):
        from cbr.data.text import for_terminal

        argv = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # click empties both when it invokes
        try:
            return super().invoke(ctx)
        except CbrError as e:
            raise click.ClickException(for_terminal(str(e))) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`cbr history | head -1`): end quietly with status 0, as the
            # Unix tools do (click's own handling exits 1 without a word).
            discard_stdout()
            ctx.exit(0)
        except Exception as e:  # noqa: BLE001 - only the failures below become one line; others re-raise
            message = _one_line_failure(e, argv)
            if message is None:
                raise
            raise click.ClickException(for_terminal(message)) from None


def discard_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that the flush of what is still
    buffered (at exit) cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test runner's capture): nothing to flush
        pass


def _db_given(argv) -> str | None:
    """The ``--db`` of the command that ran (its context is gone once it raised)."""
    for i, arg in enumerate(argv):
        if arg == "--db" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--db="):
            return arg[5:]
    return os.environ.get("CBR_DB") or "cases.db"


def _one_line_failure(e: Exception, argv) -> str | None:
    """The one-line message of a database or file-system failure met after a command started."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is not None and isinstance(e, exc.DatabaseError):
        from cbr.store.casebase import describe_db_error

        return describe_db_error(e, _db_given(argv))
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):  # a closed pipe (| head) is not an error
        import errno

        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e)
        hints = {errno.ENOSPC: "the disk is full; free some space and run the command again",
                 errno.EDQUOT: "the disk quota is exceeded; free some space and run the command again",
                 errno.EROFS: "the file system is read-only; choose a writable folder",
                 errno.EACCES: "permission denied; choose a folder you may write to",
                 errno.EPERM: "not permitted (read-only or immutable); choose a folder you may write to"}
        return f"{where}{what}" + (f"; {hints[e.errno].split('; ', 1)[-1]}" if e.errno in hints else "")
    return None


@click.group(cls=CbrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbr")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notices.")
@click.option("--max-file-mb", type=click.FloatRange(min=0, min_open=True), default=None, envvar="CBR_MAX_FILE_MB",
              help="Refuse any input file larger than this many MiB. [default: 2048]")
@click.pass_context
def cli(ctx, quiet, max_file_mb):
    """Case-based reasoning for medical images.

    Index labelled images into a case base, query new images against it, and audit every answer
    through the cases it rests on and where the network looked.

    \b
    Example:
        cbr demo
        cbr index data/brain_mri --db cases.db
        cbr query scan.png --db cases.db -k 5
    """
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    if max_file_mb is not None:  # read by cbr.data.guard, in this process and its decoding workers
        os.environ["CBR_MAX_FILE_MB"] = str(max_file_mb)
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s", stream=sys.stderr)
