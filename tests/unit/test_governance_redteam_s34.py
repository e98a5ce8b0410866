"""Red-team tests of governance (session 34): legal holds racing deletions, retention of
odd dates, rules that would expire the patient record, consent (dates, unidentified patients,
withdrawals before a correction), requests for prior imaging from other sites (patterns,
flooding, repeats, answers) and the audit of rule changes. Each test failed before its fix.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

import imageshare.archive.deletion as deletion_module
from imageshare.archive.corrections import PatientDetails
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import (
    ConsentMissing,
    ImageShareError,
    NotFound,
    TooManyRequests,
)
from imageshare.domain.retention import (
    InstanceFacts,
    RetentionPeriods,
    deletion_verdict,
    earliest_deletion,
)
from imageshare.exchange.nodes import Node
from imageshare.exchange.requests import MAX_PER_SITE_HOUR
from imageshare.storage.index.schema import audit_events, consents, imaging_requests, studies
from imageshare.web.pages.imaging_requests import _candidates
from imageshare.web.server import create_app
from tests.factory import ct_series

IG1 = Actor("user", "ig-lead", "admin", "10.0.0.1")
IG2 = Actor("user", "caldicott", "admin", "10.0.0.2")
DOCTOR = Actor("user", "doctor", "clinician", "10.0.0.3")
RETRIEVED = Actor("node", "RETRIEVED", "node", "RETRIEVED@10.9.0.1",
                  grants=frozenset({"dicom.store"}))
SITEB = Actor("user", "siteb", "site", "127.0.0.1")
JANE = PatientDetails("Doe^Jane", "REAL1", birth_date="19700101", sex="O")


class SimulatedClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _admins(archive) -> SimulatedClock:
    for actor in (IG1, IG2):
        archive.users.add(actor.name, "long-enough-password", "admin")
    archive.users.add(DOCTOR.name, "long-enough-password", "clinician")
    clock = SimulatedClock(datetime.now(UTC))
    archive.deletion.clock = clock
    return clock


def _store(archive, folder, actor, **dicom) -> str:
    [path] = ct_series(folder, 1, **dicom)
    return archive.ingest.store_copy(path, actor).study_uid


def _present(archive) -> set[str]:
    with archive.engine.connect() as conn:
        return set(conn.execute(select(studies.c.study_uid)).scalars())


def _audited(archive, action: str) -> list[tuple[str, dict]]:
    with archive.engine.connect() as conn:
        rows = conn.execute(select(audit_events.c.outcome, audit_events.c.detail).where(
            audit_events.c.action == action).order_by(audit_events.c.seq)).all()
    return [(r.outcome, json.loads(r.detail) if isinstance(r.detail, str) else r.detail)
            for r in rows]


# -- legal holds racing a deletion --------------------------------------------------------------


@pytest.mark.parametrize("covers", ["study", "patient"])
def test_a_hold_placed_while_the_retention_job_deletes_is_never_both_placed_and_lost(
        any_archive, tmp_path, monkeypatch, covers):
    """The job read the holds (none) and is about to delete; an administrator places a hold
    at that moment. The hold must wait for the deletion (and a study hold is then refused:
    the study is gone) or the deletion must see it: on either index the hold was placed at
    once, "in force", over images deleted a moment later."""
    archive = any_archive
    clock = _admins(archive)
    archive.retention.set_rule("source", "RETRIEVED", "temporary", IG1)
    uid = _store(archive, tmp_path / "a", RETRIEVED, patient_id="RACE1")
    _store(archive, tmp_path / "b", cli_actor(), patient_id="RACE1")  # the patient stays
    clock.now += timedelta(days=31)
    real = deletion_module.instance_facts
    read_holds = threading.Event()

    def slow_facts(conn, rows):
        facts = real(conn, rows)
        read_holds.set()
        time.sleep(1.5)  # the deletion is slow: the hold comes now
        return facts

    monkeypatch.setattr(deletion_module, "instance_facts", slow_facts)
    outcome: dict[str, object] = {}

    def job() -> None:
        outcome["removed"] = archive.retention.run(IG1).instances

    def hold() -> None:
        started = time.monotonic()
        try:
            where = {"study_uid": uid} if covers == "study" else {"patient_id": "RACE1"}
            outcome["hold"] = archive.retention.place_hold(IG2, "litigation", **where)
        except NotFound as exc:
            outcome["hold"] = exc
        outcome["waited"] = time.monotonic() - started

    runner = threading.Thread(target=job)
    runner.start()
    assert read_holds.wait(30)
    placer = threading.Thread(target=hold)
    placer.start()
    placer.join(60)
    runner.join(60)
    held = not isinstance(outcome["hold"], NotFound)
    if uid in _present(archive):
        assert held and outcome["removed"] == 0  # the deletion saw the hold
        return
    assert outcome["removed"] == 1
    assert outcome["waited"] > 1.0, "the hold was placed while the deletion was under way"
    if covers == "study":
        assert not held, "a hold was placed on a study deleted at the same moment"
    assert [h for h in archive.retention.holds() if h.study_uid == uid] == []


# -- retention rule: dates at the calendar's end ---------------------------------------------------


def test_a_birth_or_study_date_of_9999_keeps_the_study_and_breaks_nothing(archive, tmp_path):
    """A modality with a wrong clock (or a typist) writes 9999: the 25th birthday or the
    eighth year after it is past the calendar's end. The study page's retention panel, a
    deletion request and the rule itself failed with ValueError (a 500 on the study page)."""
    periods = RetentionPeriods()
    now = datetime.now(UTC)
    for facts in (
            InstanceFacts("clinical", now, birth_date=date(9999, 12, 31)),
            InstanceFacts("clinical", now, last_study=date(9999, 12, 31)),
            InstanceFacts("clinical", now, birth_date=date(9990, 2, 28))):
        assert earliest_deletion(facts, periods) is not None
        assert not deletion_verdict(facts, periods, now, "approved").allowed
    _admins(archive)
    uid = _store(archive, tmp_path / "a", cli_actor(), patient_id="FUT1",
                 PatientBirthDate="99991231", StudyDate="99991231")
    shown = archive.retention.study_retention(uid)
    assert not shown.deletable_now and shown.classes[0].retention_class == "clinical"
    with pytest.raises(ImageShareError, match="cannot be deleted"):
        archive.retention.request_deletion(uid, IG1, "tidy")


# -- retention rules that would expire the record ----------------------------------------------


def test_a_rule_cannot_make_a_source_or_modality_of_the_record_expire(archive, tmp_path):
    """Our CT scanner's images are the record: a rule giving its AE title (or modality CT) a
    temporary or research class made every later scan go after 30 days (or 1): refused, and
    the refusal audited; a new source that never sent to the record can still be given one."""
    _admins(archive)
    scanner = Actor("node", "CT1", "node", "CT1@10.1.1.1", grants=frozenset({"dicom.store"}))
    _store(archive, tmp_path / "a", scanner, patient_id="REC1")
    with pytest.raises(ImageShareError, match="patient record"):
        archive.retention.set_rule("source", "CT1", "temporary", IG1)
    with pytest.raises(ImageShareError, match="patient record"):
        archive.retention.set_rule("modality", "CT", "research", IG1)
    assert archive.retention.rules() == []
    assert archive.retention.class_for(source="CT1", modality="CT") == "clinical"
    assert [o for o, _d in _audited(archive, "retention.rule.set")] == ["failure", "failure"]
    archive.retention.set_rule("source", "RETRIEVED", "temporary", IG1)
    archive.retention.set_rule("source", "CT1", "clinical", IG1)


def test_a_rule_change_is_audited_with_the_class_before_and_after(archive):
    _admins(archive)
    archive.retention.set_rule("source", "RESEARCH_PACS", "research", IG1)
    archive.retention.set_rule("source", "RESEARCH_PACS", "teaching", IG1)
    archive.retention.remove_rule("source", "RESEARCH_PACS", IG1)
    [(_, first), (_, second)] = _audited(archive, "retention.rule.set")
    assert (first["before"], first["class"]) == ("clinical (no rule)", "research")
    assert (second["before"], second["class"]) == ("research", "teaching")
    [(_, removed)] = _audited(archive, "retention.rule.remove")
    assert removed["before"] == "teaching"


# -- consent --------------------------------------------------------------------------------------


def test_consent_dated_before_the_patients_birth_or_1900_is_refused(archive, tmp_path):
    uid = _store(archive, tmp_path / "a", cli_actor(), patient_id="CB1",
                 PatientBirthDate="20150601")
    with pytest.raises(ImageShareError, match="before the patient's date of birth"):
        archive.consents.record_decision(uid, "teaching", "granted", "2015-05-31", "form",
                                         DOCTOR)
    with pytest.raises(ImageShareError, match="before 1900"):
        archive.consents.record_decision(uid, "research", "granted", "0001-01-01", "form",
                                         DOCTOR)
    archive.consents.record_decision(uid, "teaching", "granted", "2015-06-01", "form", DOCTOR)
    assert archive.consents.in_force(uid)["research"] is None


def test_consent_of_a_patient_without_a_hospital_number_stands_for_nobody_else(
        archive, tmp_path):
    """An emergency scan with an empty Patient ID: a consent filed under the empty ID stood
    for every other unidentified patient (their identifiable teaching shares allowed)."""
    first = _store(archive, tmp_path / "a", cli_actor(), patient_id="", patient_name="")
    other = _store(archive, tmp_path / "b", cli_actor(), patient_id="",
                   patient_name="Unknown^Male")
    with pytest.raises(ImageShareError, match="no hospital number"):
        archive.consents.record_decision(first, "teaching", "granted", "2026-01-01", "form",
                                         DOCTOR)
    with archive.engine.begin() as conn:  # one recorded before this was refused
        conn.execute(insert(consents).values(
            patient_id="", issuer="", purpose="teaching", decision="granted",
            given_on="2026-01-01", source="form", note="", recorded_by="doctor",
            recorded_at=datetime.now(UTC)))
    assert archive.consents.in_force(other)["teaching"] is None
    with pytest.raises(ConsentMissing):
        archive.consents.require(other, "teaching", DOCTOR)


def test_a_withdrawal_recorded_before_a_merge_still_stops_identifiable_teaching_use(
        archive, tmp_path):
    """The patient withdrew on a study filed under a temporary number; the study is then
    merged into their record, where an older consent was granted: the older consent came
    back into force (identifiable teaching shares allowed again)."""
    _admins(archive)
    record = _store(archive, tmp_path / "a", cli_actor(), patient_id="REAL1",
                    patient_name="Doe^Jane")
    archive.consents.record_decision(record, "teaching", "granted", "2025-01-10", "form",
                                     DOCTOR)
    emergency = _store(archive, tmp_path / "b", cli_actor(), patient_id="TEMP77",
                       patient_name="Unknown^Female")
    archive.consents.record_decision(emergency, "teaching", "withdrawn", "2026-02-01",
                                     "verbal", DOCTOR)
    archive.corrections.correct_study(emergency, JANE, "merged into the patient's record", IG1)
    current = archive.consents.in_force(emergency)["teaching"]
    assert current is not None and current.decision == "withdrawn"
    with pytest.raises(ConsentMissing, match="withdrawn"):
        archive.consents.require(emergency, "teaching", DOCTOR)
    # The same person: their other studies are no longer taught from identifiably either.
    with pytest.raises(ConsentMissing, match="withdrawn"):
        archive.consents.require(record, "teaching", DOCTOR)
    # A grant given under the temporary number is not taken for the patient's own.
    other = _store(archive, tmp_path / "c", cli_actor(), patient_id="TEMP78")
    archive.consents.record_decision(other, "research", "granted", "2026-02-01", "form",
                                     DOCTOR)
    archive.corrections.correct_study(other, JANE, "merged into the patient's record", IG1)
    assert archive.consents.in_force(other)["research"] is None


def test_a_consent_record_is_audited_with_the_decision_it_replaces(archive, tmp_path):
    uid = _store(archive, tmp_path / "a", cli_actor(), patient_id="AUD1")
    archive.consents.record_decision(uid, "research", "granted", "2026-01-01", "form", DOCTOR)
    archive.consents.record_decision(uid, "research", "withdrawn", "2026-02-01", "form",
                                     DOCTOR)
    befores = [d["before"] for _o, d in _audited(archive, "consent.record")]
    assert befores == ["none recorded", "granted on 2026-01-01"]


# -- requests for prior imaging from other sites ----------------------------------------------


@pytest.fixture
def site(archive):
    archive.nodes.add(Node("SITEB", "127.0.0.1", 104, display_name="Hospital B", inbox=True))
    archive.users.add("siteb", "site-account-password", "site", site_node="siteb")
    return archive

def _request(site, public_id: str, **fields: str) -> None:
    """A request for imaging as stored (an incoming one from SITEB, open, unless ``fields``
    say otherwise), written straight into the index."""
    now = datetime.now(UTC)
    values = {"direction": "incoming", "site": "SITEB", "nhs_number": "",
              "hospital_number": "", "patient_name": "", "birth_date": "", "reason": "priors",
              "priority": "routine", "state": "open", "detail": "", "created_by": "them",
              **fields}
    with site.engine.begin() as conn:
        conn.execute(insert(imaging_requests).values(
            public_id=public_id, created_at=now, updated_at=now, **values))



@pytest.mark.parametrize("named", [
    {"hospital_number": "*"},
    {"hospital_number": "H1\\H2"},
    {"hospital_number": "H?"},
    {"patient_name": "SMITH*", "birth_date": "19800101"},
    {"patient_name": "*", "birth_date": "19800101"},
    {"nhs_number": "943476591*"},
    {"nhs_number": "1234567890"},
    {"patient_name": "Smith", "birth_date": "19801345"},
    {"patient_name": "Smith", "birth_date": "1980-01-01/1990-01-01"},
    {"patient_name": "Smith"},
    {},
])
def test_a_request_from_another_site_names_one_real_patient_or_is_refused(site, named):
    """A request naming a patient by a pattern listed every matching patient's studies to
    our staff (a wildcard hospital number: the whole archive) and invited sending another
    patient's images; one naming nobody, or a mistyped date, was filed as well."""
    with pytest.raises(ImageShareError):
        site.requests.receive(SITEB, {"reason": "priors", **named})
    assert site.requests.listed("incoming", cli_actor()) == []


