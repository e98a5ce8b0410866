"""Red team of the audit trail (session 33): the chain checked on a live installation, the
ATNA codes each DICOM audit message must carry (PS3.15 A.5.3), spreadsheet-safe access
reports and exact detail lookups.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import event

from imageshare.audit.chain import verify_chain
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import cli_actor

ACTOR = cli_actor()


def test_verify_on_a_live_trail_does_not_call_a_write_during_the_walk_a_deletion(
        any_archive, tmp_path):
    """A row written (and a head signed) while `audit verify` walks the chain (a busy
    server, another instance) moves the head before verify reads it: that is not tampering,
    and the new row is checked too."""
    from imageshare.audit.chain import export_head, head_key

    archive = any_archive
    key, heads = head_key(b"installation key"), tmp_path / "heads.jsonl"
    archive.audit.record([AuditEvent(ACTOR, "audit.read", "success", detail={"n": i})
                          for i in range(5)])
    export_head(archive.engine, key, heads)
    written: list[bool] = []

    def write_meanwhile(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "audit_chain_head" in statement and statement.lstrip().upper().startswith(
                "SELECT") and not written:
            written.append(True)
            archive.audit.record(AuditEvent(ACTOR, "audit.read", "success",
                                            detail={"during": "verify"}))
            export_head(archive.engine, key, heads)

    event.listen(archive.engine, "before_cursor_execute", write_meanwhile)
    try:
        report = verify_chain(archive.engine, key, heads)
    finally:
        event.remove(archive.engine, "before_cursor_execute", write_meanwhile)
    assert written
    assert report.intact, [str(p) for p in report.problems]
    assert report.rows == report.head_seq == 6
    assert verify_chain(archive.engine, key, heads).heads_checked == 2


# PS3.15 A.5.3: the EventActionCode each audit message takes, one table per EventID.
A53_ACTION_CODES = {"110100": "E", "110101": "R", "110102": "E", "110103": "CRUD",
                    "110104": "CRU", "110105": "D", "110106": "R", "110107": "C",
                    "110109": "CRUD", "110110": "CRUD", "110112": "E", "110113": "E",
                    "110114": "E"}


def _row(action: str, **detail: object) -> dict:
    return {"seq": 9, "at": datetime(2026, 12, 3, 17, 0, tzinfo=UTC), "actor": "user:ig.lead",
            "actor_kind": "user", "source": "10.0.0.7", "action": action,
            "outcome": "success", "patient_id": "9434765919",
            "study_uid": "1.2.826.0.1.3680043.10.543.1", "instance_count": 2,
            "detail": json.dumps(detail)}


def test_every_audit_message_pairs_its_event_id_with_an_action_code_ps3_15_allows():
    """A repository counts a deletion by 110105 "DICOM Study Deleted" (always D); a security
    alert, a sign-in, a query or the beginning of a transfer is an execution (E)."""
    from lxml import etree

    from imageshare.audit.atna import audit_message
    from imageshare.audit.events import CATALOGUE
    from tests.unit.test_atna import CONFIG

    wrong = {}
    for action in CATALOGUE:
        ident = etree.fromstring(audit_message(_row(action), CONFIG)).find(
            "EventIdentification")
        event_id, code = ident.find("EventID").get("csd-code"), ident.get("EventActionCode")
        if code not in A53_ACTION_CODES[event_id]:
            wrong[action] = (event_id, code)
        if event_id in ("110113", "110114"):  # EventTypeCode mandatory (CID 401 / Login-out)
            types = [t.get("csd-code") for t in ident.iterfind("EventTypeCode")
                     if t.get("codeSystemName") == "DCM"]
            assert types and (event_id == "110113" or types[0] in ("110122", "110123")), \
                action
    assert not wrong, wrong


def test_one_deletion_is_one_study_deleted_message_and_a_request_is_none():
    """A deletion asked for, refused or withdrawn deleted nothing; an approval, an inbox
    rejection and an upload rejection each delete through instance.delete, which is the
    one "DICOM Study Deleted" (110105, D) of that deletion: a repository counting
    deletions saw three for one rejected upload."""
    from lxml import etree

    from imageshare.audit.atna import audit_message
    from tests.unit.test_atna import CONFIG

    def event_of(action: str) -> tuple[str, str]:
        ident = etree.fromstring(audit_message(_row(action, request="7"), CONFIG)).find(
            "EventIdentification")
        return ident.find("EventID").get("csd-code"), ident.get("EventActionCode")

    for action in ("deletion.request", "deletion.refuse", "deletion.approve",
                   "inbox.reject", "upload.reject"):
        assert event_of(action)[0] != "110105", action
    assert event_of("study.delete") == ("110105", "D")
    # Some instances deleted, the study staying: Instances Accessed, action D (A.5.3.6).
    assert event_of("instance.delete") == ("110103", "D")


def test_a_query_message_names_who_asked_and_who_answered_by_their_roles():
    """PS3.15 A.5.3.12: the process issuing the query carries RoleIDCode 110153 (Source),
    the one answering it 110152 (Destination); both are mandatory. The query itself is a
    system object (2) in the role of a report (3), identified by the SOP Class UID."""
    from lxml import etree

    from imageshare.audit.atna import audit_message
    from tests.unit.test_atna import CONFIG, audit_schema

    doc = etree.fromstring(audit_message(_row("study.query", level="STUDY",
                                              keys={"PatientID": "9434765919"}), CONFIG))
    assert audit_schema().validate(doc), str(audit_schema().error_log)
    roles = {p.get("UserIsRequestor"): p.find("RoleIDCode").get("csd-code")
             for p in doc.iterfind("ActiveParticipant") if p.find("RoleIDCode") is not None}
    assert roles == {"true": "110153", "false": "110152"}
    (query,) = doc.iterfind("ParticipantObjectIdentification")
    assert (query.get("ParticipantObjectTypeCode"), query.get("ParticipantObjectTypeCodeRole"),
            query.find("ParticipantObjectIDTypeCode").get("csd-code")) == ("2", "3", "110181")


def test_csv_reports_quote_every_cell_a_spreadsheet_would_run_as_a_formula():
    from imageshare.audit.reports import AccessReport, AccessRow, as_csv

    hostile = ["\t=cmd|' /C calc'!A0", "\r=1+1", " =HYPERLINK(\"http://x\")",
               "\uff1dHYPERLINK(\"http://x\")", "\n@SUM(1)"]
    rows = [AccessRow(datetime(2026, 12, 3, tzinfo=UTC), "user:a", "staff", "10.0.0.1",
                      "study.view", "", "success", cell, "1.2.3", 1) for cell in hostile]
    report = AccessReport("t", "s", None, None, rows)
    import csv
    import io

    cells = [r["patient"] for r in csv.DictReader(io.StringIO(as_csv(report).decode()))]
    assert cells == [f"'{c}" for c in hostile]


def test_a_patients_access_report_never_names_another_patient(archive, tmp_path):
    """A study filed under the wrong patient and then corrected: the report on the patient
    it was taken from no longer lists the new owner's accesses (nor their ID), and the
    report on its owner lists the earlier accesses without the other patient's ID."""
    from imageshare.audit.reports import patient_report
    from imageshare.domain.actors import SYSTEM
    from tests.factory import ct_series

    stored = archive.ingest.store_copy(ct_series(tmp_path / "s", 1, patient_id="OWNER1")[0],
                                       SYSTEM)
    study = stored.study_uid
    staff = ACTOR
    # Before the correction, the study was filed (and seen) under WRONG2.
    archive.audit.record(AuditEvent(staff, "study.view", "success", patient_id="WRONG2",
                                    study_uid=study))
    archive.audit.record(AuditEvent(staff, "study.view", "success", patient_id="OWNER1",
                                    study_uid=study, detail={"after": "correction"}))
    wrong = patient_report(archive.engine, "WRONG2")
    assert [r.patient_id for r in wrong.rows] == ["WRONG2"]
    assert all("OWNER1" not in v for r in wrong.rows for v in r.values())
    owner = patient_report(archive.engine, "OWNER1")
    named = [r.patient_id for r in owner.rows if r.action == "study.view"]
    assert len(named) == 2 and "OWNER1" in named  # the earlier view too, its record masked
    assert all("WRONG2" not in v for r in owner.rows for v in r.values())


