"""Shared fixtures: tiny phantom datasets and case bases built with a random-init small CNN."""

import os
import shutil

import pytest
from click.testing import CliRunner

from pg import backend, db_url, fresh_db, pg_cluster, pytest_configure, pytest_generate_tests  # noqa: F401

# Tests must never download: an empty hub cache makes any ImageNet lookup fail fast and clearly.
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch-home-empty"))
# Likewise timm's weights (Hugging Face hub): tests build timm models with weights="none" only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test`: one worker per core) each worker, and every cbr it starts, gets its
# share of the cores: torch and faiss would otherwise each start one thread per core in every worker.
# Set before torch or faiss is imported, which read it once.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

TINY = ["--model", "tinycnn", "--weights", "none"]
TINY_TRAIN = ["--backbone", "tinycnn", "--weights", "none", "--epochs", "2", "--img-size", "48", "--batch-size", "8",
              "--workers", "0"]


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory):
    """A small phantom manifest (9 patients x 2 slices, 3 classes, masks) for the case base."""
    from cbr.data.phantom import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("phantoms"), patients=9, slices=2, size=48, seed=0)


@pytest.fixture(scope="session")
def query_set(tmp_path_factory):
    """Held-out phantoms (other patients, other seed) to query with."""
    from cbr.data.phantom import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("queries"), patients=3, slices=1, size=48, seed=1)


@pytest.fixture(scope="session")
def _indexed_template(tmp_path_factory, phantom_set):
    from cbr.cli import cli

    root = tmp_path_factory.mktemp("casebase")
    db = root / "cases.db"
    result = CliRunner().invoke(cli, ["index", str(phantom_set), "--db", str(db), *TINY, "--workers", "0"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="session")
def localised_template(tmp_path_factory, phantom_set):
    """A tinycnn checkpoint trained on the phantoms (which have masks), so it carries a lesion
    localiser, and a case base indexed with it (copy its folder before writing to it):
    SimpleNamespace(ckpt, db, train (the --json of `cbr train`), index_output)."""
    import json
    from types import SimpleNamespace

    from cbr.cli import cli

    root = tmp_path_factory.mktemp("localiser")
    runner = CliRunner()
    ckpt = root / "model.pt"
    r = runner.invoke(cli, ["train", str(phantom_set), "--out", str(ckpt), *TINY_TRAIN, "--json"])
    assert r.exit_code == 0, r.output
    db = root / "cases.db"
    r2 = runner.invoke(cli, ["index", str(phantom_set), "--db", str(db), "--model", str(ckpt), "--explain", "layercam",
                             "--workers", "0"])
    assert r2.exit_code == 0, r2.output
    return SimpleNamespace(ckpt=ckpt, db=db, train=json.loads(r.output), index_output=r2.output)


@pytest.fixture(scope="session")
def _pg_indexed_template(tmp_path_factory, phantom_set, pg_cluster):
    from cbr.cli import cli

    root = tmp_path_factory.mktemp("pg-casebase")
    url = pg_cluster.create("indexed_template")
    os.environ["CBR_INDEX_DIR"] = str(root / "indexes")
    try:
        result = CliRunner().invoke(cli, ["index", str(phantom_set), "--db", url, *TINY, "--workers", "0"])
    finally:
        del os.environ["CBR_INDEX_DIR"]
    assert result.exit_code == 0, result.output
    return "indexed_template", root / "indexes"


@pytest.fixture
def indexed(request, backend, tmp_path, fresh_db):
    """A fresh copy of an indexed case base (tinycnn, random init); returns the db path (SQLite) or URL."""
    if backend == "postgresql":
        template, indexes = request.getfixturevalue("_pg_indexed_template")
        url = fresh_db("cases", template=template)
        shutil.copytree(indexes, tmp_path / "cases.indexes")
        return url
    _indexed_template = request.getfixturevalue("_indexed_template")
    for item in _indexed_template.iterdir():
        dest = tmp_path / item.name
        if item.is_dir():
            shutil.copytree(item, dest)
        else:
            shutil.copy2(item, dest)
    return tmp_path / "cases.db"


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    from cbr.cli import cli

    return runner.invoke(cli, [str(a) for a in args])
