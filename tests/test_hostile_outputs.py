"""Hostile `--out` paths (issue 24, item 1): a write replaces only a regular file or a new name.

A device, a symbolic link, a socket or a folder given as `--out` is refused in one line and left as
it was; a FIFO is written through (the reader gets the output, the FIFO stays); `-` is stdout.
Nothing here touches a real /dev node: devices are made with mknod in tmp_path (root only).
"""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest

from conftest import TINY, invoke
from test_hostile_inputs import _images
from test_reliability_corruption import assert_one_line_error


@pytest.fixture
def queried(runner, indexed, query_set, tmp_path):
    """A case base with one recorded query (id 1)."""
    result = invoke(runner, "query", _images(query_set)[0], "--db", indexed, "--out", tmp_path / "first",
                    "--explain", "none")
    assert result.exit_code == 0, result.output
    return indexed


def _device(path):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null, in tmp_path
    return lambda: stat.S_ISCHR(os.lstat(path).st_mode)


def _symlink(path):
    target = path.parent / "target.txt"
    target.write_text("keep")
    os.symlink(target, path)
    return lambda: path.is_symlink() and target.read_text() == "keep"


def _dangling(path):
    os.symlink(path.parent / "nowhere", path)
    return lambda: path.is_symlink() and not (path.parent / "nowhere").exists()


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a relative name: AF_UNIX paths are limited to 108 bytes
    try:
        s.bind(path.name)
    finally:
        os.chdir(cwd)
    return lambda: stat.S_ISSOCK(os.lstat(path).st_mode)


SPECIAL = {"device": _device, "symlink": _symlink, "dangling-symlink": _dangling, "socket": _socket}


def _command(name, db, out, data):
    return {"export": ["export", "--what", "cases", "--db", db, "--out", out],
            "report": ["report", "1", "--db", db, "--out", out],
            "train": ["train", data, "--out", out, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1",
                      "--workers", "0"]}[name]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "report", "train"])
@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_out_refuses_what_is_not_a_regular_file_and_leaves_it(runner, queried, phantom_set, tmp_path, command, kind):
    out = tmp_path / "o"
    intact = SPECIAL[kind](out)
    line = assert_one_line_error(invoke(runner, *_command(command, queried, out, phantom_set)), str(out))
    assert "not a regular file" in line or "symbolic link" in line, line
    assert intact(), f"{kind} at --out was replaced"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temporary file left


class _Reader:
    """Reads a FIFO to its end in a thread; releases it if nothing ever opens the other end."""

    def __init__(self, path):
        self.path, self.data = path, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as fh:
            self.data = fh.read()

    def result(self):
        self.thread.join(10)
        if self.thread.is_alive() and stat.S_ISFIFO(os.lstat(self.path).st_mode):
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))  # the reader gets EOF
            self.thread.join(10)
        return self.data


@pytest.mark.slow
@pytest.mark.parametrize("via_link", [False, True], ids=["fifo", "link-to-fifo"])
@pytest.mark.parametrize("command", ["export", "report"])
def test_out_writes_through_a_fifo(runner, queried, phantom_set, tmp_path, command, via_link):
    """A FIFO (or a link to one, as bash's >(...) gives) is the user's evident intent: write to it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = fifo
    if via_link:
        out = tmp_path / "link"
        os.symlink(fifo, out)
    reader = _Reader(fifo)
    result = invoke(runner, *_command(command, queried, out, phantom_set))
    data = reader.result()
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (not via_link or out.is_symlink())
    head = {"export": b"id,sha256,path,label", "report": b"<!"}[command]
    assert data is not None and data.lstrip().startswith(head), data[:80] if data else data


@pytest.mark.parametrize("name", ["-", "/dev/stdout"])
@pytest.mark.parametrize("command", ["export", "report"])
def test_out_dash_is_stdout(runner, queried, phantom_set, tmp_path, monkeypatch, command, name):
    """`-` (or /dev/stdout, never opened: `>> file` must not be truncated) is standard output."""
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, *_command(command, queried, name, phantom_set))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists()
    head = {"export": "id,sha256,path,label", "report": "<!"}[command]
    assert result.stdout.lstrip().startswith(head), result.stdout[:200]


def test_out_still_replaces_a_regular_file(runner, queried, tmp_path):
    out = tmp_path / "cases.csv"
    out.write_text("old")
    result = invoke(runner, "export", "--what", "cases", "--db", queried, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("id,sha256,path,label")


def test_train_refuses_stdout(runner, phantom_set, tmp_path):
    assert_one_line_error(invoke(runner, "train", phantom_set, "--out", "-", *TINY[2:], "--backbone", "tinycnn"),
                          "--out -")


# -- issue 24, item 11: stored text reaches a terminal escaped, whatever the command ----------

HOSTILE_PATH = "/data/\x1b]0;pwned\x07\x1b[2J\x1b[8mhidden\r\x9b31m.png"


def _on_a_terminal(*args) -> bytes:
    """What ``cbr ARGS`` writes to a terminal (a pseudo-terminal), as bytes."""
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "cbr", *map(str, args)], stdout=slave, stderr=subprocess.PIPE,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(120) == 0, proc.stderr.read().decode()
    return b"".join(chunks)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["export", "--what", "cases"], ["export", "--what", "cases", "--format", "json"],
                                  ["show", "1"]], ids=["export-csv", "export-json", "show"])
def test_stored_control_characters_never_reach_a_terminal(queried, args):
    import sqlite3

    con = sqlite3.connect(queried)
    con.execute("UPDATE cases SET path = ?", (HOSTILE_PATH,))
    con.commit()
    con.close()
    shown = _on_a_terminal(*args, "--db", queried)
    assert b"\x1b" not in shown and b"\x07" not in shown and "\x9b".encode() not in shown, shown[:400]
    assert b"\\x1b]0;pwned" in shown or b"\\u001b]0;pwned" in shown, shown[:400]  # shown, escaped
