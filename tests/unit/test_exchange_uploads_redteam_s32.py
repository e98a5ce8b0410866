"""Red team, session 32: a hostile or broken partner site and a hostile uploader.

The partner is a real HTTP server on loopback (``Hostile`` below) that answers DICOMweb
requests the way a broken or hostile site might: redirects to an internal address, endless or
trickling answers, search answers that are not DICOM JSON, instances of another study than the
one asked for, and files that claim to be DICOM but are not."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, Sequence, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from imageshare.access.policy import INBOX
from imageshare.dicom.dicomweb_site import DicomwebSites
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError, InvalidQuery, SiteUnreachable
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.site_api import SiteApi
from imageshare.exchange.sites import RetrieveProgress
from imageshare.jobs import Job, JobQueue
from imageshare.storage.index.schema import (
    audit_events,
    instances,
    patient_changes,
    patients,
    studies,
    upload_invitations,
)
from imageshare.web.server import create_app
from tests.conftest import ADMIN_PASSWORD, make_archive, make_started_archive
from tests.factory import ct_series
from tests.mail import smtp_server
from tests.peers import free_port
from tests.unit.test_uploads import NHS, PASSWORD, STAFF, _invite, _open, _send, _tus_upload

Answer = Callable[[BaseHTTPRequestHandler], None]


class Hostile:
    """A DICOMweb "site" on loopback whose answers the test chooses, path by path (the first
    route whose prefix the request path starts with); it records every request."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, str, Answer]] = []
        self.seen: list[tuple[str, str]] = []
        self.port = free_port()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _serve(self, method: str) -> None:
                hostile.seen.append((method, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                for route_method, prefix, answer in hostile.routes:
                    if route_method == method and self.path.startswith(prefix):
                        try:
                            answer(self)
                        except (BrokenPipeError, ConnectionResetError):
                            pass
                        return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self._serve("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"

    def on(self, method: str, prefix: str, answer: Answer) -> None:
        """Answer requests ``method`` to paths starting with ``prefix`` (under /dicomweb)."""
        self.routes.append((method, "/dicomweb" + prefix, answer))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    site = Hostile()
    yield site
    site.close()


@pytest.fixture
def internal() -> Iterator[Hostile]:
    """An address inside our network that a partner's redirect points at."""
    site = Hostile()
    site.on("GET", "", _json([]))
    site.on("POST", "", _json([]))
    yield site
    site.close()


def _json(body: object, status: int = 200) -> Answer:
    data = json.dumps(body).encode()

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return answer


def _redirect(to: str, status: int = 302) -> Answer:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return answer


def _multipart(*parts: bytes) -> Answer:
    boundary = "hostile-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part
        + b"\r\n" for part in parts) + b"--" + boundary.encode() + b"--\r\n"

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type",
                      f'multipart/related; type="application/dicom"; boundary={boundary}')
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


def _node(site: Hostile, ae: str = "PARTNER") -> Node:
    return Node(ae, "127.0.0.1", 104, display_name="Partner Hospital",
                dicomweb_url=site.url, dicomweb_auth="Bearer partner-token")


def _listing(*entries: tuple[str, str]) -> list[dict[str, object]]:
    return [{"0020000E": {"vr": "UI", "Value": [series_uid]},
             "00080018": {"vr": "UI", "Value": [sop_uid]}} for series_uid, sop_uid in entries]


class _Kept:
    """A store that keeps what it is given (the archive's ingest pipeline stands here)."""

    def __init__(self) -> None:
        self.kept: list[bytes] = []

    def __call__(self, stream: io.BytesIO) -> object:
        self.kept.append(stream.read())
        return None


# -- redirects --------------------------------------------------------------------------------


def test_a_search_redirected_to_an_internal_address_is_refused_not_followed(hostile, internal):
    hostile.on("GET", "/studies", _redirect(f"http://127.0.0.1:{internal.port}/admin/secret"))
    sites = DicomwebSites(_Kept())
    with pytest.raises(SiteUnreachable, match="redirect"):
        sites.find_studies(_node(hostile), {"PatientID": "9434765919"}, 5)
    with pytest.raises(SiteUnreachable, match="redirect"):
        sites.check(_node(hostile), 5)
    assert internal.seen == []


def test_a_store_redirected_elsewhere_does_not_send_the_images_there(hostile, internal,
                                                                     tmp_path):
    hostile.on("POST", "/studies", _redirect(f"http://127.0.0.1:{internal.port}/collect", 307))
    files = ct_series(tmp_path / "out", 2)
    with pytest.raises(SiteUnreachable, match="redirect"):
        DicomwebSites(_Kept()).send(_node(hostile), files, lambda _p: None)
    assert internal.seen == []
    assert len([s for s in hostile.seen if s[0] == "POST"]) == 1  # stopped at the first


# -- endless, huge and slow answers ------------------------------------------------------------


def _endless(limit: int = 64 << 20, pause: float = 0.0, first: bytes = b"[") -> Answer:
    """A chunked answer that goes on (up to ``limit`` bytes, so that an old client ends)."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        chunk = first + b" " * (64 << 10)
        started = time.monotonic()
        while sent < limit and time.monotonic() - started < 40:
            piece = chunk if not pause else b" "
            h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.flush()
            sent += len(piece)
            if pause:
                time.sleep(pause)
        h.wfile.write(b"0\r\n\r\n")

    return answer


def test_an_endless_search_answer_is_cut_at_the_limit(hostile):
    hostile.on("GET", "/studies", _endless())
    sites = DicomwebSites(_Kept(), search_max_bytes=1 << 20)
    with pytest.raises(SiteUnreachable, match="more than 1 MB"):
        sites.find_studies(_node(hostile), {"PatientID": "9434765919"}, 10)


def test_a_declared_huge_answer_is_not_read(hostile):
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(50 << 30))
        h.end_headers()
        h.wfile.write(b"[]")

    hostile.on("GET", "/studies", answer)
    with pytest.raises(SiteUnreachable, match="more than"):
        DicomwebSites(_Kept()).find_studies(_node(hostile), {"PatientID": "9434765919"}, 5)


def test_a_trickling_answer_ends_at_the_timeout_not_never(hostile):
    hostile.on("GET", "/studies", _endless(pause=0.3))
    started = time.monotonic()
    with pytest.raises(SiteUnreachable, match="too long"):
        DicomwebSites(_Kept()).find_studies(_node(hostile), {"PatientID": "9434765919"}, 2)
    assert time.monotonic() - started < 8


def test_the_timeout_given_is_the_one_used(hostile):
    def silent(h: BaseHTTPRequestHandler) -> None:
        time.sleep(15)

    hostile.on("GET", "/studies", silent)
    started = time.monotonic()
    with pytest.raises(SiteUnreachable):
        DicomwebSites(_Kept()).find_studies(_node(hostile), {"PatientID": "9434765919"}, 1)
    assert time.monotonic() - started < 6  # not the library's own 20 s


# -- answers that are not what was asked -------------------------------------------------------


@pytest.mark.parametrize("answer", [[1, 2], "a list of studies", {"0020000D": 5},
                                    [{"0020000D": "1.2.3"}],
                                    [{"0020000D": {"vr": "UI", "Value": {"0": "1.2"}}}], None])
def test_a_search_answer_that_is_not_dicom_json_is_refused_with_a_reason(hostile, answer):
    """(None: a web page where DICOM JSON was asked for.)"""
    if answer is None:
        def page(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", "31")
            h.end_headers()
            h.wfile.write(b"<html><body>Login</body></html>")

        hostile.on("GET", "/studies", page)
    else:
        hostile.on("GET", "/studies", _json(answer))
    with pytest.raises(SiteUnreachable, match="not DICOM JSON"):
        DicomwebSites(_Kept()).find_studies(_node(hostile), {"PatientID": "9434765919"}, 5)


def test_an_instance_of_another_study_than_the_one_asked_for_is_not_stored(hostile, tmp_path):
    asked = generate_uid()
    (ours,) = ct_series(tmp_path / "a", 1, study_uid=asked)
    (other,) = ct_series(tmp_path / "b", 1, patient_id="OTHER1", patient_name="Other^Person")
    good, bad = dcmread(ours), dcmread(other)
    hostile.on("GET", f"/studies/{asked}/instances?",
               _json(_listing((good.SeriesInstanceUID, good.SOPInstanceUID),
                              (good.SeriesInstanceUID, bad.SOPInstanceUID))))
    hostile.on("GET", f"/studies/{asked}/series/{good.SeriesInstanceUID}/instances/"
               f"{good.SOPInstanceUID}", _multipart(ours.read_bytes()))
    hostile.on("GET", f"/studies/{asked}/series/{good.SeriesInstanceUID}/instances/"
               f"{bad.SOPInstanceUID}", _multipart(other.read_bytes()))
    kept = _Kept()
    result = DicomwebSites(kept).retrieve_study(_node(hostile), asked, lambda _p: None)
    assert (result.received, result.expected, result.failed) == (1, 2, 1)
    assert [dcmread(io.BytesIO(b)).SOPInstanceUID for b in kept.kept] == [good.SOPInstanceUID]
    assert any("not the instance asked for" in p for p in result.problems)


def test_a_part_that_is_not_dicom_fails_alone_and_the_rest_arrives(hostile, tmp_path):
    asked = generate_uid()
    first, second = ct_series(tmp_path / "a", 2, study_uid=asked)
    one, two = dcmread(first), dcmread(second)
    hostile.on("GET", f"/studies/{asked}/instances?",
               _json(_listing((one.SeriesInstanceUID, one.SOPInstanceUID),
                              (two.SeriesInstanceUID, two.SOPInstanceUID),
                              ("", ""))))
    hostile.on("GET", f"/studies/{asked}/series/{one.SeriesInstanceUID}/instances/"
               f"{one.SOPInstanceUID}", _multipart(b"%PDF-1.4 this is not DICOM at all" * 10))
    hostile.on("GET", f"/studies/{asked}/series/{two.SeriesInstanceUID}/instances/"
               f"{two.SOPInstanceUID}", _multipart(second.read_bytes()))
    kept = _Kept()
    result = DicomwebSites(kept).retrieve_study(_node(hostile), asked, lambda _p: None)
    assert (result.received, result.expected, result.failed) == (1, 3, 2)
    assert len(kept.kept) == 1


def test_a_retrieval_from_a_hostile_site_tells_its_starter_why_and_keeps_the_record_clean(
        archive, hostile, tmp_path):
    asked = generate_uid()
    (ours,) = ct_series(tmp_path / "a", 1, study_uid=asked, patient_id="9434765919")
    (other,) = ct_series(tmp_path / "b", 1, patient_id="OTHER1", patient_name="Other^Person")
    good, bad = dcmread(ours), dcmread(other)
    hostile.on("GET", f"/studies/{asked}/instances?",
               _json(_listing((good.SeriesInstanceUID, good.SOPInstanceUID),
                              (good.SeriesInstanceUID, bad.SOPInstanceUID))))
    hostile.on("GET", f"/studies/{asked}/series/{good.SeriesInstanceUID}/instances/"
               f"{good.SOPInstanceUID}", _multipart(ours.read_bytes()))
    hostile.on("GET", f"/studies/{asked}/series/{good.SeriesInstanceUID}/instances/"
               f"{bad.SOPInstanceUID}", _multipart(other.read_bytes()))
    archive.nodes.add(_node(hostile))
    actor = cli_actor()
    job = archive.exchange.retrieve("PARTNER", asked, actor)
    deadline = time.monotonic() + 60
    while archive.jobs.get(job.id, actor.name).state not in ("done", "failed") and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    finished = archive.jobs.get(job.id, actor.name)
    assert finished.state == "done", finished.error
    assert "1 failed" in finished.summary and "not the instance asked for" in finished.summary
    with archive.engine.connect() as conn:
        held = set(conn.execute(select(studies.c.study_uid)).scalars())
        events = conn.execute(select(audit_events.c.action, audit_events.c.outcome).where(
            audit_events.c.action == "exchange.retrieve")).all()
    assert asked in held and bad.StudyInstanceUID not in held
    assert events == [("exchange.retrieve", "warning")]


def test_retrieve_progress_keeps_older_callers_working():
    assert RetrieveProgress(1, 2).problems == ()


# -- uploads: accepting into the invited patient's record --------------------------------------


@pytest.fixture
def hospital(tmp_path) -> Iterator[tuple]:
    """An archive with a real SMTP server and its public URL, and a clerk (as the upload
    tests have it)."""
    with smtp_server() as (sink, port):
        archive = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                       public_url="https://images.hospital.example",
                                       upload_chunk_bytes=256 * 1024)
        archive.users.ensure_admin(ADMIN_PASSWORD)
        archive.users.add("clerk", PASSWORD, "radiographer")
        try:
            yield archive, sink
        finally:
            archive.close()


def _own_record(archive, tmp_path: Path, hospital_number: str = "H100") -> str:
    """The invited patient's record here: hospital number, NHS number, sex F. Its study UID."""
    (own,) = ct_series(tmp_path / f"own-{hospital_number}", 1, size=16,
                       patient_id=hospital_number, patient_name="Lovelace^Ada",
                       PatientBirthDate="19151210", PatientSex="F")
    ds = dcmread(own)
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = NHS, "NHS"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.save_as(own)
    archive.ingest.store_copy(own, STAFF)
    return str(ds.StudyInstanceUID)


def _upload_one(archive, path: Path, **invited: str) -> tuple:
    """An invitation (``invited`` overriding its fields) that sent the one file at ``path``,
    once checked: the invitation and its one study."""
    created: Any = _invite(archive, **invited)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, path, path.name)
        assert 'data-state="done"' in _send(client, created.path, csrf)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    [study] = archive.uploads.review.studies(invitation)
    return invitation, study