def test_a_stored_pattern_request_lists_none_of_our_patients(site, tmp_path):
    for n in range(3):
        _store(site, tmp_path / str(n), cli_actor(), patient_id=f"H{n}",
               patient_name=f"Patient^Number{n}")
    _request(site, "old-star", hospital_number="*")  # filed before requests were checked
    wanted = site.requests.get("old-star")
    admin = Actor("user", "admin", "admin", "127.0.0.1")
    assert _candidates(site, wanted, admin) == []


def test_request_flooding_from_one_site_is_refused_and_audited(site):
    for n in range(MAX_PER_SITE_HOUR):
        site.requests.receive(SITEB, {"reason": "priors", "hospital_number": f"H{n}",
                                      "request_id": f"r{n}"})
    with pytest.raises(TooManyRequests):
        site.requests.receive(SITEB, {"reason": "priors", "hospital_number": "H999",
                                      "request_id": "r999"})
    assert len(site.requests.listed("incoming", cli_actor())) == MAX_PER_SITE_HOUR
    assert _audited(site, "exchange.request.receive")[-1][0] == "failure"


def test_the_same_request_sent_again_is_filed_once(site):
    body = {"reason": "priors", "nhs_number": "943 476 5919", "request_id": "theirs-1"}
    first = site.requests.receive(SITEB, body)
    again = site.requests.receive(SITEB, body)
    assert again.public_id == first.public_id and first.nhs_number == "9434765919"
    assert len(site.requests.listed("incoming", cli_actor())) == 1


