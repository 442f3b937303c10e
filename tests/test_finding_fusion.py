"""A region query ranks the case base's findings by the mean of two cosines: its region's to the
finding, and its whole image's to the finding's case (``cbr.pipeline.finding_search``).

A crop alone loses the context the whole image carries; the fused ranking keeps both. Checked on a
constructed case where the crop alone puts a wrong-class finding first, and against an exact scan
on random vectors (the candidates come from both indexes, deepened until nothing unseen can win).
"""

from types import SimpleNamespace

import numpy as np
import pytest

from casebase_data import casebase_with_model
import index as ix
from cbr.pipeline.finding_search import FindingSet, search_findings
from cbr.store.encoding import encode_vector
from cbr.store.schema import Case, Embedding, Finding


def _store(tmp_path, images, findings, labels, groups=None):
    """A case base of cases with these image vectors, ``findings`` [(case index, box, vector)], and a
    member (flat image index) and FindingSet (flat findings index) over them."""
    dim = images.shape[1]
    cb, model_id = casebase_with_model(tmp_path, dim)
    with cb.write() as s:
        cases = []
        for i, (v, label) in enumerate(zip(images, labels)):
            case = Case(sha256=f"{i:064x}", path=f"/c/{i}.png", label=label, meta={},
                        group_id=None if groups is None else groups[i])
            s.add(case)
            s.flush()
            s.add(Embedding(case_id=case.id, model_id=model_id, vector=encode_vector(v)))
            cases.append(case.id)
        rows = [Finding(case_id=cases[c], model_id=model_id, source="mask", box=list(box), vector=encode_vector(v))
                for c, box, v in findings]
        s.add_all(rows)
        s.flush()
        fids = [f.id for f in rows]
    image_index = ix.build(dim, "flat")
    ix.add(image_index, images.astype(np.float32), np.asarray(cases, dtype=np.int64))
    finding_index = ix.build(dim, "flat")
    ix.add(finding_index, np.stack([v for _, _, v in findings]).astype(np.float32), np.asarray(fids, dtype=np.int64))
    return cb, SimpleNamespace(index=image_index, model_id=model_id), FindingSet(finding_index, None), cases


def _unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_the_whole_image_outranks_a_wrong_class_crop_that_alone_would_come_first(tmp_path):
    # query: region [1,0,0], whole image [0,1,0]
    images = np.stack([_unit(0, 0, 1), _unit(0, 1, 0), _unit(0, .6, .8), _unit(0, .8, .6)])
    findings = [(0, (0, 0, 4, 4), _unit(1, 0, 0)),  # the wrong class's finding: the crop's nearest (1.0)
                (1, (1, 1, 5, 5), _unit(.8, .6, 0)),  # 0.8, its image 1.0
                (2, (2, 2, 6, 6), _unit(.6, .8, 0)),  # 0.6, its image 0.6
                (3, (3, 3, 7, 7), _unit(0, 0, 1)),  # 0.0 ...
                (3, (4, 4, 9, 9), _unit(.6, 0, .8))]  # ... and 0.6: the case's best finding; its image 0.8
    cb, member, fset, cases = _store(tmp_path, images, findings, ["b", "a", "a", "a"])
    try:
        with cb.read() as s:
            hits, boxes, sims = search_findings(s, member, fset, _unit(1, 0, 0), _unit(0, 1, 0), 4, exclude_cases=[])
            assert [h.case.id for h in hits] == [cases[1], cases[3], cases[2], cases[0]]
            assert [h.case.label for h in hits] == ["a", "a", "a", "b"]
            assert np.allclose([h.similarity for h in hits], [0.9, 0.7, 0.6, 0.5], atol=1e-6)
            assert boxes[cases[3]] == [4, 4, 9, 9] and boxes[cases[0]] == [0, 0, 4, 4]
            # typicality still reads the region's own similarities to the findings, best first
            assert np.allclose(sims, [1.0, 0.8, 0.6, 0.6, 0.0], atol=1e-6)
            # the excluded cases (the query's own patient) are never a hit, nor in the similarities
            hits, boxes, sims = search_findings(s, member, fset, _unit(1, 0, 0), _unit(0, 1, 0), 2,
                                                exclude_cases=[cases[1]])
            assert [h.case.id for h in hits] == [cases[3], cases[2]] and np.allclose(sims, [1.0, .6, .6, 0], atol=1e-6)
            # --where: hits only among the allowed cases
            hits, _, _ = search_findings(s, member, fset, _unit(1, 0, 0), _unit(0, 1, 0), 4, exclude_cases=[],
                                         allow_cases=[cases[0], cases[2]])
            assert [h.case.id for h in hits] == [cases[2], cases[0]]
    finally:
        cb.close()


def _brute_force(images, findings, cases, crop, whole, k, exclude=(), allow=None):
    best: dict = {}
    for c, box, v in findings:
        sim = float(v @ crop)
        if c not in best or sim > best[c][0]:
            best[c] = (sim, list(box))
    scored = [((sim + float(images[c] @ whole)) / 2, cases[c], box) for c, (sim, box) in best.items()
              if cases[c] not in set(exclude) and (allow is None or cases[c] in set(allow))]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return scored[:k]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fused_ranking_equals_an_exact_scan_on_random_vectors(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n, dim = 300, 16
    images = rng.standard_normal((n, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    findings = []
    for c in range(n):
        if c % 7 == 0:
            continue  # a case without findings is never a region query's hit
        for j in range(1 + c % 3):
            v = rng.standard_normal(dim).astype(np.float32)
            findings.append((c, (j, j, j + 3, j + 3), v / np.linalg.norm(v)))
    cb, member, fset, cases = _store(tmp_path, images, findings, ["a"] * n)
    try:
        with cb.read() as s:
            for q in range(8):
                crop, whole = rng.standard_normal((2, dim)).astype(np.float32)
                crop, whole = crop / np.linalg.norm(crop), whole / np.linalg.norm(whole)
                exclude = [cases[q], cases[q + 10]]
                allow = None if q % 2 else sorted(rng.choice(cases, size=120, replace=False).tolist())
                hits, boxes, _ = search_findings(s, member, fset, crop, whole, 5, exclude, allow)
                want = _brute_force(images, findings, cases, crop, whole, 5, exclude, allow)
                assert [h.case.id for h in hits] == [c for _, c, _ in want]
                assert np.allclose([h.similarity for h in hits], [v for v, _, _ in want], atol=1e-5)
                assert [boxes[h.case.id] for h in hits] == [b for _, _, b in want]
    finally:
        cb.close()
