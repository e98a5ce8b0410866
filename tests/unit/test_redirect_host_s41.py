"""The framework's own redirects (a trailing slash taken off) named the server by the
request's Host header: ``GET /dicomweb/studies/`` with ``Host: evil.example`` answered
``307 Location: http://evil.example/dicomweb/studies``, which a shared cache could keep and
send every user to. They now answer the path alone."""

from __future__ import annotations

PATHS = ("/dicomweb/studies/", "/fhir/ImagingStudy/", "/api/me/", "/viewer/1.2.3/")
HOSTS = ("evil.example", "localhost.evil.example", "EVIL.example:80")


def test_a_forged_host_never_reaches_a_redirect(client):
    for path in PATHS:
        for host in HOSTS:
            response = client.get(path, headers={"Host": host}, follow_redirects=False)
            assert response.status_code in (307, 308), (path, response.status_code)
            location = response.headers["location"]
            assert "evil" not in location.lower(), (path, host, location)
            assert location == path.rstrip("/")

    # the query goes with it, and the redirect is followed to the answer
    response = client.get("/dicomweb/studies/", params={"limit": "1"},
                          headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.headers["location"] == "/dicomweb/studies?limit=1"
    assert client.get("/dicomweb/studies/", params={"limit": "1"}).status_code in (200, 204)