def test_an_answer_does_not_overturn_the_answer_already_given(site):
    _request(site, "ask-b", direction="outgoing", hospital_number="H1", reason="r",
             state="sent", created_by="doctor")
    site.requests.record_answer(SITEB, {"request": "ask-b", "state": "declined",
                                        "detail": "no such patient"})
    again = site.requests.record_answer(SITEB, {"request": "ask-b", "state": "declined"})
    assert again.detail == "no such patient"  # a retry changes nothing
    with pytest.raises(ImageShareError, match="declined already"):
        site.requests.record_answer(SITEB, {"request": "ask-b", "state": "fulfilled",
                                            "detail": "sent after all"})
    assert site.requests.get("ask-b").state == "declined"


def test_two_people_answering_one_request_at_once_cannot_both(site, monkeypatch):
    """One colleague sends the studies (slow) while another declines: both went through,
    the site that asked was told "declined" and was sent the images all the same."""
    _request(site, "inc-1", nhs_number="9434765919")
    sends: list[str] = []

    class SlowTransfers:
        def send(self, study_uid, *_args, **_kwargs):
            time.sleep(1.0)
            sends.append(study_uid)
            return SimpleNamespace(public_id=f"t{len(sends)}")

    monkeypatch.setattr(site.requests, "_transfers", SlowTransfers())
    sender = threading.Thread(target=site.requests.fulfil,
                              args=("inc-1", ["1.2.3"], DOCTOR))
    sender.start()
    time.sleep(0.3)
    with pytest.raises(ImageShareError, match="already"):
        site.requests.decline("inc-1", "no such patient here", IG1)
    sender.join(30)
    answered = site.requests.get("inc-1")
    assert (answered.state, answered.answered_by, sends) == ("fulfilled", "doctor", ["1.2.3"])
    assert "t1" in answered.detail


