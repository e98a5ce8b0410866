"""The layering the style guide states, kept true: one error catalogue that every adapter
answers from, the composition root reached through one typed dependency."""

from __future__ import annotations

import base64
import inspect
from pathlib import Path

import imageshare
from imageshare.dicom.statuses import STATUSES
from imageshare.domain import errors
from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from imageshare.web.dicomweb import STOW_REASONS


def _error_classes() -> list[type[errors.ImageShareError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.ImageShareError)]


def test_every_error_carries_an_http_status_and_a_title_of_its_own_kind():
    for error in _error_classes():
        assert 400 <= error.http_status < 600, error
        assert error.title, error


def test_every_dicom_status_of_an_error_is_one_the_status_tables_list():
    known = {s.code for s in STATUSES if s.category == "Failure"} | {
        r.code for r in STOW_REASONS}
    with_status = [e for e in _error_classes() if e.dicom_status is not None]
    assert {e.__name__ for e in with_status} >= {
        "InvalidInstance", "ConflictingInstance", "OutOfResources", "InvalidQuery", "WrongStudy"}
    for error in with_status:
        assert error.dicom_status in known, error


def test_stow_of_the_wrong_media_type_answers_the_one_problem_shape(client):
    response = client.post("/dicomweb/studies", content=b"x",
                           headers={"Content-Type": "multipart/related; type=\"image/png\"; "
                                                    "boundary=b"})
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {"type": "about:blank", "title": "Unsupported media type",
                               "status": 415,
                               "detail": "only application/dicom parts are accepted"}


def test_routes_reach_the_services_only_through_the_typed_archive_dependency():
    package = Path(imageshare.__file__).parent
    look_ups = {str(p.relative_to(package)) for p in package.rglob("*.py")
                if "app.state.archive" in p.read_text()}
    # deps.py reads it (archive_of), server.py sets it; nothing else.
    assert look_ups == {"web/deps.py", "web/server.py"}


def test_node_and_token_changes_are_audited_once_whichever_way_they_come(archive, client):
    # The JSON API and the services the command line and the pages call record the same event.
    assert client.post("/api/nodes", json={"ae_title": "PACS2", "host": "10.0.0.2",
                                           "port": 104}).status_code == 201
    assert client.delete("/api/nodes/PACS2").status_code == 204
    archive.nodes.add(Node("CT1", "10.0.0.3", 104), actor=cli_actor())
    # Tokens are made by a person (HTTP Basic here), never with another token.
    archive.users.add("clin", "a-long-password", "clinician")
    assert client.post("/api/tokens", json={"name": "ohif"},
                       headers={"Authorization": "Basic " + base64.b64encode(
                           b"clin:a-long-password").decode()}).status_code == 201
    added = list(archive.audit.events(action="node.add"))
    assert [(e["detail"]["ae_title"], e["actor"]) for e in added] == [
        ("CT1", "system:cli"), ("PACS2", "user:admin")]
    (removed,) = archive.audit.events(action="node.remove")
    assert removed["detail"] == {"ae_title": "PACS2"} and removed["actor"] == "user:admin"
    # The fixture's own command-line token, and the one asked for over the API.
    tokens = [e["detail"]["name"] for e in archive.audit.events(action="token.create")]
    assert tokens == ["ohif", "tests"]
