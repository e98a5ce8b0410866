"""Who may do what over HTTP: every role and channel against every kind of resource and action.

The table below is the specification: one row per action on a resource, one column per
caller (a role reached over a channel: browser session, HTTP Basic, bearer API token, an
opened share link). Every cell is asserted, and every refusal (401, 403) leaves exactly one
``access.denied`` audit event; nothing is open unless the table says so (default deny).

The resources: study S of one patient with series A and B, study T of another patient; the
reviewer ``rcp`` received an identifiable share of S's series A (view only) and opened it with
its passcode; ``lnk`` is a browser that opened de-identified share D of S (view and comment,
no download) with its passcode; I is the identifiable share's link.
(DIMSE is asserted in its own test.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imageshare.domain.actors import Actor
from imageshare.fhir.imaging_study import resource_id
from imageshare.sharing.links import NewShare
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import browser_sign_in, csrf_of

PASSWORD = "matrix-password"
SYSTEM = Actor("system", "tests", "admin", "tests")

# Callers (columns):
#   ano  nobody                              lnk  a browser holding de-identified link D
#   pat  patient, session                    rev  reviewer with nothing shared, session
#   rcp  reviewer who opened share I         rcT  the same reviewer, bearer token
#   cli  clinician, session                  clB  clinician, HTTP Basic
#   clT  clinician, bearer token             edu  educator, session
#   svT  service account, bearer token       adB  administrator without 2FA, HTTP Basic
#   adW  the same, token made in the web app
#   adC  the same, token made on the command line (for machines)
#   bos  administrator with 2FA, session
# Cells: a status code, or "all" / "own": 200 listing everything / only share I's items.
# Paths: DW is /dicomweb/studies; {a} and {b} are an instance of series A and of B (WADO-RS);
# {X} is an e-mail confirmation link's secret that was never mailed (410 to whoever may ask).
MATRIX = """
request     path                       ano pat rev rcp rcT lnk cli clB clT edu svT adB adW adC bos
GET         DW                         401 403 403 own own 401 all all all all all 403 403 all all
GET         DW/{S}/series              401 403 403 own own 401 all all all all all 403 403 all all
GET         DW/{T}/series              401 403 403 403 403 401 200 200 200 200 200 403 403 200 200
GET         DW/{S}/series/{A}/metadata 401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
GET         DW/{S}/series/{B}/metadata 401 403 403 404 404 401 200 200 200 200 200 403 403 200 200
GET         {a}/rendered               401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
GET         {b}/rendered               401 403 403 404 404 401 200 200 200 200 200 403 403 200 200
GET         {a}                        401 403 403 403 403 401 200 200 200 200 200 403 403 200 200
GET         DW/{T}                     401 403 403 403 403 401 200 200 200 200 200 403 403 200 200
POST:stow   DW                         401 403 403 403 403 401 200 200 200 403 200 403 403 200 200
GET         /studies/{S}               401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
GET         /studies/{T}               401 403 403 403 403 401 200 200 200 200 200 403 403 200 200
GET         /viewer/{S}                401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
POST:note   /studies/{S}/comments      401 403 403 403 403 401 303 403 403 303 403 403 403 403 303
POST:search /search                    401 403 403 200 403 401 200 403 403 200 403 403 403 403 200
GET         /admin/users               401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
POST:user   /admin/users               401 403 403 403 403 401 403 403 403 403 403 403 403 403 303
GET         /studies/{S}/consent       401 403 403 403 403 401 200 200 200 403 403 403 403 200 200
GET         /api/studies/{S}/consent   401 403 403 403 403 401 200 200 200 403 403 403 403 200 200
GET         /admin/holds               401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
GET         /admin/deletions           401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
GET         /admin/retention           401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
GET         /api/me                    401 200 200 200 200 401 200 200 200 200 200 200 200 200 200
POST:token  /api/tokens                401 403 201 201 403 401 201 201 403 201 403 403 403 403 201
GET         /api/nodes                 401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
GET         /requests                  401 403 403 403 403 401 200 200 200 403 403 403 403 200 200
GET         /studies/{S}/sites         401 403 403 403 403 401 200 200 200 403 403 403 403 200 200
POST:receipt /api/exchange/receipts    401 403 403 403 403 401 403 403 403 403 403 403 403 403 403
GET         /api/audit                 401 403 403 403 403 401 403 403 403 403 403 403 403 200 200
POST:export /api/studies/{S}/exports   401 403 403 403 403 401 202 202 202 202 403 403 403 202 202
POST:share  /api/studies/{S}/shares    401 403 403 403 403 401 201 201 201 201 403 403 403 201 201
GET         /s/{D}/case                401 403 403 403 403 200 403 403 403 403 403 403 403 403 403
GET         /s/{D}/download            401 403 403 403 403 403 403 403 403 403 403 403 403 403 403
POST:note   /s/{D}/comments            401 403 403 403 403 303 403 403 403 403 403 403 403 403 403
GET         /s/{I}/case                401 403 403 200 403 401 403 403 403 403 403 403 403 403 403
GET         /s/{D}/present             401 403 403 403 403 200 403 403 403 403 403 403 403 403 403
GET         /teaching                  401 403 403 403 403 401 200 200 200 200 403 403 403 200 200
GET         /logbook                   401 403 403 403 403 401 200 200 200 200 403 403 403 200 200
GET         /logbook.csv               401 403 403 403 403 401 200 200 200 200 403 403 403 200 200
GET         FH                         401 403 403 own own 401 all all all all all 403 403 all all
GET         FH/{S:fhir}                401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
GET         FH/{T:fhir}                401 403 403 404 404 401 200 200 200 200 200 403 403 200 200
GET         /fhir/metadata             200 200 200 200 200 200 200 200 200 200 200 200 200 200 200
GET         /iid?{S:iid}               401 403 403 200 200 401 200 200 200 200 200 403 403 200 200
GET         /uploads                   401 403 403 403 403 401 200 200 200 403 403 403 403 200 200
GET         /my                        401 200 403 403 403 401 403 403 403 403 403 403 403 403 403
GET         /shared-with-me            401 200 200 200 200 401 200 200 200 200 200 200 200 200 200
POST:form   /account/email/confirmation 401 400 400 400 403 401 400 403 403 400 403 403 403 403 400
GET         /account/email/confirm/{X} 401 410 410 410 410 401 410 410 410 410 410 410 410 410 410
POST:form   /account/email/confirm/{X} 401 410 410 410 403 401 410 403 403 410 403 403 403 403 410
"""


def _table() -> tuple[list[str], list[tuple[str, str, str, dict[str, str]]]]:
    """(callers, rows of (method, path, body kind, {caller: cell}))."""
    lines = [line.split() for line in MATRIX.strip().splitlines()]
    callers = lines[0][2:]
    rows = []
    for request, path, *cells in lines[1:]:
        assert len(cells) == len(callers), path
        method, _, body = request.partition(":")
        path = path.replace("DW", "/dicomweb/studies", 1) if path.startswith("DW") else path
        path = path.replace("FH", "/fhir/ImagingStudy", 1) if path.startswith("FH") else path
        rows.append((method, path, body or "-", dict(zip(callers, cells, strict=True))))
    return callers, rows


class Caller:
    """One column: a client with its credentials (and CSRF token, for browsers)."""

    def __init__(self, client: TestClient, csrf: str = "", headers: dict | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.client, self.csrf, self.headers, self.auth = client, csrf, headers or {}, auth

    def request(self, method: str, path: str, **kwargs):
        return self.client.request(method, path, headers={**self.headers,
                                                          **kwargs.pop("headers", {})},
                                   auth=self.auth, follow_redirects=False, **kwargs)


@pytest.fixture
def world(archive, tmp_path):
    """The resources and one signed-in client per column."""
    for name, role in (("pat", "patient"), ("rev", "reviewer"), ("rcp", "reviewer"),
                       ("cli", "clinician"),
                       ("edu", "educator"), ("svc", "service"), ("boss", "admin")):
        archive.users.add(name, PASSWORD, role)
    study = ct_series(tmp_path / "s", 2, patient_id="MX1", patient_name="Matrix^Sam")
    study_uid = archive.ingest.store_copy(study[0], SYSTEM).study_uid
    archive.ingest.store_copy(study[1], SYSTEM)
    archive.ingest.store_copy(ct_series(tmp_path / "s2", 2, patient_id="MX1",
                                        patient_name="Matrix^Sam", study_uid=study_uid)[0],
                              SYSTEM)
    other = archive.ingest.store_copy(ct_series(tmp_path / "t", 1, patient_id="MX2")[0],
                                      SYSTEM).study_uid
    a_series, b_series = archive.catalogue.record(study_uid).series
    owner = Actor("user", "cli", "clinician", "127.0.0.1")
    ident = archive.shares.create(NewShare(study_uid, series_uids=(a_series.series_uid,),
                                           recipient_user="rcp", deidentified=False,
                                           allow_comment=False), owner, None)
    deid = archive.shares.create(NewShare(study_uid), owner, None)
    stow = ct_series(tmp_path / "u", 1, patient_id="MX3")[0].read_bytes()

    def instance(series) -> str:
        return (f"studies/{study_uid}/series/{series.series_uid}/instances/"
                f"{series.instances[0].sop_uid}")

    names = {"{S}": study_uid, "{T}": other, "{A}": a_series.series_uid,
             "{B}": b_series.series_uid, "{a}": "/dicomweb/" + instance(a_series),
             "{b}": "/dicomweb/" + instance(b_series), "{D}": deid.path.removeprefix("/s/"),
             "{I}": ident.path.removeprefix("/s/"), "{S:fhir}": resource_id(study_uid),
             "{T:fhir}": resource_id(other),
             "{S:iid}": f"requestType=STUDY&studyUID={study_uid}", "{X}": "0" * 43}
    app = create_app(archive)

    def browser(username: str | None, code: str | None = None) -> Caller:
        client = TestClient(app)
        if username is None:
            return Caller(client)
        browser_sign_in(client, username, PASSWORD, code)
        return Caller(client, csrf_of(client.get("/", headers={"Accept": "text/html"}).text))

    def bearer(username: str, origin: str = "web") -> Caller:
        token = archive.users.create_token(username, "matrix", origin)
        return Caller(TestClient(app), headers={"Authorization": f"Bearer {token}"})

    archive.users.set_password("admin", PASSWORD)
    boss_totp = enrol_two_factor(archive, "boss")
    callers = {
        "ano": browser(None), "pat": browser("pat"), "rev": browser("rev"),
        "rcp": browser("rcp"), "rcT": bearer("rcp"), "lnk": browser(None),
        "cli": browser("cli"), "clB": Caller(TestClient(app), auth=("cli", PASSWORD)),
        "clT": bearer("cli"), "edu": browser("edu"), "svT": bearer("svc"),
        "adB": Caller(TestClient(app), auth=("admin", PASSWORD)),
        "adW": bearer("admin"), "adC": bearer("admin", "cli"),
        "bos": browser("boss", next_code(boss_totp)),
    }
    opened = callers["rcp"].client.post(ident.path, data={"passcode": ident.passcode},
                                        follow_redirects=False)
    assert opened.status_code == 303
    link = callers["lnk"]
    assert link.client.post(deid.path, data={"passcode": deid.passcode},
                            follow_redirects=False).status_code == 303
    case = link.client.get(deid.path + "/case", headers={"Accept": "text/html"})
    link.csrf = re.search(r'name="csrf_token" value="([^"]+)"', case.text).group(1)
    yield {"names": names, "callers": callers, "stow": stow, "S": study_uid, "T": other,
           "A": a_series.series_uid, "B": b_series.series_uid}
    for caller in callers.values():
        caller.client.close()


def _body(kind: str, caller: Caller, world: dict, counter: int) -> dict:
    """Request arguments for a row's body, with the caller's CSRF token where one is due."""
    csrf = {"csrf_token": caller.csrf} if caller.csrf else {}
    header = {"X-CSRF-Token": caller.csrf} if caller.csrf else {}
    if kind == "-":
        return {}
    if kind == "form":  # a page form with nothing but the CSRF token
        return {"data": {**csrf}}
    if kind == "note":
        return {"data": {"body": "Seen in the matrix", **csrf}}
    if kind == "search":
        return {"data": {"q": "matrix", **csrf}}
    if kind == "user":
        return {"data": {"username": f"made{counter}", "role": "reviewer",
                         "password": PASSWORD, **csrf}}
    if kind == "stow":
        body, content_type = encode_multipart([world["stow"]])
        return {"content": body, "headers": {"Content-Type": content_type, **header}}
    # A token is made with the current password (a session alone makes none).
    payload = {"token": {"name": f"t{counter}", "password": PASSWORD}, "export": {"format": "zip"},
               "share": {"days": 1},
               "receipt": {"origin": "SITEB", "transfer": "0123", "outcome": "accepted"}}[kind]
    return {"json": payload, "headers": header}


def _check(cell: str, answer, world: dict, path: str) -> None:
    if cell in ("all", "own") and path.startswith("/fhir/"):
        assert answer.status_code == 200, answer.text[:300]
        found = {entry["resource"]["identifier"][0]["value"].removeprefix("urn:oid:"): entry
                 for entry in answer.json().get("entry", [])}
        if cell == "own":  # only the shared series of S
            assert set(found) == {world["S"]}
            assert [s["uid"] for s in found[world["S"]]["resource"]["series"]] == [world["A"]]
        else:
            assert {world["S"], world["T"]} <= set(found)
        return
    if cell in ("all", "own"):
        assert answer.status_code == 200, answer.text[:300]
        listed = answer.json()
        if path.endswith("/series"):
            found = {item["0020000E"]["Value"][0] for item in listed}
            assert found == ({world["A"]} if cell == "own" else {world["A"], world["B"]})
        else:
            found = {item["0020000D"]["Value"][0] for item in listed}
            if cell == "own":
                [study] = listed
                assert found == {world["S"]} and study["00201206"]["Value"] == [1]
            else:
                assert {world["S"], world["T"]} <= found
        return
    assert answer.status_code == int(cell), answer.text[:300]


def test_every_caller_may_do_exactly_what_the_matrix_says(archive, world):
    callers, rows = _table()
    assert set(callers) == set(world["callers"])
    cells = refusals = 0
    for number, (method, path, body, expected) in enumerate(rows):
        concrete = path
        for name, value in world["names"].items():
            concrete = concrete.replace(name, value)
        for who, cell in expected.items():
            caller = world["callers"][who]
            before = len(list(archive.audit.events("access.denied", limit=100_000)))
            answer = caller.request(method, concrete,
                                    **_body(body, caller, world, number * 100 + cells))
            try:
                _check(cell, answer, world, path)
            except AssertionError as exc:
                raise AssertionError(f"{who} {method} {path}: {exc}") from None
            denied = len(list(archive.audit.events("access.denied", limit=100_000))) - before
            refused = cell in ("401", "403")
            assert denied == int(refused), f"{who} {method} {path}: {denied} refusals audited"
            refusals += refused
            cells += 1
    assert cells == len(rows) * len(callers) and refusals > cells // 2


def test_the_matrix_covers_every_kind_of_route():
    """A route family added later joins the table (DICOMweb, pages, API, share links)."""
    _callers, rows = _table()
    paths = {path for _method, path, _body, _expected in rows}
    for prefix in ("/dicomweb/", "/studies/", "/viewer/", "/admin/", "/api/", "/s/", "/fhir/",
                   "/iid", "/account/email/"):
        assert any(p.startswith(prefix) for p in paths), prefix
    assert Path(__file__).name == "test_access_matrix.py"
