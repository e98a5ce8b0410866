"""Retention classes, legal holds and deletion by two administrators.

The central test steps a simulated clock (injected into the retention service, not patched
into the interpreter) over thirty years; at every step the retention job runs and two
administrators try to delete every study still kept, and what is left must be exactly what
its class (and any legal hold) still keeps: nothing goes early, nothing stays late.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from sqlalchemy import select

from imageshare.access.policy import INBOX
from imageshare.domain.actors import Actor
from imageshare.domain.errors import DeletionRefused, Forbidden
from imageshare.domain.retention import (
    InstanceFacts,
    RetentionPeriods,
    add_years,
    deletion_verdict,
)
from imageshare.sharing.cases import CaseItem
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import instances, studies
from tests.factory import ct_series

IG1 = Actor("user", "ig-lead", "admin", "10.0.0.1")
IG2 = Actor("user", "caldicott", "admin", "10.0.0.2")
CLERK = Actor("user", "clerk", "clinician", "10.0.0.3")


class SimulatedClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def governed(archive):
    for actor in (IG1, IG2):
        archive.users.add(actor.name, "long-enough-password", "admin")
    archive.users.add(CLERK.name, "long-enough-password", "clinician")
    clock = SimulatedClock(datetime.now(UTC))
    archive.deletion.clock = clock
    return archive, clock


def _store(archive, folder, actor, count=1, **dicom) -> str:
    paths = ct_series(folder, count, **dicom)
    uid = ""
    for path in paths:
        uid = archive.ingest.store_copy(path, actor).study_uid
    return uid


def _upload(archive, folder, actor, **dicom) -> str:
    """A patient's upload, waiting for review in the upload class (as the upload service
    stores it)."""
    [path] = ct_series(folder, 1, **dicom)
    with open(path, "rb") as stream:
        return archive.ingest.store_stream(stream, actor, review_site="portal").study_uid


def _present(archive) -> set[str]:
    with archive.engine.connect() as conn:
        return set(conn.execute(select(studies.c.study_uid)).scalars())


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _da(day: date) -> str:
    return day.strftime("%Y%m%d")


def test_over_thirty_simulated_years_nothing_is_deleted_before_its_class_allows(
        governed, tmp_path):
    archive, clock = governed
    service = archive.retention
    t0 = clock.now
    today = t0.date()
    modality = Actor("node", "US_ROOM", "node", "US_ROOM@10.0.0.5",
                     grants=frozenset({"dicom.store"}))
    other_site = Actor("node", "RETRIEVED", "node", "RETRIEVED@10.9.0.1",
                       grants=frozenset({"dicom.store"}))
    district = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))
    teaching_tool = Actor("node", "TEACHING", "node", "TEACHING@10.0.0.7",
                          grants=frozenset({"dicom.store"}))
    portal = Actor("node", "PORTAL", "node", "PORTAL@10.0.0.8",
                   grants=frozenset({"dicom.store"}))
    # The policy: classes by source (the retrieval cache, teaching copies, uploads).
    service.set_rule("source", "RETRIEVED", "temporary", IG1)
    service.set_rule("source", "TEACHING", "teaching", IG1)

    adult = _store(archive, tmp_path / "adult", modality, patient_id="ADULT",
                   PatientBirthDate="19700101", StudyDate=_da(today))
    child = _store(archive, tmp_path / "child", modality, patient_id="CHILD",
                   PatientBirthDate=_da(add_years(today, -2)), StudyDate=_da(today))
    baby = _store(archive, tmp_path / "baby", modality, patient_id="BABY",
                  PatientBirthDate=_da(today - timedelta(days=40)), StudyDate=_da(today))
    unknown_birth = _store(archive, tmp_path / "nobirth", modality, patient_id="NOBIRTH",
                           PatientBirthDate="", StudyDate=_da(today))
    # An old study of a patient with a recent one: kept as long as the recent one.
    old = _store(archive, tmp_path / "old", modality, patient_id="TWICE",
                 PatientBirthDate="19600101", StudyDate=_da(add_years(today, -12)))
    recent = _store(archive, tmp_path / "recent", modality, patient_id="TWICE",
                    PatientBirthDate="19600101", StudyDate=_da(today))
    on_hold = _store(archive, tmp_path / "held", modality, patient_id="LITIGANT",
                     PatientBirthDate="19800101", StudyDate=_da(today))
    temporary = _store(archive, tmp_path / "tmp", other_site, patient_id="VISITOR")
    held_copy = _store(archive, tmp_path / "tmp2", other_site, patient_id="VISITOR2")
    unaccepted = _store(archive, tmp_path / "inbox1", district, patient_id="SENT1")
    accepted = _store(archive, tmp_path / "inbox2", district, patient_id="SENT2",
                      PatientBirthDate="19900101", StudyDate=_da(today))
    teaching = _store(archive, tmp_path / "teach", teaching_tool, patient_id="ANON1")
    unreviewed = _upload(archive, tmp_path / "up1", portal, patient_id="UPLOADER1")
    reviewed = _upload(archive, tmp_path / "up2", portal, patient_id="UPLOADER2")

    [item] = [i for i in archive.inbox.items() if i.study_uid == accepted]
    archive.inbox.accept(item.pk, IG1)
    case = archive.cases.create(Actor("user", "educator", "educator", "x"), "Teaching case")
    archive.cases.add(case, IG1, CaseItem(teaching), None)
    child_hold = service.place_hold(IG1, "safeguarding review", patient_id="CHILD")
    study_hold = service.place_hold(IG2, "complaint under investigation", study_uid=on_hold)
    copy_hold = service.place_hold(IG1, "incident review", study_uid=held_copy)
    assert archive.retention.study_retention(adult).classes[0].retention_class == "clinical"

    days = RetentionPeriods().temporary_days
    arrived = _arrivals(archive)
    earliest = {
        adult: _midnight(add_years(today, 8)),
        child: _midnight(add_years(today, 23)),       # the 25th birthday is later
        baby: _midnight(add_years(today - timedelta(days=40), 25)),
        unknown_birth: _midnight(add_years(today, 25)),  # birth unknown: the longest
        old: _midnight(add_years(today, 8)),
        recent: _midnight(add_years(today, 8)),
        on_hold: _midnight(add_years(today, 8)),
        temporary: arrived[temporary] + timedelta(days=days),
        held_copy: arrived[held_copy] + timedelta(days=days),
        unaccepted: arrived[unaccepted] + timedelta(days=days),
        accepted: _midnight(add_years(today, 8)),
        teaching: None,     # until its case lets it go
        unreviewed: None,   # never before its review
        reviewed: None,     # set when reviewed
    }
    # Events of the thirty years: (moment, what happens).
    lift_copy = t0 + timedelta(days=400)
    review_at = t0 + timedelta(days=5)
    case_ends = add_years(today, 2)
    lift_study = _midnight(add_years(today, 10))
    lift_child = _midnight(add_years(today, 24))

    def expected_present(now: datetime) -> set[str]:
        keep = set()
        for uid, when in earliest.items():
            if uid == reviewed:
                when = review_at + timedelta(days=RetentionPeriods().upload_days)
            if uid == teaching:
                when = _midnight(case_ends) if now >= _midnight(case_ends) else None
            if uid == held_copy and when is not None:
                when = max(when, lift_copy)
            if uid == on_hold and when is not None:
                when = max(when, lift_study)
            if uid == child and when is not None:
                when = max(when, lift_child)
            if when is None or now < when:
                keep.add(uid)
        return keep

    moments = sorted({t0 + timedelta(days=d) for d in range(0, 120, 3)}
                     | {t0 + timedelta(days=d) for d in range(120, 366 * 30, 45)}
                     | {m + delta for m in [*(e for e in earliest.values() if e),
                                            lift_copy, lift_study, lift_child,
                                            _midnight(case_ends)]
                        for delta in (timedelta(seconds=-1), timedelta(0))})
    assert moments[-1] >= t0 + timedelta(days=365 * 30)
    refused_requests = deleted_by_two = 0
    was_reviewed = False
    for now in moments:
        clock.now = now
        if now >= review_at and not was_reviewed:
            assert service.mark_reviewed(reviewed, review_at) == 1
            was_reviewed = True
        if now >= _midnight(case_ends) and archive.cases.items(case):
            archive.cases.remove(case, CaseItem(teaching))
        for hold, lift_at in ((copy_hold, lift_copy), (study_hold, lift_study),
                              (child_hold, lift_child)):
            if now >= lift_at and service.hold(hold.public_id).in_force:
                service.lift_hold(hold.public_id, IG2, "matter closed")
        service.run(Actor("system", "retention", "system", "local"))
        for uid in sorted(_present(archive)):
            try:
                request = service.request_deletion(uid, IG1, "past its retention")
            except DeletionRefused:
                refused_requests += 1
                continue
            service.approve_deletion(request.public_id, IG2)
            deleted_by_two += 1
        assert _present(archive) == expected_present(now), now
    assert _present(archive) == {unreviewed}
    assert refused_requests > 1000 and deleted_by_two == 8  # the clinical studies
    deletions = list(archive.audit.events("study.delete", limit=10_000))
    assert {e["detail"]["way"] for e in deletions} == {"expiry", "approved"}


def test_the_rule_keeps_a_childs_images_until_the_25th_birthday_and_an_adults_eight_years():
    periods = RetentionPeriods()
    seen = datetime(2026, 3, 1, tzinfo=UTC)
    child = InstanceFacts("clinical", seen, last_study=seen.date(), birth_date=date(2020, 6, 1))
    adult = InstanceFacts("clinical", seen, last_study=seen.date(), birth_date=date(1950, 6, 1))
    assert not deletion_verdict(child, periods, datetime(2045, 5, 31, tzinfo=UTC),
                                "approved").allowed
    assert deletion_verdict(child, periods, datetime(2045, 6, 1, tzinfo=UTC),
                            "approved").allowed
    assert deletion_verdict(adult, periods, datetime(2034, 3, 1, tzinfo=UTC),
                            "approved").allowed
    longer = RetentionPeriods(clinical_years=10)
    assert not deletion_verdict(adult, longer, datetime(2034, 3, 1, tzinfo=UTC),
                                "approved").allowed
    never_by_job = deletion_verdict(adult, periods, datetime(2100, 1, 1, tzinfo=UTC), "expiry")
    assert not never_by_job.allowed and "never expire" in never_by_job.reason


def test_the_requester_cannot_approve_their_own_deletion(governed, tmp_path):
    archive, clock = governed
    uid = _store(archive, tmp_path / "s", Actor("system", "t", "admin", "t"),
                 patient_id="P1", PatientBirthDate="19500101")
    blob = _keys(archive)[0]
    archive.comments.add(uid, "P1", "Seen in clinic", CLERK)
    share = archive.shares.create(NewShare(uid), CLERK, None)
    clock.now = clock.now + timedelta(days=366 * 9)
    request = archive.retention.request_deletion(uid, IG1, "duplicate of another study")
    with pytest.raises(Forbidden):
        archive.retention.approve_deletion(request.public_id, IG1)
    with pytest.raises(Forbidden):
        archive.retention.approve_deletion(request.public_id, CLERK)
    assert uid in _present(archive)
    removed = archive.retention.approve_deletion(request.public_id, IG2)
    assert removed.instances == 1 and uid not in _present(archive)
    assert archive.retention.deletion_request(request.public_id).state == "deleted"
    assert _keys(archive) == [] and not archive.blobs.exists(blob)
    assert archive.comments.for_study(uid) == []
    assert archive.shares.items(archive.shares.by_public_id(share.public_id, "clerk")) == []
    [approve] = [e for e in archive.audit.events("deletion.approve")
                 if e["outcome"] == "success"]
    assert approve["actor"] == "user:caldicott" and approve["study_uid"] == uid


def _arrivals(archive) -> dict[str, datetime]:
    """The latest arrival of each study's instances."""
    from imageshare.storage.index.schema import series

    with archive.engine.connect() as conn:
        rows = conn.execute(select(studies.c.study_uid, instances.c.received_at)
                            .join(series, series.c.study_pk == studies.c.pk)
                            .join(instances, instances.c.series_pk == series.c.pk)).all()
    latest: dict[str, datetime] = {}
    for uid, at in rows:
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        latest[uid] = max(latest.get(uid, at), at)
    return latest


