"""ImageShare's own address, for the absolute URLs its answers carry (DICOMweb Retrieve URLs
and BulkDataURIs, FHIR links): never an address a request's Host header merely claims."""

from __future__ import annotations

import socket
from functools import lru_cache
from urllib.parse import urlsplit

from fastapi import Request

from imageshare.settings import Settings
from imageshare.web.deps import archive_of

# Addresses that mean "every address of this machine": not one a client can be sent to.
EVERY_ADDRESS = ("", "0.0.0.0", "::", "[::]")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def public_root(request: Request) -> str:
    """``scheme://host[:port]`` that clients reach ImageShare at, without a trailing slash:
    ``public_url`` when set; else the request's Host when it names this server (its
    configured host, localhost, this machine's names and addresses, or the address the
    connection came in on) at the port the connection came in on; else
    :func:`listening_base`. A forged Host (``evil.example``) so never reaches a URL that a
    client, or a shared cache, follows next. Behind a reverse proxy whose name is not this
    machine's, set ``public_url``."""
    settings = archive_of(request).settings
    configured = settings.public_url.rstrip("/")
    if configured:
        return configured
    return _named_host(request, settings) or listening_base(request, settings)


def listening_base(request: Request, settings: Settings) -> str:
    """``scheme://host:port`` of ``http_host`` and ``http_port``; when the server listens on
    every address (or on a port the system chose), the local address of the connection that
    brought the request (the server's own socket, not anything the client said). The scheme
    is the connection's (HTTPS here, or at a trusted proxy that says so)."""
    server = request.scope.get("server") or ("", 0)
    host = settings.http_host.strip()
    if host in EVERY_ADDRESS:
        host = str(server[0] or "127.0.0.1")
    port = settings.http_port or int(server[1] or 0)
    return _origin(_scheme(request), host, port)


def _scheme(request: Request) -> str:
    return "https" if request.url.scheme == "https" else "http"


def _origin(scheme: str, host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address (RFC 3986 3.2.2)
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + ("" if not port or port == default else f":{port}")


def _named_host(request: Request, settings: Settings) -> str:
    """The origin the Host header names when it is one this server answers on (see
    :func:`public_root`), rebuilt from the known name (nothing else of the header is
    copied); "" otherwise."""
    raw = request.headers.get("host", "").strip()
    if not raw or any(c in raw for c in "/\\@?#% \t"):
        return ""
    try:
        parts = urlsplit(f"//{raw}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not host:
        return ""
    scheme = _scheme(request)
    server = request.scope.get("server") or ("", 0)
    listening = int(server[1] or 0) or settings.http_port
    if (port or (443 if scheme == "https" else 80)) != listening:
        return ""
    names = {n.lower() for n in (*_LOOPBACK, *_machine_names(), str(server[0] or ""),
                                 settings.http_host.strip()) if n and n not in EVERY_ADDRESS}
    host = host.lower()
    if host not in names:
        return ""
    return _origin(scheme, host, listening)


@lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    """This machine's host name and the addresses it resolves to (looked up once)."""
    names: set[str] = set()
    try:
        name = socket.gethostname()
    except OSError:
        return frozenset()
    names.add(name)
    try:
        for *_, address in socket.getaddrinfo(name, None):
            names.add(str(address[0]).split("%", 1)[0])
    except OSError:
        pass
    return frozenset(names)
