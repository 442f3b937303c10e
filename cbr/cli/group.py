"""The root ``cbr`` click group. Its commands are loaded lazily (click's "lazily loading
subcommands" pattern): ``COMMANDS`` names each command's ``module:function`` and its one-line
summary, and a command module is imported only when that command runs or shows its help. So every
module imports what it uses at its top, and ``cbr --help`` (which lists the summaries) imports
none of them."""

import errno
import importlib
import logging
import os
import sys
import traceback

import click

from cbr.cli.terminal import escaped_stdout
from cbr.data.text import for_terminal
from cbr.errors import CbrError

__all__ = ["COMMANDS", "CbrGroup", "cli", "discard_stdout"]

# Every command of `cbr`: its name -> ("module:function" of its click command, the first paragraph
# of its docstring). `cbr --help` lists the summaries without importing the modules;
# tests/test_cli.py checks that each summary is its command's.
COMMANDS = {
    "db": ("cbr.cli.db:db",
                 "Case base schema: upgrade and inspect (Alembic)."),
    "demo": ("cbr.cli.retrieval:demo_cmd",
                 "Run the whole product offline on synthetic MRI phantoms."),
    "evaluate": ("cbr.cli.learning:evaluate_cmd",
                 "Measure accuracy, calibration, retrieval and localisation, grouped by patient."),
    "explain": ("cbr.cli.explain:explain_cmd",
                 "Add maps made with another method to a past query, without searching again."),
    "export": ("cbr.cli.audit:export_cmd",
                 "Export queries, cases, feedback or expert regions as CSV or JSON for analysis outside cbr."),
    "feedback": ("cbr.cli.curation:feedback_cmd",
                 "Record an expert's verdict on a query: confirm or correct it, and optionally retain it."),
    "history": ("cbr.cli.audit:history_cmd",
                 "List past queries, newest first, with their expert feedback."),
    "import": ("cbr.cli.embeddings:import_cmd",
                 "Import embeddings computed elsewhere (a Ray or GPU job) as cases, then index them."),
    "index": ("cbr.cli.retrieval:index_cmd",
                 "Index a labelled dataset into a case base (incremental and resumable)."),
    "models": ("cbr.cli.info:models_cmd",
                 "List the backbones, CAM methods and vote rules, and which ImageNet weights are offline."),
    "query": ("cbr.cli.retrieval:query_cmd",
                 "Diagnose images from their nearest cases, with maps of where the network looked."),
    "remove": ("cbr.cli.curation:remove_cmd",
                 "Take cases out of search, in the case base and in every index."),
    "report": ("cbr.cli.audit:report_cmd",
                 "Re-create a past query's self-contained HTML report from the case base."),
    "serve": ("cbr.cli.serve:serve_cmd",
                 "Serve a case base to a browser: query, compare neighbours and maps, refine, give feedback."),
    "show": ("cbr.cli.audit:show_cmd",
                 "Show a past query's full record, rebuilt from the case base."),
    "train": ("cbr.cli.learning:train_cmd",
                 "Fine-tune a backbone with a classification head on a labelled dataset."),
}


class CbrGroup(click.Group):
    """A group whose commands are imported on first use, and that turns library errors into
    one-line ``Error: ...`` messages (exit 1).

    Args:
        lazy_commands: command name -> (``"module:function"`` of its click command, its summary).
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            target = self.lazy_commands[cmd_name][0]
            module, _, name = target.partition(":")
            command = getattr(importlib.import_module(module), name)
            if not isinstance(command, click.Command):
                raise TypeError(f"{target} is not a click command")
            self.commands[cmd_name] = command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx, formatter):
        """The command list of ``--help``, from the summaries: no command module is imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in self.lazy_commands and name not in self.commands:
                # click shortens a summary as it would the command's own help, without importing its module
                rows.append((name, click.Command(name, help=self.lazy_commands[name][1]).get_short_help_str(limit)))
            elif not (command := self.get_command(ctx, name)).hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        argv = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # click empties both when it invokes
        try:
            with escaped_stdout():
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


def _raised_by_sqlalchemy(e: Exception) -> bool:
    """Whether ``e`` was raised while SQLAlchemy turned a stored value into a Python one."""
    return any("sqlalchemy" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(e.__traceback__))


def _one_line_failure(e: Exception, argv) -> str | None:
    """The one-line message of a database or file-system failure met after a command started."""
    # A DatabaseError comes only from a case base that cbr.store.casebase opened, so both modules
    # are loaded whenever one is met; looking them up keeps SQLAlchemy out of `cbr --help`.
    exc, casebase = sys.modules.get("sqlalchemy.exc"), sys.modules.get("cbr.store.casebase")
    if exc is not None and casebase is not None and isinstance(e, exc.DatabaseError):
        return casebase.describe_db_error(e, _db_given(argv))
    if isinstance(e, ValueError) and casebase is not None and _raised_by_sqlalchemy(e):
        # A stored JSON value that does not decode, met by a reader that has no check of its own.
        db = _db_given(argv)
        return (f"a value stored in case base {db} does not decode ({str(e).splitlines()[0]}); "
                f"`cbr db check --db {db}` names the row and its repair")
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):  # a closed pipe (| head) is not an error
        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e)
        hints = {errno.ENOSPC: "the disk is full; free some space and run the command again",
                 errno.EDQUOT: "the disk quota is exceeded; free some space and run the command again",
                 errno.EROFS: "the file system is read-only; choose a writable folder",
                 errno.EACCES: "permission denied; choose a folder you may write to",
                 errno.EPERM: "not permitted (read-only or immutable); choose a folder you may write to"}
        return f"{where}{what}" + (f"; {hints[e.errno].split('; ', 1)[-1]}" if e.errno in hints else "")
    return None


@click.group(cls=CbrGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbr")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notices.")
@click.option("--max-file-mb", type=click.FloatRange(min=0, min_open=True), default=None, envvar="CBR_MAX_FILE_MB",
              help="Refuse any input file larger than this many MiB. [default: 2048]")
@click.option("--max-decoded-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              envvar="CBR_MAX_DECODED_MB",
              help="Refuse any image or volume whose header declares more decoded pixel data than this many "
                   "MiB (rows x columns x frames x bytes per sample). [default: 512]")
@click.pass_context
def cli(ctx, quiet, max_file_mb, max_decoded_mb):
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
    if max_decoded_mb is not None:  # read by cbr.data.guard.max_decoded_bytes, like --max-file-mb
        os.environ["CBR_MAX_DECODED_MB"] = str(max_decoded_mb)
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s", stream=sys.stderr)