def test_opening_a_request_from_another_site_is_audited_it_names_the_patient(site):
    site.users.add("doctor", "long-enough-password", "clinician")
    wanted = site.requests.receive(SITEB, {"reason": "priors", "nhs_number": "9434765919"})
    with TestClient(create_app(site)) as web:
        shown = web.get(f"/requests/{wanted.public_id}", headers={"Accept": "text/html"},
                        auth=("doctor", "long-enough-password"))
    assert shown.status_code == 200 and "priors" in shown.text
    reads = [d for _o, d in _audited(site, "exchange.request.read")]
    assert any(d.get("request") == wanted.public_id for d in reads)


def test_a_hold_lifted_by_two_administrators_at_once_is_lifted_once(archive, tmp_path,
                                                                    monkeypatch):
    """Both had read the hold in force; the second lift overwrote who lifted it and why,
    and the trail said it was lifted twice."""
    _admins(archive)
    uid = _store(archive, tmp_path / "a", cli_actor(), patient_id="LIFT1")
    placed = archive.retention.place_hold(IG1, "litigation", study_uid=uid)
    archive.retention.lift_hold(placed.public_id, IG1, "settled")
    monkeypatch.setattr(archive.retention, "hold", lambda _public_id: placed)  # a stale read
    with pytest.raises(ImageShareError, match="lifted already"):
        archive.retention.lift_hold(placed.public_id, IG2, "withdrawn by the court")
    monkeypatch.undo()
    lifted = archive.retention.hold(placed.public_id)
    assert (lifted.lifted_by, lifted.lift_reason) == ("ig-lead", "settled")
    assert len(_audited(archive, "retention.hold.lift")) == 1


