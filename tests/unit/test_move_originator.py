"""C-STORE sub-operations of a C-MOVE this archive asked for (Move Originator: our AE title)
bring only the studies being retrieved from that site; anything else is refused, whatever
the site's registration would let it store unasked."""

from __future__ import annotations

import threading

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from imageshare.domain.actors import cli_actor
from imageshare.storage.index.schema import studies
from tests.factory import ct_series
from tests.listener import listening


def _send(port: int, path, originator: str | None) -> int:
    ae = AE(ae_title="SITE")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    assert assoc.is_established
    try:
        kwargs = {"originator_aet": originator, "originator_id": 7} if originator else {}
        status = assoc.send_c_store(dcmread(path), **kwargs)
        return int(status.Status)
    finally:
        assoc.release()


def _stored(archive) -> set[str]:
    with archive.engine.connect() as conn:
        return set(conn.execute(select(studies.c.study_uid)).scalars())


def test_a_site_answering_our_move_may_send_only_the_studies_we_asked_for(
        archive, tmp_path, monkeypatch):
    asked = ct_series(tmp_path / "asked", count=1, patient_id="P-ASKED")[0]
    other = ct_series(tmp_path / "other", count=1, patient_id="P-OTHER")[0]
    pushed = ct_series(tmp_path / "pushed", count=1, patient_id="P-PUSHED")[0]
    asked_uid = str(dcmread(asked).StudyInstanceUID)
    with listening(archive, "SITE") as served:
        served.retrievals = archive.exchange.retrieving_from
        # A retrieval of one study from the site is under way: its C-MOVE waits here.
        moving, done = threading.Event(), threading.Event()

        def waiting_move(*_args: object) -> None:
            moving.set()
            done.wait(30)

        monkeypatch.setattr(archive.exchange, "_run_retrieve", waiting_move)
        archive.exchange.retrieve("SITE", asked_uid, cli_actor())
        assert moving.wait(10), "the retrieval job never started"
        assert archive.exchange.retrieving_from("SITE") == {asked_uid}
        assert _send(served.port, asked, "IMAGESHARE") == 0x0000
        assert _send(served.port, other, "IMAGESHARE") == 0xA900
        # A C-MOVE someone else asked for, or a plain push: the registration decides.
        assert _send(served.port, pushed, "WORKSTATION") == 0x0000
        done.set()
    assert _stored(archive) == {asked_uid, str(dcmread(pushed).StudyInstanceUID)}
    [refusal] = [e for e in archive.audit.events("instance.store")
                 if e["outcome"] != "success"]
    assert "none of the studies this archive asked" in refusal["detail"]["reason"]


def test_under_our_move_nothing_arrives_when_no_retrieval_is_under_way(archive, tmp_path):
    path = ct_series(tmp_path / "late", count=1, patient_id="P-LATE")[0]
    with listening(archive, "SITE") as served:
        served.retrievals = archive.exchange.retrieving_from
        assert _send(served.port, path, "IMAGESHARE") == 0xA900
    assert _stored(archive) == set()
