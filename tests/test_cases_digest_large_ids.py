"""The calibration's digest of the active cases holds for any case id a database can hold.

It sums the ids and their squares. On PostgreSQL ``id * id`` of two 32-bit ids overflowed past
id 46,340 ("integer out of range": a case base of 46k+ cases could not calibrate, so neither
import nor query); SQLite's 64-bit sum overflows once the squares pass 9.2e18 (about 3M cases).
"""

import pytest
from sqlalchemy import select

from cbr.store.member import active_digest as cases_digest
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Embedding, Model

pytestmark = pytest.mark.postgres

LARGE = (46_341, 2_100_000_000, 2_100_000_001, 2_100_000_002)  # squares past 2^31; their sum past 2^63


def test_the_digest_of_cases_with_large_ids(indexed):
    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
        some = s.scalars(select(Embedding).where(Embedding.model_id == model_id)).first()
        vector, template = some.vector, s.get(Case, some.case_id)
        label = template.label
    before = cases_digest(cb, model_id)
    with cb.write() as s:
        for i in LARGE:
            s.add(Case(id=i, sha256=f"{i:064x}", path=f"big/{i}.png", label=label, meta={}))
            s.flush()
            s.add(Embedding(case_id=i, model_id=model_id, vector=vector))
    after = cases_digest(cb, model_id)
    assert after != before
    n = int(before.split(":")[0])
    assert int(after.split(":")[0]) == n + len(LARGE)
    assert int(after.split(":")[1]) == int(before.split(":")[1]) + sum(LARGE)