def _keys(archive) -> list[str]:
    with archive.engine.connect() as conn:
        return list(conn.execute(select(instances.c.blob_key)).scalars())


def test_a_legal_hold_stops_inbox_rejection_and_is_lifted_with_a_reason(governed, tmp_path):
    archive, _clock = governed
    district = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))
    uid = _store(archive, tmp_path / "i", district, patient_id="SENT9")
    hold = archive.retention.place_hold(IG1, "subject access request pending",
                                        patient_id="SENT9")
    assert [h.public_id for h in archive.retention.holds_on_study(uid)] == [hold.public_id]
    [item] = archive.inbox.items()
    with pytest.raises(DeletionRefused, match="legal hold"):
        archive.inbox.reject(item.pk, IG1, "wrong patient")
    assert uid in _present(archive)
    with pytest.raises(Forbidden):
        archive.retention.place_hold(CLERK, "no", study_uid=uid)
    archive.retention.lift_hold(hold.public_id, IG2, "request answered")
    archive.inbox.reject(item.pk, IG1, "wrong patient")
    assert uid not in _present(archive)
    actions = [e["action"] for e in archive.audit.events(limit=50)]
    assert "retention.hold.place" in actions and "retention.hold.lift" in actions


def test_policy_rules_give_arrivals_their_class_by_source_and_modality(governed, tmp_path):
    archive, _clock = governed
    archive.retention.set_rule("modality", "CT", "research", IG1)
    uid = _store(archive, tmp_path / "r", Actor("node", "CT1", "node", "CT1@h",
                                                 grants=frozenset({"dicom.store"})),
                 patient_id="R1")
    [shown] = archive.retention.study_retention(uid).classes
    assert shown.retention_class == "research" and shown.instances == 1
    archive.retention.set_rule("source", "CT1", "clinical", IG1)
    uid2 = _store(archive, tmp_path / "c", Actor("node", "CT1", "node", "CT1@h",
                                                  grants=frozenset({"dicom.store"})),
                  patient_id="R2")
    assert archive.retention.study_retention(uid2).classes[0].retention_class == "clinical"