def test_an_answer_sends_only_studies_of_the_patient_the_request_names(site, tmp_path,
                                                                      monkeypatch):
    """A request names our H100; a study of H200 chosen by mistake (or on purpose, over the
    API) is refused and nothing is sent, while H100's own study goes."""
    from fastapi.testclient import TestClient

    from imageshare.domain.actors import cli_actor
    from imageshare.web.server import create_app
    from tests.factory import ct_series

    ours = site.ingest.store_copy(ct_series(tmp_path / "a", 1, patient_id="H100")[0],
                                  cli_actor()).study_uid
    other = site.ingest.store_copy(ct_series(tmp_path / "b", 1, patient_id="H200")[0],
                                   cli_actor()).study_uid
    _request(site, "inc-9", hospital_number="H100")
    sends: list[str] = []

    class Recorded:
        def send(self, study_uid, *_args, **_kwargs):
            sends.append(study_uid)
            return SimpleNamespace(public_id=f"t{len(sends)}", state="queued")

    monkeypatch.setattr(site.requests, "_transfers", Recorded())
    site.users.add("doc", "a-long-password", "clinician")
    with TestClient(create_app(site)) as client:
        refused = client.post("/api/exchange/requests/inc-9/fulfil",
                              json={"study_uids": [other]},
                              auth=("doc", "a-long-password"))
        assert refused.status_code == 400 and "patient the request names" in refused.text
        assert sends == [] and site.requests.get("inc-9").state == "open"
    with pytest.raises(ImageShareError, match="patient the request names"):
        site.requests.fulfil("inc-9", [ours, other], DOCTOR, of_patient=[ours])
    assert sends == []
    site.requests.fulfil("inc-9", [ours], DOCTOR, of_patient=[ours])
    assert sends == [ours]
