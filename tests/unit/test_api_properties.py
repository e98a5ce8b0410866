"""Property-based tests of the HTTP API with schemathesis, from its own OpenAPI document.

Every operation of ``/api/openapi.json`` (the JSON API, DICOMweb, the health check) is called
with generated requests, as an administrator (a command-line token) and with no credentials:
no answer is a server error, and every error answer has the one RFC 9457 problem shape (FHIR's
under /fhir: an OperationOutcome). The
run is deterministic (derandomised examples) and kept short.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from imageshare.domain.actors import Actor
from imageshare.web.server import create_app
from tests.conftest import ADMIN_PASSWORD, make_archive
from tests.factory import ct_series

PROBLEM = "application/problem+json"
# STOW-RS answers a partly or wholly failed store with DICOM JSON (PS3.18 10.5.3), not a
# problem document.
DICOM_JSON = "application/dicom+json"
EXAMPLES = 8


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[dict]:
    """A running app with one stored study, an administrator's token and the OpenAPI
    document as the app serves it."""
    root = tmp_path_factory.mktemp("api-properties")
    archive = make_archive(root)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    for path in ct_series(root / "ct", 2, patient_id="PROP1"):
        archive.ingest.store_copy(path, Actor("system", "tests", "admin", "tests"))
    token = archive.users.create_token("admin", "schemathesis", origin="cli")
    app = create_app(archive)
    with TestClient(app) as client:
        document = client.get("/api/openapi.json", headers={"Authorization": f"Bearer {token}"})
        assert document.status_code == 200
        assert client.get("/api/openapi.json").status_code == 401
    yield {"app": app, "token": token, "document": document.json()}
    archive.close()


@schemathesis.check
def problem_shape(ctx, response, case) -> bool | None:
    """Every error is an RFC 9457 problem document whose status is the answer's; a server
    error says no more than its request id."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if case.method == "POST" and case.path.startswith("/dicomweb/studies") and (
            content_type.startswith(DICOM_JSON)):
        return None
    if case.path.startswith("/fhir/"):  # FHIR's own error shape: an OperationOutcome
        assert content_type.startswith("application/fhir+json"), content_type
        body = response.json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"], body
        return True
    assert content_type.startswith(PROBLEM), f"{response.status_code} as {content_type}"
    body = response.json()
    assert {"type", "title", "status"} <= set(body), body
    assert body["status"] == response.status_code, body
    return True


def test_no_request_gets_a_server_error_and_errors_have_one_shape(api):
    schema = schemathesis.openapi.from_dict(api["document"])
    schema.app = api["app"]
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            nonlocal calls
            for headers in ({"Authorization": f"Bearer {api['token']}"}, {}):
                response = case.call(headers=headers)
                case.validate_response(response, checks=[not_a_server_error, problem_shape])
                calls += 1

        call()
    assert calls >= 2 * 50


@pytest.mark.parametrize("url", [
    "/dicomweb/studies?offset=99999999999999999999",
    "/dicomweb/studies?limit=99999999999999999999",
    "/dicomweb/instances?InstanceNumber=99999999999999999999",
    "/dicomweb/series?SeriesNumber=-99999999999999999999",
])
def test_numbers_beyond_what_the_index_holds_are_refused_with_a_reason(api, url):
    """Found by the property test: numbers past a 64-bit integer reached SQL (a 500)."""
    with TestClient(api["app"], raise_server_exceptions=False) as client:
        answer = client.get(url, headers={"Authorization": f"Bearer {api['token']}"})
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == PROBLEM


def test_row_numbers_in_paths_past_a_64_bit_integer_are_refused(api):
    with TestClient(api["app"], raise_server_exceptions=False) as client:
        answer = client.post("/api/exchange/inbox/9223372036854775808/accept", json={},
                             headers={"Authorization": f"Bearer {api['token']}"})
    assert answer.status_code == 422 and answer.headers["content-type"] == PROBLEM
