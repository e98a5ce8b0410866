"""Every catalogued audit event becomes a DICOM audit message that the DICOM Audit Message
Schema (PS3.15 A.5.1, vendored in tests/data/atna/) accepts, carrying its ATNA codes, inside an
RFC 5424 syslog message with RFC 5425 framing.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from imageshare.audit.atna import AtnaConfig, audit_message, frame, syslog_message
from imageshare.audit.events import CATALOGUE

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "atna" / "dicom-audit-message.rnc"
CONFIG = AtnaConfig(host="repository", port=6514, audit_source_id="IMAGESHARE",
                    enterprise_site_id="RVJ", ae_title="IMAGESHARE")


@functools.cache
def audit_schema() -> etree.RelaxNG:
    """The DICOM audit message schema. The standard places its ``##`` annotations after the
    values they describe, which the RELAX NG compact parser (rnc2rng) refuses; as plain
    comments they change nothing."""
    return etree.RelaxNG.from_rnc_string(SCHEMA.read_text().replace("##", "#"))


def _row(action: str, outcome: str = "success") -> dict:
    detail = {f: f"value-{f}" for f in CATALOGUE[action].fields}
    detail.update({"reason": "no such study & <thing>"})
    return {"seq": 7, "at": datetime(2026, 11, 30, 9, 15, 1, 123456, tzinfo=UTC),
            "actor": "user:dr.who", "actor_kind": "user", "source": "10.1.2.3",
            "action": action, "outcome": outcome, "patient_id": "9434765919",
            "study_uid": "1.2.826.0.1.3680043.10.543.1", "instance_count": 3,
            "detail": json.dumps(detail)}


@pytest.mark.parametrize("action", sorted(CATALOGUE))
def test_every_catalogued_event_is_a_schema_valid_dicom_audit_message(action):
    event = CATALOGUE[action]
    for outcome in ("success", "refused"):
        doc = etree.fromstring(audit_message(_row(action, outcome), CONFIG))
        assert audit_schema().validate(doc), (action, str(audit_schema().error_log))
        ident = doc.find("EventIdentification")
        assert ident.find("EventID").get("csd-code") == event.event_id.code
        assert ident.get("EventActionCode") == event.action_code
        assert ident.get("EventOutcomeIndicator") == ("0" if outcome == "success" else "4")
        if event.event_type:
            assert ident.find("EventTypeCode").get("csd-code") == event.event_type.code
        requestor = doc.find("ActiveParticipant")
        assert requestor.get("UserID") == "user:dr.who"
        assert requestor.get("NetworkAccessPointID") == "10.1.2.3"
        roles = {o.get("ParticipantObjectTypeCodeRole")
                 for o in doc.iterfind("ParticipantObjectIdentification")}
        if "patient" in event.objects:
            assert "1" in roles


def test_a_patient_view_names_the_patient_and_the_study_with_their_dicom_id_types():
    doc = etree.fromstring(audit_message(_row("study.view"), CONFIG))
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
               for o in doc.iterfind("ParticipantObjectIdentification")}
    assert objects == {"2": "9434765919", "110180": "1.2.826.0.1.3680043.10.543.1"}
    assert doc.find("EventIdentification").get("EventDateTime") == "2026-11-30T09:15:01.123456Z"


def test_a_refused_query_event_is_invalid_when_broken_so_the_schema_check_can_fail():
    doc = etree.fromstring(audit_message(_row("study.query"), CONFIG))
    doc.find("EventIdentification").set("EventOutcomeIndicator", "3")
    assert not audit_schema().validate(doc)


def test_syslog_messages_are_rfc5424_with_a_bom_and_octet_counted():
    xml = audit_message(_row("session.start"), CONFIG)
    message = syslog_message(xml, datetime(2026, 11, 30, 9, 15, tzinfo=UTC))
    header, _, body = message.partition(b"\xef\xbb\xbf")
    fields = header.decode().split(" ")
    assert fields[0] == "<85>1" and fields[1] == "2026-11-30T09:15:00.000000Z"
    assert fields[3] == "imageshare" and fields[5] == "IHE+RFC-3881" and fields[6] == "-"
    assert body == xml
    framed = frame(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message)


def test_the_person_using_an_identifiable_share_link_is_named_in_the_message():
    """A bound share link is used by one named account: the requestor (the link) carries
    that person as its UserName, and the message stays schema-valid; an administrator's
    action on another user's account never names that user as the requestor."""
    row = {**_row("share.view"), "actor": "share:a1b2c3", "actor_kind": "share"}
    doc = etree.fromstring(audit_message(row, CONFIG))
    assert audit_schema().validate(doc), str(audit_schema().error_log)
    requestor = [p for p in doc.findall("ActiveParticipant")
                 if p.get("UserIsRequestor") == "true"][0]
    assert (requestor.get("UserID"), requestor.get("UserName")) == ("share:a1b2c3",
                                                                   "value-user")
    admin = etree.fromstring(audit_message(_row("user.reset"), CONFIG))
    assert all(p.get("UserName") is None for p in admin.findall("ActiveParticipant"))