def test_looking_events_up_by_a_detail_value_matches_it_exactly_not_as_a_pattern(archive):
    archive.audit.record([AuditEvent(ACTOR, "share.view", "success", detail={"share": s})
                          for s in ("ab_cd", "abXcd", "ab%", "abZZ")])
    assert [e["detail"]["share"] for e in archive.audit.events(
        detail=("share", "ab_cd"))] == ["ab_cd"]
    assert [e["detail"]["share"] for e in archive.audit.events(
        detail=("share", "ab%"))] == ["ab%"]


def test_a_nul_character_from_the_outside_cannot_make_the_audit_write_fail(postgres):
    """PostgreSQL refuses NUL in text: a user name sent as ``"admin\\x00"`` over HTTP Basic (or
    an AE title, a UID) made the audit write, and with it the request it records, fail.
    The trail keeps the value with the NUL shown as U+FFFD, and its chain verifies."""
    from imageshare.audit.trail import AuditTrail
    from imageshare.domain.actors import Actor
    from imageshare.storage.index.database import make_engine, migrate

    engine = make_engine(postgres.new_database())
    migrate(engine, upgrade=True)
    trail = AuditTrail(engine)
    trail.record(AuditEvent(Actor("anonymous", "admin\x00", source="10.0.0.9\x00",
                                  registered=False), "session.basic", "failure",
                            patient_id="P\x001", study_uid="1.2.3\x00",
                            detail={"route": "/dicomweb/studies\x00"}))
    (row,) = trail.events(action="session.basic")
    assert row["actor"] == "anonymous:admin\ufffd" and row["patient_id"] == "P\ufffd1"
    assert row["detail"]["route"] == "/dicomweb/studies\x00"
    assert verify_chain(engine).intact
    engine.dispose()