def _cd_slice(tmp_path: Path) -> Path:
    """A slice from another hospital's CD: the same person under that hospital's number."""
    (made,) = ct_series(tmp_path / "cd", 1, size=16, patient_id="OTHER-77",
                        patient_name="Lovelace^Ada", PatientBirthDate="19151210")
    return made


def test_accepting_an_upload_leaves_the_invited_patients_nhs_number_and_sex_as_they_are(
        hospital, tmp_path):
    """The invitation did not give the NHS number (nor the sex): filing the upload under the
    patient must not wipe what the record holds of them."""
    archive, _sink = hospital
    own_study = _own_record(archive, tmp_path)
    before = archive.catalogue.record(own_study).patient
    assert (before.nhs_number, before.sex) == (NHS, "F")
    invitation, study = _upload_one(archive, _cd_slice(tmp_path), nhs_number="")
    archive.uploads.review.accept(invitation, study.item.pk, STAFF)
    after = archive.catalogue.record(own_study).patient
    assert (after.patient_id, after.nhs_number, after.sex) == ("H100", NHS, "F")
    moved = archive.catalogue.record(study.item.study_uid).patient
    assert moved.pk == after.pk


def test_an_upload_is_not_filed_under_a_record_merged_away_since_the_invitation(
        hospital, tmp_path):
    """The invited hospital number was merged into another record after the invitation:
    accepting must not bring the merged-away record back (two records of one person)."""
    archive, _sink = hospital
    own_study = _own_record(archive, tmp_path)
    invitation, study = _upload_one(archive, _cd_slice(tmp_path))
    kept_study = _own_record(archive, tmp_path, "H200")
    archive.corrections.merge(own_study, "H200", "", "duplicate record", STAFF)
    with pytest.raises(ImageShareError, match="merged into hospital number H200"):
        archive.uploads.review.accept(invitation, study.item.pk, STAFF)
    with archive.engine.connect() as conn:
        numbers = set(conn.execute(select(patients.c.patient_id)).scalars())
    assert "H100" not in numbers
    assert archive.catalogue.record(kept_study).patient.patient_id == "H200"
    assert archive.inbox.item(study.item.pk).status == "pending"


