"""Red team, session 33: the JSON API under /api as a hostile or careless client uses it.

Federated searches that would list other patients, UIDs cut short, someone else's share
asked for by id, an inbox item accepted before its forwarding fails, misspelt fields that
fell back to defaults, bodies sent as another media type or not parsing, node settings the
index cannot keep, and API tokens minted without end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from imageshare.access.policy import INBOX
from imageshare.app import Archive
from imageshare.domain.actors import Actor, cli_actor
from imageshare.storage.index.schema import audit_events, inbox_items, shares
from imageshare.web.api import MAX_LIVE_TOKENS
from imageshare.web.server import create_app
from tests.factory import ct_series

PROBLEM = "application/problem+json"
PASSWORD = "correct horse battery staple"
HOSPITAL = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                 grants=frozenset({"dicom.store", INBOX}))


@pytest.fixture
def api(archive: Archive, tmp_path) -> Iterator[dict[str, Any]]:
    """Our own study (hospital number HOSP1), two clinicians with tokens, an admin token."""
    stored = [archive.ingest.store_copy(p, cli_actor())
              for p in ct_series(tmp_path / "ours", 2, patient_id="HOSP1")]
    for name in ("alice", "bob"):
        archive.users.add(name, PASSWORD, "clinician")
    tokens = {name: archive.users.create_token(name, "tests") for name in ("alice", "bob")}
    tokens["admin"] = archive.users.create_token("admin", "tests", origin="cli")
    with TestClient(create_app(archive)) as client:
        yield {"client": client, "study": stored[0].study_uid, "tokens": tokens}


def _as(api: dict[str, Any], user: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api['tokens'][user]}", **headers}


def _count(archive: Archive, table: Any, *where: Any) -> int:
    with archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar()
                   or 0)


@pytest.mark.parametrize("body", [
    {"hospital_number": "*"}, {"hospital_number": "HOSP?"}, {"hospital_number": "X\\HOSP1"},
    {"name": "*", "dob": "1970-01-01"}, {"name": "D*", "dob": "19700101"},
])
def test_a_federated_search_never_lists_patients_by_wildcard_or_value_list(api, body):
    client = api["client"]
    answer = client.post("/api/exchange/search", json=body, headers=_as(api, "alice"))
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert "in full" in answer.json()["detail"]
    exact = client.post("/api/exchange/search", json={"hospital_number": "HOSP1"},
                        headers=_as(api, "alice"))
    assert exact.status_code == 200 and len(exact.json()["local"]) == 1


@pytest.mark.parametrize("dob", ["2020-13-45", "1970", "1970-1980-", "-19991231", "1970-1-1x"])
def test_a_birth_date_that_is_no_date_is_refused_not_sent_to_sites(api, dob):
    answer = api["client"].post("/api/exchange/search", json={"name": "Doe^Jane", "dob": dob},
                                headers=_as(api, "alice"))
    assert answer.status_code == 400, answer.text
    assert "date of birth" in answer.json()["detail"]


def test_a_study_uid_longer_than_64_characters_is_refused_not_cut_short(api):
    client = api["client"]
    long_uid = api["study"] + "." + "1" * 64
    fulfil = client.post("/api/exchange/requests/abc/fulfil", json={"study_uids": [long_uid]},
                         headers=_as(api, "alice"))
    assert fulfil.status_code == 422 and "study_uids" in fulfil.json()["detail"]
    share = client.post(f"/api/studies/{api['study']}/shares",
                        json={"series_uids": ["1." + "2" * 70]}, headers=_as(api, "alice"))
    assert share.status_code == 422 and "series_uids" in share.json()["detail"]


def test_another_users_share_is_the_same_404_as_none_and_the_refusal_is_audited(api, archive):
    client = api["client"]
    made = client.post(f"/api/studies/{api['study']}/shares", json={"days": 2},
                       headers=_as(api, "alice"))
    assert made.status_code == 201, made.text
    share_id = made.json()["id"]
    denied = audit_events.c.action == "access.denied"
    before = _count(archive, audit_events, denied)
    answers = [client.get(f"/api/shares/{share_id}", headers=_as(api, "bob")),
               client.get("/api/shares/0123456789abcdef", headers=_as(api, "bob")),
               client.delete(f"/api/shares/{share_id}", headers=_as(api, "bob")),
               client.delete("/api/shares/0123456789abcdef", headers=_as(api, "bob"))]
    assert {(a.status_code, a.json()["detail"]) for a in answers} == {(404, "no such share")}
    assert _count(archive, audit_events, denied) == before + 4
    still = client.get(f"/api/shares/{share_id}", headers=_as(api, "alice"))
    assert still.status_code == 200 and still.json()["state"] == "active"


def test_accepting_with_a_forward_to_an_unknown_site_accepts_nothing(api, archive, tmp_path):
    for path in ct_series(tmp_path / "theirs", 2, patient_id="SENT9"):
        archive.ingest.store_copy(path, HOSPITAL)
    (item,) = archive.inbox.items()
    answer = api["client"].post(f"/api/exchange/inbox/{item.pk}/accept",
                                json={"forward_to": "NOWHERE"}, headers=_as(api, "alice"))
    assert answer.status_code == 404, answer.text
    assert _count(archive, inbox_items, inbox_items.c.pk == item.pk,
                  inbox_items.c.status == "pending") == 1


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/studies/{study}/shares", {"day": 1}, "body.day"),
    ("/api/studies/{study}/shares", {"allow_downlaod": True}, "body.allow_downlaod"),
    ("/api/tokens", {"name": "ci", "owner": "bob"}, "body.owner"),
    ("/api/exchange/push", {"site": "X", "study_uid": "1.2", "prority": "urgent"},
     "body.prority"),
])
def test_a_misspelt_or_unknown_field_is_refused_and_nothing_is_made(api, archive, path, body,
                                                                   field):
    shares_before = _count(archive, shares, shares.c.pk > 0)
    answer = api["client"].post(path.format(study=api["study"]), json=body,
                                headers=_as(api, "alice"))
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    assert _count(archive, shares, shares.c.pk > 0) == shares_before


@pytest.mark.parametrize(("content", "content_type", "status", "says"), [
    (b'{"name": "ci"}', "text/plain", 415, "application/json"),
    (b"name=ci", "application/x-www-form-urlencoded", 415, "application/json"),
    (b'{"name": "ci"}', None, 415, "application/json"),
    (b'{"name": ', "application/json", 400, "not valid JSON"),
    (b"[" * 50000 + b"]" * 50000, "application/json", 400, "nested too deeply"),
    (b'{"name": "\xe9"}', "application/json; charset=latin-1", 400, "UTF-8"),
])
def test_a_body_that_is_not_json_gets_415_or_400_with_the_reason(api, content, content_type,
                                                                 status, says):
    headers = _as(api, "alice")
    if content_type:
        headers["Content-Type"] = content_type
    answer = api["client"].post("/api/tokens", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body = answer.json()
    assert body["status"] == status and says in body["detail"]
    # and nobody learns more than 401 without credentials
    anonymous = api["client"].post("/api/tokens", content=content,
                                   headers={"Content-Type": content_type or "text/plain"})
    if status == 415:
        assert anonymous.status_code == 401


@pytest.mark.parametrize("body", [
    {"display_name": "x" * 129}, {"dicomweb_url": "javascript:alert(1)"},
    {"dicomweb_url": "file:///etc/passwd"}, {"dicomweb_url": "https://"},
    {"dicomweb_url": "https://site.example/" + "a" * 1024}, {"host": "h\r\nx"},
])
def test_a_node_the_index_cannot_keep_or_a_bad_dicomweb_address_is_refused(api, body):
    node = {"ae_title": "SITEX", "host": "site.example", "port": 104, **body}
    answer = api["client"].post("/api/nodes", json=node, headers=_as(api, "admin"))
    assert answer.status_code == 422, answer.text
    good = api["client"].post("/api/nodes", json={
        "ae_title": "SITEX", "host": "site.example", "port": 104,
        "dicomweb_url": "https://site.example/dicomweb"}, headers=_as(api, "admin"))
    assert good.status_code == 201, good.text


def test_token_names_are_one_line_and_live_tokens_are_bounded(api, archive):
    client = api["client"]
    bob = ("bob", PASSWORD)  # tokens are made by the person (HTTP Basic here), not a token
    control = client.post("/api/tokens", json={"name": "ci\nforged"}, auth=bob)
    assert control.status_code == 422
    live = sum(1 for t in archive.users.tokens("bob") if t["revoked_at"] is None)
    for n in range(MAX_LIVE_TOKENS - live):
        assert client.post("/api/tokens", json={"name": f"t{n}"}, auth=bob).status_code == 201
    refused = client.post("/api/tokens", json={"name": "one more"}, auth=bob)
    assert refused.status_code == 400 and "revoke one" in refused.json()["detail"]
    newest = archive.users.tokens("bob")[0]["pk"]
    archive.users.revoke_token("bob", int(str(newest)))
    assert client.post("/api/tokens", json={"name": "after"}, auth=bob).status_code == 201


def test_a_token_cannot_make_another_token(api, archive):
    """A stolen token could otherwise make itself a successor that outlives its revocation."""
    before = len(archive.users.tokens("bob"))
    refused = api["client"].post("/api/tokens", json={"name": "successor"},
                                 headers=_as(api, "bob"))
    assert refused.status_code == 403 and "cannot make another" in refused.json()["detail"]
    assert len(archive.users.tokens("bob")) == before
    [denied] = [e for e in archive.audit.events("access.denied")
                if e["detail"].get("route") == "/api/tokens"]
    assert denied["actor"] == "user:bob" and denied["detail"]["wanted"] == "token.self"


def test_an_error_answer_is_kept_by_no_cache(api):
    client = api["client"]
    for answer in (client.get("/api/shares/0123456789abcdef", headers=_as(api, "bob")),
                   client.post("/api/exchange/search", json={"nhs": "9434765918"},
                               headers=_as(api, "bob")),
                   client.get("/api/me")):
        assert answer.status_code >= 400
        assert answer.headers["cache-control"] == "no-store", answer.status_code
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_lists_come_a_bounded_page_at_a_time_with_the_total(api):
    client = api["client"]
    made = [client.post(f"/api/studies/{api['study']}/shares", json={"days": 1},
                        headers=_as(api, "alice")).json()["id"] for _ in range(3)]
    page = client.get("/api/shares", params={"limit": 2, "offset": 1},
                      headers=_as(api, "alice"))
    assert page.status_code == 200 and page.headers["x-total-count"] == "3"
    assert [s["id"] for s in page.json()] == made[::-1][1:3]
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "1e9"}):
        assert client.get("/api/shares", params=params,
                          headers=_as(api, "alice")).status_code == 422, params
    inbox = client.get("/api/exchange/inbox", params={"limit": 1}, headers=_as(api, "alice"))
    assert inbox.status_code == 200 and inbox.headers["x-total-count"] == "0"
    requests = client.get("/api/exchange/requests", params={"limit": 1000},
                          headers=_as(api, "alice"))
    assert requests.status_code == 200 and requests.headers["x-total-count"] == "0"
    too_long = client.post("/api/exchange/push", json={
        "site": "X", "study_uid": api["study"], "notify": ["x" * 129]},
        headers=_as(api, "alice"))
    assert too_long.status_code == 422 and "notify" in too_long.json()["detail"]


@pytest.mark.parametrize(("content", "says"), [
    (b'{"days": 1, "deidentified": true, "deidentified": false}', "'deidentified' twice"),
    (b'{"days": 1, "series_uids": [], "title": {"a": 1, "a": 2}}', "'a' twice"),
    (b'{"days": NaN}', "NaN"), (b'{"days": -Infinity}', "-Infinity"),
])
def test_a_json_body_naming_a_field_twice_or_holding_nan_is_refused(api, archive, content,
                                                                     says):
    before = _count(archive, shares, shares.c.pk > 0)
    answer = api["client"].post(f"/api/studies/{api['study']}/shares", content=content,
                                headers=_as(api, "alice", **{"Content-Type":
                                                             "application/json"}))
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert says in answer.json()["detail"]
    assert _count(archive, shares, shares.c.pk > 0) == before