def test_a_row_whose_time_cannot_be_read_does_not_stop_the_atna_feed(archive, monkeypatch):
    """One audit row with a damaged time (an edit in the SQLite file) made every batch read
    fail: nothing after it ever reached the audit repository, the off-site copy that
    outlives a rewritten local trail. The feed goes on, the row sent with the time it is
    sent and a note of the damage."""
    import socket

    from sqlalchemy import func, select, text

    from imageshare.audit.atna import AtnaConfig, AtnaSender
    from imageshare.domain.actors import Actor
    from imageshare.storage.index.schema import atna_cursor, audit_events

    with archive.engine.begin() as conn:
        done = conn.execute(select(func.max(audit_events.c.seq))).scalar() or 0
        conn.execute(atna_cursor.update().values(sent_seq=done))
    for name in ("first", "damaged", "third"):
        archive.audit.record(AuditEvent(Actor("user", name, "clinician", "10.0.0.1"),
                                        "study.view", "success", study_uid="1.2.3"))
    with archive.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET at = 'not a time' WHERE seq = :s"),
                     {"s": done + 2})
    ours, theirs = socket.socketpair()
    sender = AtnaSender(archive.engine, AtnaConfig(host="127.0.0.1", port=9),
                        confirm_seconds=0.01)
    monkeypatch.setattr(sender, "_connected", lambda: ours)
    try:
        assert sender.send_pending() == 3
        theirs.settimeout(2)
        data = b""
        while data.count(b"</AuditMessage>") < 3:
            data += theirs.recv(65536)
    finally:
        ours.close()
        theirs.close()
    for name in (b"user:first", b"user:damaged", b"user:third"):
        assert name in data