def test_an_upload_accepted_twice_at_once_is_filed_once(hospital, tmp_path):
    """Two reviewers press Accept at the same moment: one wins, the other is told it was
    decided already, and the patient's details change (and are audited) once."""
    archive, _sink = hospital
    _own_record(archive, tmp_path)
    invitation, study = _upload_one(archive, _cd_slice(tmp_path))
    outcomes: list[str] = []
    gate = threading.Barrier(2)

    def accept() -> None:
        gate.wait()
        try:
            outcomes.append(archive.uploads.review.accept(invitation, study.item.pk, STAFF))
        except ImageShareError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=accept) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == 2
    assert sum(o.startswith("refused: ") for o in outcomes) == 1, outcomes
    assert any("decided already" in o for o in outcomes), outcomes
    with archive.engine.connect() as conn:
        changes = set(conn.execute(select(patient_changes.c.change_id).where(
            patient_changes.c.study_uid == study.item.study_uid)).scalars())
        accepted = conn.execute(select(audit_events.c.action).where(
            audit_events.c.action.in_(["upload.accept", "inbox.accept"]))).scalars().all()
    assert len(changes) == 1
    assert sorted(accepted) == ["inbox.accept", "upload.accept"]


def _retrieved(archive, job, actor) -> Job:
    deadline = time.monotonic() + 60
    while archive.jobs.get(job.id, actor.name).state not in ("done", "failed") and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    return archive.jobs.get(job.id, actor.name)


