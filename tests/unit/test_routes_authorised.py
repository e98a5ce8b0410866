"""Every HTTP route declares its permission, and none is open to anonymous callers by mistake."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute

from imageshare.access.policy import PUBLIC
from imageshare.web.auth import Permission
from imageshare.web.server import create_app

PUBLIC_ROUTES = {
    ("GET", "/healthz"), ("POST", "/api/session"), ("GET", "/login"), ("POST", "/login"),
    ("GET", "/static/{name}"), ("GET", "/s/{token}"), ("POST", "/s/{token}"),
    ("GET", "/invite/{secret}"), ("POST", "/invite/{secret}"),
    # An invitation to upload: authorised by its token, then its passcode (like share links).
    ("GET", "/u/{token}"), ("POST", "/u/{token}"),
    # Open so that a signed EHR launch URL can sign its user in; unsigned, the caller must be
    # signed in and allowed study.read (checked inside, audited like every refusal).
    ("GET", "/iid"),
    # The FHIR CapabilityStatement: clients read it before they authenticate (no patient data).
    ("GET", "/fhir/metadata"),
}


def _permissions(dependant) -> list[Permission]:
    found = []
    for dep in dependant.dependencies:
        if isinstance(dep.call, Permission):
            found.append(dep.call)
        found.extend(_permissions(dep))
    return found


def _walk(routes, prefix: str = ""):
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix, route
        elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers
            extra = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from _walk(route.original_router.routes, prefix + extra)


def _routes(archive):
    """Every API route of the app as (full path, route)."""
    found = list(_walk(create_app(archive).routes))
    return [_Route(prefix + route.path, route) for prefix, route in found]


class _Route:
    def __init__(self, path: str, route: APIRoute) -> None:
        self.path = path
        self.methods = route.methods
        self.dependant = route.dependant


def test_every_route_declares_exactly_one_permission(archive):
    for route in _routes(archive):
        permissions = _permissions(route.dependant)
        assert len(permissions) == 1, f"{route.path} declares {permissions}"
        is_public = permissions[0].action == PUBLIC
        for method in route.methods:
            assert is_public == ((method, route.path) in PUBLIC_ROUTES), (method, route.path)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1.2.3", path)


def test_anonymous_callers_get_401_everywhere_but_public_routes(archive, anonymous):
    checked = 0
    for route in _routes(archive):
        for method in route.methods:
            response = anonymous.request(method, _concrete(route.path))
            if (method, route.path) in PUBLIC_ROUTES:
                # 422: no credentials; 404: no such static file or share link; 400: an IID
                # launch without its parameters
                assert response.status_code in (200, 400, 404, 410, 422), route.path
            else:
                assert response.status_code == 401, (method, route.path, response.status_code)
            checked += 1
    assert checked >= 25


@pytest.mark.parametrize("role", ["patient", "reviewer"])
def test_roles_without_archive_access_get_403_on_dicomweb(archive, anonymous, role):
    archive.users.add(f"user-{role}", "long-enough-password", role)
    for route in _routes(archive):
        if not route.path.startswith(("/dicomweb", "/fhir/ImagingStudy")):
            continue
        for method in route.methods:
            response = anonymous.request(
                method, _concrete(route.path), auth=(f"user-{role}", "long-enough-password")
            )
            assert response.status_code == 403, (method, route.path)


def test_admin_only_routes_refuse_clinicians(archive, anonymous):
    archive.users.add("clin", "long-enough-password", "clinician")
    for path in ("/api/nodes", "/api/audit"):
        assert anonymous.get(path, auth=("clin", "long-enough-password")).status_code == 403
    assert anonymous.get("/api/me", auth=("clin", "long-enough-password")).json() == {
        "username": "clin", "role": "clinician"}


def test_errors_share_one_problem_shape(client):
    for response in (client.get("/dicomweb/studies/1.2.3"), client.get("/nope"),
                     client.get("/dicomweb/studies", params={"StudyDate": "bad"})):
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert {"type", "title", "status"} <= set(body)
        assert body["status"] == response.status_code


def test_a_patient_account_reaches_only_its_own_account(archive, anonymous):
    """Walk every route as a patient: anything beyond the account itself is refused."""
    from imageshare.access.policy import ACCOUNT_SELF, PATIENT_SELF

    archive.users.add("pat", "long-enough-password", "patient")
    opened, refused = [], 0
    for route in _routes(archive):
        action = _permissions(route.dependant)[0].action
        for method in route.methods:
            response = anonymous.request(method, _concrete(route.path),
                                         auth=("pat", "long-enough-password"))
            refused += response.status_code == 403
            if action in (PUBLIC, ACCOUNT_SELF, PATIENT_SELF):
                continue
            assert response.status_code == 403, (method, route.path, response.status_code)
            opened.append(route.path)
    assert len(opened) >= 40
    refusals = [e for e in archive.audit.events("access.denied") if e["actor"] == "user:pat"]
    assert len(refusals) == refused


def test_clinicians_are_refused_administration_pages(archive, anonymous):
    archive.users.add("clin", "long-enough-password", "clinician")
    for path in ("/admin/users", "/admin/audit", "/admin/holds", "/admin/deletions",
                 "/admin/retention"):
        response = anonymous.get(path, auth=("clin", "long-enough-password"))
        assert response.status_code == 403, path


def test_programs_reach_no_page_route_that_changes_something(archive, anonymous):
    """HTTP Basic and bearer tokens (even an administrator's command-line token) are refused
    by every page (HTML form) route that changes something: forms are for browsers with a
    session and its CSRF token."""
    archive.users.add("clin", "long-enough-password", "clinician")
    token = archive.users.create_token("admin", "machine", origin="cli")
    checked = 0
    for route in _routes(archive):
        if route.path.startswith(("/api/", "/dicomweb", "/fhir/")) or route.path == "/healthz":
            continue
        if _permissions(route.dependant)[0].action == PUBLIC:
            continue
        for method in route.methods - {"GET", "HEAD", "OPTIONS"}:
            for credentials in ({"auth": ("clin", "long-enough-password")},
                                {"headers": {"Authorization": f"Bearer {token}"}}):
                response = anonymous.request(method, _concrete(route.path), **credentials)
                assert response.status_code == 403, (method, route.path, credentials)
            checked += 1
    assert checked >= 30


def test_no_path_is_claimed_by_two_routers(archive):
    """Routers are ordered for speed (the upload page's first), so none may answer a path
    another router also answers: the order must not change what a request reaches."""
    routers = [r.original_router for r in create_app(archive).routes
               if hasattr(r, "original_router")]
    for i, router in enumerate(routers):
        for route in router.routes:
            concrete = _concrete(route.path)
            for other in routers[:i] + routers[i + 1:]:
                for rival in other.routes:
                    assert not (rival.path_regex.match(concrete)
                                and set(rival.methods) & set(route.methods)), (
                        route.path, rival.path)


def test_the_e_mail_confirmation_routes_are_the_signed_in_accounts_own(archive, anonymous):
    """Confirming an address (the link mailed to it, the button that mails it again) needs a
    signed-in account, and is for that account only: never open to anonymous callers."""
    from imageshare.access.policy import ACCOUNT_SELF

    found = {(method, route.path): _permissions(route.dependant)[0].action
             for route in _routes(archive) for method in route.methods
             if route.path.startswith("/account/email/")}
    assert found == {("POST", "/account/email/confirmation"): ACCOUNT_SELF,
                     ("GET", "/account/email/confirm/{secret}"): ACCOUNT_SELF,
                     ("POST", "/account/email/confirm/{secret}"): ACCOUNT_SELF}
    for method, path in found:
        assert anonymous.request(method, _concrete(path)).status_code == 401