def test_the_atna_feed_sends_each_event_with_the_time_it_was_recorded(any_archive, monkeypatch):
    import socket

    from lxml import etree
    from sqlalchemy import func, select

    from imageshare.audit.atna import AtnaConfig, AtnaSender
    from imageshare.audit.chain import _at_text
    from imageshare.storage.index.schema import atna_cursor, audit_events

    archive = any_archive
    with archive.engine.begin() as conn:
        done = conn.execute(select(func.max(audit_events.c.seq))).scalar() or 0
        conn.execute(atna_cursor.update().values(sent_seq=done))
    at = datetime(2026, 12, 3, 17, 1, 2, 345678, tzinfo=UTC)
    archive.audit.record(AuditEvent(ACTOR, "audit.read", "success", at=at))
    ours, theirs = socket.socketpair()
    sender = AtnaSender(archive.engine, AtnaConfig(host="127.0.0.1", port=9),
                        confirm_seconds=0.01)
    monkeypatch.setattr(sender, "_connected", lambda: ours)
    try:
        assert sender.send_pending() == 1
        theirs.settimeout(2)
        data = b""
        while b"</AuditMessage>" not in data:
            data += theirs.recv(65536)
    finally:
        ours.close()
        theirs.close()
    xml = data[data.index(b"<?xml"):]
    assert etree.fromstring(xml).find("EventIdentification").get("EventDateTime") == \
        _at_text(at)
    assert f" {_at_text(at)} ".encode() in data[:data.index(b"<?xml")]


def test_an_event_timed_in_another_zone_is_kept_as_its_utc_moment_and_verifies(archive):
    from datetime import timedelta, timezone

    paris = datetime(2026, 12, 3, 18, 30, tzinfo=timezone(timedelta(hours=1)))
    archive.audit.record(AuditEvent(ACTOR, "audit.read", "success", at=paris,
                                    detail={"zone": "+01:00"}))
    (row,) = archive.audit.events(detail=("zone", "+01:00"))
    at = row["at"] if row["at"].tzinfo else row["at"].replace(tzinfo=UTC)
    assert at == paris
    report = verify_chain(archive.engine)
    assert report.intact, [str(p) for p in report.problems]


def test_a_push_to_a_site_names_the_site_as_the_receiver_not_the_member_of_staff():
    """PS3.15 A.5.3.3: the process receiving the instances carries (110152, "Destination
    Role ID"). A push by dr.who to another hospital gave that role to dr.who."""
    from lxml import etree

    from imageshare.audit.atna import audit_message
    from tests.unit.test_atna import CONFIG, audit_schema

    doc = etree.fromstring(audit_message(_row("exchange.push", site="RVJ-PACS",
                                              transfer="t1"), CONFIG))
    assert audit_schema().validate(doc), str(audit_schema().error_log)
    roles = {p.find("RoleIDCode").get("csd-code"): p.get("UserID")
             for p in doc.iterfind("ActiveParticipant") if p.find("RoleIDCode") is not None}
    assert roles == {"110153": "IMAGESHARE", "110152": "RVJ-PACS"}
    (requestor,) = [p for p in doc.iterfind("ActiveParticipant")
                    if p.get("UserIsRequestor") == "true"]
    assert requestor.get("UserID") == "user:ig.lead"
    # A site that sends to us is itself the requestor and the source.
    row = {**_row("instance.store"), "actor": "node:RVJ-PACS", "actor_kind": "node"}
    doc = etree.fromstring(audit_message(row, CONFIG))
    (requestor,) = [p for p in doc.iterfind("ActiveParticipant")
                    if p.get("UserIsRequestor") == "true"]
    assert requestor.find("RoleIDCode").get("csd-code") == "110153"
