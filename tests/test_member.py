"""cbr.store.member: a case base's models are rebuilt exactly as they were indexed."""

import dataclasses

import pytest

from cbr.models import backbones
from cbr.pipeline.index import index_dataset
from cbr.store.casebase import open_casebase
from cbr.store.member import load_members


@pytest.mark.slow
def test_a_model_indexed_at_the_trunk_output_survives_a_new_registry_default(phantom_set, tmp_path, monkeypatch):
    # Indexed at '' (the trunk output), then the registry's default CAM layer changes: the stored
    # '' must win, or the rebuilt model's fingerprint differs and every query is refused.
    cb = open_casebase(tmp_path / "cases.db")
    index_dataset(cb, phantom_set, models=("tinycnn",), weights="none", explain="none", target_layer="")
    before = load_members(cb)[0].fingerprint
    spec = dataclasses.replace(backbones.BACKBONES["tinycnn"], target_layer="block3")
    monkeypatch.setitem(backbones.BACKBONES, "tinycnn", spec)
    members = load_members(cb)
    assert members[0].fingerprint == before
    assert members[0].embedder.config.target_layer == ""
