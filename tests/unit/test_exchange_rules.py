"""What lands in the inbox (and so expires unless accepted), and what does not."""

from __future__ import annotations

from sqlalchemy import select

from imageshare.access.policy import INBOX
from imageshare.domain.actors import Actor
from imageshare.storage.index.schema import inbox_items, instances
from tests.factory import ct_series


def classes(archive):
    with archive.engine.connect() as conn:
        return sorted(conn.execute(select(instances.c.retention_class)).scalars())


def test_only_other_hospitals_fill_the_inbox(archive, tmp_path):
    modality = Actor("node", "US_ROOM_1", "node", "US_ROOM_1@10.0.0.5",
                     grants=frozenset({"dicom.store"}))
    hospital = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))
    site_account = Actor("user", "site-b", "site", "10.2.0.1")
    service_account = Actor("user", "gateway", "service", "10.3.0.1")
    for n, actor in enumerate((modality, service_account, hospital, site_account)):
        for path in ct_series(tmp_path / str(n), 1, patient_id=f"P{n}"):
            archive.ingest.store_copy(path, actor)
    assert classes(archive) == ["clinical", "clinical", "inbox", "inbox"]
    with archive.engine.connect() as conn:
        sites = sorted(conn.execute(select(inbox_items.c.site)).scalars())
    assert sites == ["DISTRICT", "site-b"]