def test_a_retrieval_never_turns_an_instance_of_the_record_into_a_temporary_copy(
        tmp_path, hostile):
    """With overwrite on, a partner's different version of an instance we hold replaced it;
    the retrieval then marked what it received as a temporary copy, which expires: the
    record's own instance would have gone with it."""
    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        (ours,) = ct_series(tmp_path / "ours", 1, patient_id="9434765919")
        archive.ingest.store_copy(ours, STAFF)
        ds = dcmread(ours)
        ds.StudyDescription = "Their version"
        theirs = tmp_path / "theirs.dcm"
        ds.save_as(theirs)
        study_uid, series_uid, sop_uid = (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                          ds.SOPInstanceUID)
        hostile.on("GET", f"/studies/{study_uid}/instances?",
                   _json(_listing((series_uid, sop_uid))))
        hostile.on("GET", f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                   _multipart(theirs.read_bytes()))
        archive.nodes.add(_node(hostile))
        actor = cli_actor()
        finished = _retrieved(archive, archive.exchange.retrieve("PARTNER", study_uid, actor),
                              actor)
        assert finished.state == "done", finished.error
        with archive.engine.connect() as conn:
            kept = conn.execute(select(instances.c.retention_class).where(
                instances.c.sop_uid == sop_uid)).scalar()
        assert kept == "clinical"
    finally:
        archive.close()


