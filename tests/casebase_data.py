"""Shared by the tests that build a case base by hand: one model row, no image behind it."""

from cbr.store.casebase import open_casebase
from cbr.store.schema import Model


def casebase_with_model(tmp_path, dim: int):
    """(a SQLite case base in ``tmp_path`` with its index folder, the id of its one model row, whose
    embeddings have ``dim`` dimensions)."""
    cb = open_casebase(f"sqlite:///{tmp_path / 'c.db'}", index_dir=tmp_path / "idx")
    with cb.write() as s:
        model = Model(fingerprint="f" * 64, backbone="tinycnn", weights="none", source="tinycnn",
                      config={"embedding_dim": dim})
        s.add(model)
        s.flush()
        model_id = model.id
    return cb, model_id
