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

TINY = ["--model", "tinycnn", "--weights", "none"]


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