def test_the_command_line_places_and_lifts_holds_and_needs_two_administrators_to_delete(
        governed, tmp_path, imageshare):
    archive, _clock = governed
    uid = _store(archive, tmp_path / "s", Actor("system", "t", "admin", "t"),
                 patient_id="CLI1", PatientBirthDate="19500101")
    data = archive.settings.data_dir
    env = {"IMAGESHARE_CLINICAL_RETENTION_YEARS": "0"}  # this site keeps adults' images 0 years
    placed = imageshare(data, "hold", "place", "--patient", "CLI1", "--reason", "litigation",
                        "--by", "ig-lead", **env)
    assert placed.returncode == 0, placed.stderr
    hold_id = placed.stdout.split()[2]
    not_admin = imageshare(data, "hold", "lift", hold_id, "--reason", "x", "--by", "clerk")
    assert not_admin.returncode == 2 and "only administrators" in not_admin.stderr
    refused = imageshare(data, "deletion", "request", uid, "--reason", "test study",
                         "--by", "ig-lead", **env)
    assert refused.returncode == 2 and "legal hold" in refused.stderr
    early = imageshare(data, "retention", "run", "--at", "2090-01-01T00:00:00", **env)
    assert early.returncode != 0 and "cannot be in the future" in early.stderr
    kept = imageshare(data, "retention", "run", **env)
    assert kept.stdout.startswith("0 instance(s)") and uid in _present(archive)
    assert imageshare(data, "hold", "lift", hold_id, "--reason", "settled",
                      "--by", "caldicott").returncode == 0
    assert "lifted by caldicott" in imageshare(data, "hold", "list", "--all").stdout
    asked = imageshare(data, "deletion", "request", uid, "--reason", "test study",
                       "--by", "ig-lead", **env)
    assert asked.returncode == 0, asked.stderr
    request_id = asked.stdout.split()[2].rstrip(":")
    same = imageshare(data, "deletion", "approve", request_id, "--by", "ig-lead", **env)
    assert same.returncode == 2 and "another administrator" in same.stderr
    assert uid in _present(archive)
    approved = imageshare(data, "deletion", "approve", request_id, "--by", "caldicott", **env)
    assert approved.returncode == 0 and "1 instance(s)" in approved.stdout
    assert uid not in _present(archive)
    assert "deleted" in imageshare(data, "deletion", "list").stdout


def test_the_retention_job_keeps_a_held_copy_and_deletes_an_expired_one_on_either_index(
        any_archive, tmp_path):
    archive = any_archive
    archive.users.add(IG1.name, "long-enough-password", "admin")
    clock = SimulatedClock(datetime.now(UTC))
    archive.deletion.clock = clock
    archive.retention.set_rule("source", "RETRIEVED", "temporary", IG1)
    site = Actor("node", "RETRIEVED", "node", "RETRIEVED@10.9.0.1",
                 grants=frozenset({"dicom.store"}))
    kept = _store(archive, tmp_path / "a", site, patient_id="T1")
    gone = _store(archive, tmp_path / "b", site, patient_id="T2")
    clinical = _store(archive, tmp_path / "c", Actor("system", "t", "admin", "t"),
                      patient_id="T3")
    archive.retention.place_hold(IG1, "incident", patient_id="T1")
    clock.now += timedelta(days=29)
    assert archive.retention.run(IG1).instances == 0
    clock.now += timedelta(days=2)
    removed = archive.retention.run(IG1)
    assert (removed.instances, removed.studies, removed.kept) == (1, [gone], 1)
    assert _present(archive) == {kept, clinical}
