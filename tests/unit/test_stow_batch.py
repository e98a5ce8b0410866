"""STOW-RS stores the parts of a request as one batch: what the sender and the archive see.

One transaction indexes the request's parts (a failing part alone rolled back) and one write
audits them; a bad part is refused with its reason and changes nothing else; an acknowledged
part is indexed and readable; a failure of the whole commit leaves nothing of the request
behind.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

import imageshare.archive.ingest as ingest_module
from imageshare.storage.index.schema import instances, series, studies
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart, parse_multipart

DICOM = "application/dicom"


def _post(client, parts: list[bytes], study: str = ""):
    body, content_type = encode_multipart(parts)
    return client.post(f"/dicomweb/studies{'/' + study if study else ''}", content=body,
                       headers={"Content-Type": content_type})


def _sop(data: bytes | Path) -> str:
    source = data if isinstance(data, Path) else io.BytesIO(data)
    return str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)


def _indexed(archive) -> dict[str, str]:
    with archive.engine.connect() as conn:
        return dict(conn.execute(select(instances.c.sop_uid, instances.c.blob_key)).all())


def _counts_agree(archive) -> bool:
    with archive.engine.connect() as conn:
        rows = conn.execute(
            select(studies.c.num_instances, func.count(instances.c.pk))
            .join(series, series.c.study_pk == studies.c.pk)
            .join(instances, instances.c.series_pk == series.c.pk)
            .group_by(studies.c.pk)).all()
    return all(counted == actual for counted, actual in rows)


def _nothing_left_over(archive) -> None:
    """No staging file, no partial blob, and no blob the index does not know."""
    assert not list(archive.settings.staging_dir.iterdir()), "staging left behind"
    assert not list((archive.blobs.root / ".tmp").iterdir()), "partial blob left behind"
    assert set(archive.blobs.keys()) == set(_indexed(archive).values()), "orphan blob"


def _wado(client, data: bytes) -> bytes:
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    response = client.get(
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
        f"{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    ((_headers, body),) = parse_multipart(response)
    return body


def test_an_acknowledged_request_has_every_part_indexed_readable_and_audited(
    client, archive, tmp_path
):
    files = ct_series(tmp_path / "ct", count=25, size=32, patient_id="BATCH1")
    parts = [p.read_bytes() for p in files]
    response = _post(client, parts)
    assert response.status_code == 200
    stored = response.json()["00081199"]["Value"]
    assert [s["00081155"]["Value"][0] for s in stored] == [_sop(p) for p in parts]
    assert set(_indexed(archive)) == {_sop(p) for p in parts}
    for part in parts:  # byte for byte what was sent
        assert hashlib.sha256(_wado(client, part)).digest() == hashlib.sha256(part).digest()
    events = list(archive.audit.events(action="instance.store", limit=100))
    assert sorted(e["detail"]["sop_instance_uid"] for e in events) == sorted(
        _sop(p) for p in parts)
    assert {(e["outcome"], e["actor"], e["instance_count"]) for e in events} == {
        ("success", "user:admin", 1)}
    assert _counts_agree(archive)
    _nothing_left_over(archive)


def test_a_bad_part_among_good_ones_is_refused_with_its_reason_and_the_others_are_stored(
    client, archive, tmp_path
):
    good = [p.read_bytes() for p in ct_series(tmp_path / "g", count=4, size=32,
                                               patient_id="BATCH2")]
    truncated = ct_series(tmp_path / "t", count=1, size=32, patient_id="BATCH2B")[0]
    bad = truncated.read_bytes()[:-200]
    response = _post(client, [good[0], good[1], bad, b"not dicom at all", good[2], good[3]])
    assert response.status_code == 202
    answer = response.json()
    assert [s["00081155"]["Value"][0] for s in answer["00081199"]["Value"]] == [
        _sop(p) for p in good]
    failed = answer["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    assert failed[0]["00081155"]["Value"] == [_sop(truncated)]
    assert "truncated" in failed[0]["00000902"]["Value"][0]
    # The good parts are kept whole; the bad ones left nothing (no row, no blob).
    assert set(_indexed(archive)) == {_sop(p) for p in good}
    for part in good:
        assert _wado(client, part) == part
    refused = list(archive.audit.events(action="instance.store", limit=100))
    assert sorted(e["outcome"] for e in refused) == ["refused"] * 2 + ["success"] * 4
    assert _counts_agree(archive)
    _nothing_left_over(archive)


def test_a_part_whose_index_step_fails_is_a_processing_failure_and_the_others_are_stored(
    client, archive, tmp_path, monkeypatch
):
    files = ct_series(tmp_path / "ct", count=5, size=32, patient_id="BATCH3")
    parts = [p.read_bytes() for p in files]
    doomed = _sop(parts[2])
    real_index = ingest_module.index_instance

    def index_failing_one(conn, header, *args, **kwargs):  # an error injected at the index step
        outcome = real_index(conn, header, *args, **kwargs)  # its rows are written ...
        if header.sop_instance_uid == doomed:
            raise RuntimeError("injected failure while indexing")  # ... then it fails
        return outcome

    monkeypatch.setattr(ingest_module, "index_instance", index_failing_one)
    response = _post(client, parts)
    assert response.status_code == 202
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 4
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0x0110]
    # Nothing of the failed part is half-indexed: its rows went with its savepoint, its blob
    # was removed, and the counts hold only the stored four.
    assert set(_indexed(archive)) == {_sop(p) for p in parts} - {doomed}
    assert _counts_agree(archive)
    monkeypatch.undo()
    for part in parts:
        if _sop(part) != doomed:
            assert _wado(client, part) == part
    _nothing_left_over(archive)
    failures = list(archive.audit.events(action="instance.store", limit=100))
    assert sorted(e["outcome"] for e in failures) == ["failure"] + ["success"] * 4


def test_a_request_whose_commit_fails_leaves_nothing_and_acknowledges_nothing(
    client, archive, tmp_path, monkeypatch
):
    before = ct_series(tmp_path / "before", count=2, size=32, patient_id="BATCH4")
    assert _post(client, [p.read_bytes() for p in before]).status_code == 200
    files = ct_series(tmp_path / "ct", count=6, size=32, patient_id="BATCH5")
    parts = [p.read_bytes() for p in files]
    real_record = archive.audit.record

    def audit_write_fails(event, conn=None):  # the batch's audit write fails in the transaction
        if conn is not None and isinstance(event, list) and len(event) == len(parts):
            raise RuntimeError("injected failure of the audit write")
        return real_record(event, conn)

    monkeypatch.setattr(archive.audit, "record", audit_write_fails)
    response = _post(client, parts)
    monkeypatch.undo()
    assert response.status_code == 409
    answer = response.json()
    assert "00081199" not in answer
    assert [f["00081197"]["Value"][0] for f in answer["00081198"]["Value"]] == [0x0110] * 6
    # The request before is intact; nothing of this one is indexed or stored.
    assert set(_indexed(archive)) == {_sop(p) for p in before}
    assert _counts_agree(archive)
    _nothing_left_over(archive)
    failures = [e for e in archive.audit.events(action="instance.store", limit=100)
                if e["outcome"] == "failure"]
    assert len(failures) == 6  # each part's failure is still audited, after the rollback


def test_a_request_stopped_after_some_parts_leaves_no_blob_of_them(client, archive, tmp_path):
    files = ct_series(tmp_path / "ct", count=3, size=32, patient_id="BATCH6")
    body, content_type = encode_multipart([p.read_bytes() for p in files])
    boundary = content_type.split("boundary=")[1]
    # Three complete parts (already moving into the store), then a part header that is too
    # long: the request is refused and what the three started is undone.
    body = body[: -len(f"--{boundary}--\r\n")] + (
        f"--{boundary}\r\nX-Long: {'x' * 9000}\r\n\r\n".encode() + b"rest")
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code in (400, 413)
    assert response.json()["detail"]
    assert _indexed(archive) == {}
    _nothing_left_over(archive)
    assert list(archive.blobs.keys()) == []


def test_stow_to_a_study_url_refuses_only_the_parts_of_other_studies(client, archive, tmp_path):
    mine = [p.read_bytes() for p in ct_series(tmp_path / "a", count=2, size=32,
                                               patient_id="BATCH7")]
    other = ct_series(tmp_path / "b", count=1, size=32, patient_id="BATCH8")[0].read_bytes()
    study = str(dcmread(io.BytesIO(mine[0])).StudyInstanceUID)
    response = _post(client, [mine[0], other, mine[1]], study=study)
    assert response.status_code == 202
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 2
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert set(_indexed(archive)) == {_sop(p) for p in mine}
    _nothing_left_over(archive)