@pytest.mark.parametrize("study_uid", ["1.2/../../admin", "1.2.3?PatientID=*", "1..2", "",
                                       "1" * 65])
def test_a_retrieval_of_something_that_is_no_uid_is_refused_before_the_site_is_asked(
        archive, hostile, study_uid):
    archive.nodes.add(_node(hostile))
    with pytest.raises(InvalidQuery, match="not a valid UID"):
        archive.exchange.retrieve("PARTNER", study_uid, cli_actor())
    assert hostile.seen == []


# -- the site API (announcements, receipts, requests for prior imaging) -----------------------


def _api(site: Hostile, method: str, path: str, answer: Answer) -> None:
    site.routes.append((method, path, answer))


def test_an_endless_answer_to_a_site_message_is_cut_not_read_into_memory(hostile):
    _api(hostile, "POST", "/api/exchange/receipts", _endless(limit=256 << 20))
    site_api = SiteApi(NodeRegistry.__new__(NodeRegistry), cast(JobQueue, _NoJobs()))
    started = time.monotonic()
    with pytest.raises(SiteUnreachable, match="far more than"):
        site_api.post(_node(hostile), "/api/exchange/receipts", {"outcome": "accepted"})
    assert time.monotonic() - started < 5


def test_a_redirected_site_message_is_not_followed(hostile, internal):
    _api(hostile, "POST", "/api/exchange/receipts",
         _redirect(f"http://127.0.0.1:{internal.port}/collect", 307))
    site_api = SiteApi(NodeRegistry.__new__(NodeRegistry), cast(JobQueue, _NoJobs()))
    answer = site_api.post(_node(hostile), "/api/exchange/receipts", {"outcome": "accepted"})
    assert answer.status_code == 307 and internal.seen == []


@pytest.mark.parametrize("said", [[1, 2], {"id": ["x"] * 3}, {"id": "<script>" * 10}, "text"])
def test_a_request_for_prior_imaging_survives_a_strange_answer(archive, hostile, said):
    _api(hostile, "POST", "/api/exchange/requests/incoming", _json(said, 201))
    archive.nodes.add(_node(hostile))
    made = archive.requests.send("PARTNER", cli_actor(), "clinic on Monday",
                                 nhs_number="9434765919")
    assert made.state == "sent" and made.remote_id == ""


class _NoJobs:
    """A job queue that takes no work (the messages here are posted at once)."""

    def register(self, kind: str, handler: object) -> None:
        return


def test_a_rejection_after_the_link_expired_asks_for_images_through_a_link_that_works(
        hospital, tmp_path):
    """The hospital rejects an upload after the invitation's end date: the e-mail asks for
    new images, so the link must work again for a while (and say until when), not be a
    dead link with a date in the past."""
    archive, sink = hospital
    invitation, study = _upload_one(archive, _cd_slice(tmp_path))
    with archive.engine.begin() as conn:
        conn.execute(update(upload_invitations).where(
            upload_invitations.c.pk == invitation.pk).values(
            expires_at=datetime.now(UTC) - timedelta(days=1)))
    expired = archive.uploads.invitations.by_public_id(invitation.public_id)
    archive.uploads.review.reject(expired, study.item.pk, STAFF, "Please send the 2024 CD")
    reopened = archive.uploads.invitations.by_public_id(invitation.public_id)
    assert reopened.state == "open"
    assert reopened.expires_at.replace(tzinfo=UTC) > datetime.now(UTC) + timedelta(days=6)
    sink.wait_for("ada@home.example", 2)  # the invitation, then the request for new images
    [asked] = [b for b in sink.bodies("ada@home.example") if "2024 CD" in b]
    assert f"{reopened.expires_at:%d %B %Y}" in asked


