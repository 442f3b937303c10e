"""`cbr index --engine ray`: the same case base as the local engine, on a local Ray instance."""

import sys

import numpy as np
import pytest
from sqlalchemy import select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Embedding, Explanation
from conftest import TINY, invoke


def _contents(db):
    """sha256 -> (path, label, group, embedding, [(target, method, map bytes, scale)])."""
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        out = {c.sha256: [c.path, c.label, c.group_id, None, []] for c in s.scalars(select(Case))}
        by_id = {c.id: c.sha256 for c in s.scalars(select(Case))}
        for e in s.scalars(select(Embedding)):
            out[by_id[e.case_id]][3] = np.frombuffer(e.vector, dtype=np.float32)
        for m in s.scalars(select(Explanation).where(Explanation.role == "case")):
            out[by_id[m.case_id]][4].append((m.target, m.method, np.frombuffer(m.data, dtype=np.float16), m.scale))
    cb.close()
    return out


@pytest.mark.slow
def test_missing_ray_names_the_extra(runner, phantom_set, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = invoke(runner, "index", phantom_set, "--db", tmp_path / "c.db", *TINY, "--engine", "ray")
    assert result.exit_code == 1
    assert "pip install 'cbr[ray]'" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(runner, phantom_set, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' to run this test")
    local = tmp_path / "local.db"
    result = invoke(runner, "index", phantom_set, "--db", local, *TINY, "--workers", "0", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = tmp_path / "ray.db"
        result = invoke(runner, "index", phantom_set, "--db", remote, *TINY, "--batch-size", "8", "--engine", "ray")
        assert result.exit_code == 0, result.output
        assert "cases added:   18" in result.output
        again = invoke(runner, "index", phantom_set, "--db", remote, *TINY, "--batch-size", "8", "--engine", "ray")
        assert again.exit_code == 0 and "already there: 18" in again.output, again.output
    finally:
        ray.shutdown()
    a, b = _contents(local), _contents(remote)
    assert a.keys() == b.keys() and len(a) == 18
    for sha in a:
        assert a[sha][:3] == b[sha][:3]
        np.testing.assert_allclose(a[sha][3], b[sha][3], atol=1e-5)
        (ta, ma, da, sa), = a[sha][4]
        (tb, mb, db_, sb), = b[sha][4]
        assert (ta, ma) == (tb, mb)
        np.testing.assert_allclose(da.astype(np.float32), db_.astype(np.float32), atol=2e-3)
        assert sa == pytest.approx(sb, rel=1e-4)
    # Case ids follow the records' order on both engines.
    ids = {}
    for db in (local, remote):
        cb = open_casebase(db, create=False)
        with cb.read() as s:
            ids[db] = [c.sha256 for c in s.scalars(select(Case).order_by(Case.id))]
        cb.close()
    assert ids[local] == ids[remote]


@pytest.mark.slow
def test_ray_run_interrupted_then_rerun_is_consistent(runner, phantom_set, tmp_path, monkeypatch):
    """A Ray run that dies after its first stored batch: the re-run completes it, nothing doubled or lost."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' to run this test")
    from cbr.store.writer import CaseWriter
    from test_reliability_crash import check_consistency, phantom_hashes

    real, calls = CaseWriter.store, []

    def dies_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash of the writer")
        return real(self, *args, **kwargs)

    db = tmp_path / "ray.db"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        monkeypatch.setattr(CaseWriter, "store", dies_on_the_second_batch)
        crashed = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--batch-size", "4", "--engine", "ray")
        assert crashed.exit_code != 0 and isinstance(crashed.exception, RuntimeError)
        monkeypatch.undo()
        rerun = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--batch-size", "4", "--engine", "ray")
        assert rerun.exit_code == 0, rerun.output
        assert "cases added:   14" in rerun.output and "already there: 4" in rerun.output
    finally:
        ray.shutdown()
    assert check_consistency(db, phantom_hashes(phantom_set)) == []
