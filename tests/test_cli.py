"""The CLI frame: docstrings with examples, one-line errors, start-up without torch."""

import subprocess
import sys

import click
import pytest

from cbr.cli import cli
from cbr.cli.group import COMMANDS
from conftest import invoke


def _commands(group, prefix=()):
    ctx = click.Context(group, info_name=prefix[-1] if prefix else "cbr")
    for name in group.list_commands(ctx):  # the lazy group imports each command's module here
        cmd = group.get_command(ctx, name)
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_the_lazy_group_lists_every_command_module():
    # A command missing from COMMANDS would be unreachable; a stale entry would fail here on import.
    names = [path[0] for path, _ in _commands(cli) if len(path) == 1]
    assert names == sorted(names) and {"index", "query", "demo", "serve", "db", "history"} <= set(names)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_help_summary_is_the_commands_own(name):
    # `cbr --help` shows COMMANDS' summaries (no import); they must say what the docstrings say.
    command = cli.get_command(None, name)
    for limit in (45, 60, 200):
        assert click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit) == command.get_short_help_str(limit)


@pytest.mark.parametrize("path,command", list(_commands(cli)), ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_every_command_has_a_docstring_with_an_example(path, command):
    assert command.help, f"cbr {' '.join(path)} has no docstring"
    assert "Example:" in command.help, f"cbr {' '.join(path)} has no example"
    assert "cbr " in command.help.split("Example:", 1)[1]


def test_cbr_error_becomes_one_line_error_and_exit_1(runner, tmp_path):
    result = invoke(runner, "db", "current", "--db", tmp_path / "missing.db")
    assert result.exit_code == 1
    assert result.output.startswith("Error: case base ")
    assert "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_usage_error_exits_2(runner):
    result = invoke(runner, "query")
    assert result.exit_code == 2
    assert "give IMAGES or --embedding FILE.npy" in result.output
    result = invoke(runner, "feedback")
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_db_upgrade_and_current(runner, tmp_path):
    db = tmp_path / "c.db"
    result = invoke(runner, "db", "upgrade", "--db", db)
    assert result.exit_code == 0, result.output
    assert "upgraded from empty to" in result.output
    result = invoke(runner, "db", "current", "--db", db)
    assert result.exit_code == 0
    assert "up to date" in result.output
    result = invoke(runner, "db", "upgrade", "--db", db)
    assert "already at revision" in result.output


def test_help_does_not_import_torch_numpy_or_sqlalchemy():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom cbr.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'numpy', 'sqlalchemy', 'faiss', 'PIL') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"cbr --help imported {out}"


def test_models_lists_every_registry(runner):
    from cbr.models.backbones import BACKBONES
    from cbr.pipeline.vote import VOTE_RULES
    from explain.methods import METHOD_NAMES

    result = invoke(runner, "models", "--json")
    assert result.exit_code == 0, result.output
    import json

    info = json.loads(result.output)
    assert [b["backbone"] for b in info["backbones"]] == list(BACKBONES)
    assert [m["name"] for m in info["cam_methods"]] == list(METHOD_NAMES)
    assert info["vote_rules"] == list(VOTE_RULES)