def test_parts_with_a_wrong_boundary_or_cut_off_fail_one_by_one(hostile, tmp_path):
    asked = generate_uid()
    made = ct_series(tmp_path / "a", 3, study_uid=asked)
    sets = [dcmread(p) for p in made]
    hostile.on("GET", f"/studies/{asked}/instances?",
               _json(_listing(*[(d.SeriesInstanceUID, d.SOPInstanceUID) for d in sets])))

    def wrong_boundary(h: BaseHTTPRequestHandler) -> None:
        body = (b"--other\r\nContent-Type: application/dicom\r\n\r\n" + made[0].read_bytes()
                + b"\r\n--other--\r\n")
        h.send_response(200)
        h.send_header("Content-Type",
                      'multipart/related; type="application/dicom"; boundary=declared')
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    base = f"/studies/{asked}/series/{sets[0].SeriesInstanceUID}/instances/"
    hostile.on("GET", base + sets[0].SOPInstanceUID, wrong_boundary)
    hostile.on("GET", base + sets[1].SOPInstanceUID, _multipart(made[1].read_bytes()[:700]))
    hostile.on("GET", base + sets[2].SOPInstanceUID, _multipart(made[2].read_bytes()))
    kept = _Kept()
    result = DicomwebSites(kept).retrieve_study(_node(hostile), asked, lambda _p: None)
    assert (result.received, result.expected, result.failed) == (1, 3, 2)


def test_a_received_study_accepted_twice_at_once_is_reconciled_once(archive, tmp_path):
    """Two people accept the same inbox item at the same moment: one wins; the patient's
    details are changed (and audited) once, by the winner."""
    local = Actor("user", "clerk", "radiographer", "127.0.0.1")
    _own_record(archive, tmp_path)  # H100, NHS number 9434765919
    district = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))
    sent = ct_series(tmp_path / "sent", 2, size=16, patient_id=NHS,
                     patient_name="Lovelace^Ada", PatientBirthDate="19151210")
    for path in sent:
        archive.ingest.store_copy(path, district)
    (item,) = archive.inbox.items()
    outcomes: list[str] = []
    gate = threading.Barrier(2)

    def accept() -> None:
        gate.wait()
        try:
            outcomes.append(archive.inbox.accept(item.pk, local))
        except ImageShareError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=accept) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o.startswith("refused: ") for o in outcomes) == [False, True], outcomes
    assert "reconciled to hospital number H100" in next(
        o for o in outcomes if not o.startswith("refused"))
    with archive.engine.connect() as conn:
        changes = set(conn.execute(select(patient_changes.c.change_id).where(
            patient_changes.c.study_uid == item.study_uid)).scalars())
    assert len(changes) == 1
    assert archive.catalogue.record(item.study_uid).patient.patient_id == "H100"


def test_a_compressed_answer_counts_by_what_it_expands_to(hostile):
    """A gzip bomb: 100 MB of JSON in a few hundred kB on the wire."""
    bomb = gzip.compress(b"[" + b" " * (100 << 20) + b"]", compresslevel=9)

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(bomb)))
        h.end_headers()
        h.wfile.write(bomb)

    hostile.on("GET", "/studies", answer)
    sites = DicomwebSites(_Kept(), search_max_bytes=1 << 20)
    with pytest.raises(SiteUnreachable, match="more than 1 MB"):
        sites.find_studies(_node(hostile), {"PatientID": "9434765919"}, 10)


def test_an_invitation_whose_nhs_number_disagrees_with_the_record_is_not_filed_silently(
        hospital, tmp_path):
    archive, _sink = hospital
    own_study = _own_record(archive, tmp_path)
    invitation, study = _upload_one(archive, _cd_slice(tmp_path), nhs_number="4010232137")
    with pytest.raises(ImageShareError, match="another NHS number"):
        archive.uploads.review.accept(invitation, study.item.pk, STAFF, file_anyway=True)
    assert archive.catalogue.record(own_study).patient.nhs_number == NHS
    assert archive.inbox.item(study.item.pk).status == "pending"
