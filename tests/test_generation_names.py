"""Index file names carry the tag of the folder that wrote them, for the images' and the findings' indexes."""

from cbr.store.generation import folder_tag, generation_name, written_elsewhere


def test_both_kinds_of_index_file_written_by_another_folder_are_recognised(tmp_path):
    """Bug: only `model-…` names were read, so another machine's `findings-…` file counted as missing
    damage in `cbr db check` (one PostgreSQL case base, an --index-dir per machine)."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    mine, other = folder_tag(here), folder_tag(there)
    assert mine != other
    for kind in ("model", "findings"):
        assert written_elsewhere(f"{kind}-1-{other}-0123456789ab.faiss", here)
        assert not written_elsewhere(f"{kind}-1-{mine}-0123456789ab.faiss", here)
    assert not written_elsewhere("model-1.faiss", here)  # an untagged, older name is this folder's
    assert written_elsewhere(generation_name(1, there), here)
