"""DICOMweb to other sites (the dicomweb-client library): QIDO-RS, WADO-RS, STOW-RS.

A site is trusted with nothing it was not asked for: a redirect is refused, not followed (it
could point anywhere, an address inside our network included); no connection is made to an
address no site has (link-local, where cloud metadata services answer: checked on the opened
connection, so a host name that resolves there now is refused too); an answer is read only up
to a size and for a time, both checked as it arrives (an endless or trickling answer ends
with a refusal, never an exhausted memory or a job that never finishes); a search answer
must be DICOM JSON; and a retrieved instance must be the one asked for (its study, series and
SOP Instance UIDs), else it is not stored: another study's instance would otherwise enter the
record unreviewed.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_errors
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from imageshare.domain.errors import (
    ImageShareError,
    OutOfResources,
    SiteUnreachable,
    StorageError,
)
from imageshare.exchange.nodes import Node, forbidden_address
from imageshare.exchange.sites import (
    Criteria,
    Delivered,
    Progress,
    RetrieveProgress,
)

Store = Callable[[io.BytesIO], object]

SEARCH_MAX_BYTES = 32 << 20  # a QIDO-RS answer (some thousand studies take a few MB)
INSTANCE_MAX_BYTES = 2 << 30  # one instance by WADO-RS (a long cine loop takes hundreds of MB)
STORE_ANSWER_MAX_BYTES = 4 << 20  # a STOW-RS answer
INSTANCE_SECONDS = 900.0  # the longest one instance may take to arrive


class BadAnswer(requests.RequestException):
    """A site answered in a way we do not take (a redirect, too much, too slowly, not what
    was asked): the message says which, for people, without the site's words."""


class ForbiddenAddress(Exception):
    """A connection reached an address no site may have (link-local, metadata): closed
    before anything was sent on it. Not an ``OSError``, so that urllib3 neither retries it
    nor words it as an unreachable host."""


def _refuse_forbidden_peer(sock: socket.socket) -> None:
    """Close ``sock`` and raise :class:`ForbiddenAddress` when its peer is an address no site
    may have (the host name resolved there: a DNS answer pointing at a metadata service)."""
    why = forbidden_address(str(sock.getpeername()[0]))
    if why:
        sock.close()
        raise ForbiddenAddress(why)


class _GuardedHTTPConnection(HTTPConnection):
    """A connection whose peer is checked as soon as it is open, before any byte is sent."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _refuse_forbidden_peer(sock)
        return sock


class _GuardedHTTPSConnection(HTTPSConnection):
    """The TLS version of :class:`_GuardedHTTPConnection` (checked before the handshake)."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _refuse_forbidden_peer(sock)
        return sock


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _SiteAdapter(HTTPAdapter):
    """requests as sites are spoken to: every connection's peer checked
    (:func:`imageshare.exchange.nodes.forbidden_address`, whatever the registered name
    resolves to now), and, with a ``context``, our TLS: BCP 195, the system's and
    ``tls_ca_file``'s authorities, our certificate for sites that ask for one."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """The pool manager, with our context and guarded connections."""
        if self._context is not None:
            kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool,
                                                   "https": _GuardedHTTPSPool}


class DicomwebSites:
    """The DICOMweb side of :class:`imageshare.exchange.sites.SiteClient`; retrieved instances
    go to ``store`` (the ingest pipeline)."""

    def __init__(self, store: Store, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None,
                 search_max_bytes: int = SEARCH_MAX_BYTES,
                 instance_max_bytes: int = INSTANCE_MAX_BYTES,
                 instance_seconds: float = INSTANCE_SECONDS) -> None:
        self._store = store
        self.timeout = timeout  # seconds: to connect, between two reads, and for a search
        self._tls = tls  # trusted authorities for sites over https (imageshare/tls.py)
        self.search_max_bytes = search_max_bytes
        self.instance_max_bytes = instance_max_bytes
        self.instance_seconds = instance_seconds

    def _client(self, node: Node, timeout: float | None = None,
                max_bytes: int | None = None, seconds: float | None = None
                ) -> DICOMwebClient:
        """A client for ``node`` whose every answer must come within ``seconds`` (default
        the timeout) and ``max_bytes`` (default a search's), without a redirect."""
        wait = timeout or self.timeout
        session = requests.Session()
        session.mount("http://", _SiteAdapter(None))
        session.mount("https://", _SiteAdapter(self._tls))
        headers, session.auth = node.credentials()
        session.headers.update(headers)
        session.request = _guarded(  # type: ignore[method-assign]  # requests has no per-session limits: its method is wrapped
            session.request, wait, max_bytes or self.search_max_bytes, seconds or wait)
        client = DICOMwebClient(url=node.dicomweb_url.rstrip("/"), session=session,
                                timeout=wait)
        # The library tries every failed request five times, waiting longer each time (a
        # refused answer too): a search would outlast its timeout many times over. Jobs
        # have their own retries.
        client.set_http_retry_params(retry=False)
        return client

    def find_studies(self, node: Node, criteria: Criteria, timeout: float
                     ) -> list[dict[str, Any]]:
        """QIDO-RS /studies: DICOM JSON (:class:`SiteUnreachable` saying why when the site
        cannot be reached or answers with anything else)."""
        try:
            found = self._client(node, timeout).search_for_studies(
                search_filters={k: v for k, v in criteria.items() if v},
                fields=["PatientBirthDate", "PatientSex", "NumberOfStudyRelatedInstances",
                        "StudyDescription", "IssuerOfPatientID",
                        *{k.split(".")[0] for k in criteria if "." in k}])
        except BadAnswer as exc:
            raise SiteUnreachable(f"{node.label} {exc}") from exc
        except requests.JSONDecodeError as exc:  # a web page, say, where JSON was asked for
            raise SiteUnreachable(f"{node.label} answered the search with something that is "
                                  "not DICOM JSON") from exc
        except (requests.RequestException, OSError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached") from exc
        return _dicom_json(node, found)

    def check(self, node: Node, timeout: float) -> str:
        """An authenticated QIDO-RS asking for one study: its answer, for people."""
        started = time.monotonic()
        try:
            self._client(node, timeout).search_for_studies(limit=1, fields=["StudyDate"])
        except BadAnswer as exc:
            raise SiteUnreachable(f"{node.label} {exc}") from exc
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            reason = {401: "refused our credentials", 403: "does not let our account search"
                      }.get(code, f"answered HTTP {code}")
            raise SiteUnreachable(f"{node.label} {reason}") from exc
        except (requests.RequestException, OSError, ValueError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached over DICOMweb") from exc
        return f"QIDO-RS answered in {round((time.monotonic() - started) * 1000)} ms"

    def retrieve_study(self, node: Node, study_uid: str, progress: Progress
                       ) -> RetrieveProgress:
        """WADO-RS the study instance by instance into the archive. Only the instances the
        site lists for the study are asked for, and only one that is what was asked for
        (study, series and SOP Instance UIDs) is stored; each other one counts as failed,
        with the reason in the result's ``problems``."""
        searching = self._client(node)
        fetching = self._client(node, max_bytes=self.instance_max_bytes,
                                seconds=self.instance_seconds)
        problems: dict[str, int] = {}
        done = failed = 0

        def problem(reason: str) -> None:
            nonlocal failed
            failed += 1
            problems[reason] = problems.get(reason, 0) + 1

        try:
            listed = _instances_listed(searching.search_for_instances(
                study_instance_uid=study_uid, fields=["SeriesInstanceUID"]))
            for series_uid, sop_uid in listed:
                if not (series_uid and sop_uid):
                    problem("listed without its series or SOP Instance UID")
                    progress(RetrieveProgress(done, len(listed), failed))
                    continue
                try:
                    ds = fetching.retrieve_instance(study_uid, series_uid, sop_uid,
                                                    media_types=(("application/dicom", "*"),))
                    asked = (study_uid, series_uid, sop_uid)
                    if _uids_of(ds) != asked:
                        problem("not the instance asked for (another study, series or "
                                "SOP Instance UID): not stored")
                    else:
                        self._store(_part10(ds))
                        done += 1
                except (requests.ConnectionError, requests.Timeout):
                    raise
                except BadAnswer as exc:
                    problem(str(exc))
                except (OutOfResources, StorageError):  # ours, not the instance's: stop
                    raise
                except ImageShareError as exc:  # the archive refused it: the reason is ours
                    problem(f"refused here: {exc}"[:200])
                except Exception:  # noqa: BLE001 - the site's bytes, however broken, fail alone
                    # (a web page, a multipart with a wrong or no boundary, a cut-off or
                    # garbled file: pydicom and the library raise many kinds of error)
                    problem("sent something that is not a readable DICOM instance")
                progress(RetrieveProgress(done, len(listed), failed))
        except BadAnswer as exc:
            raise SiteUnreachable(f"{node.label} {exc}") from exc
        except (requests.RequestException, OSError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached") from exc
        return RetrieveProgress(done, len(listed), failed, tuple(
            f"{count} {reason}" for reason, count in problems.items()))

    def send(self, node: Node, files: Iterable[Path], progress: Progress,
             delivered: Delivered | None = None) -> RetrieveProgress:
        """STOW-RS, one instance per request (so that one failure does not sink the rest); an
        instance counts as delivered only when the site's answer lists no failure; a site that
        stops answering raises :class:`SiteUnreachable`."""
        client = self._client(node, max_bytes=STORE_ANSWER_MAX_BYTES,
                              seconds=self.instance_seconds)
        paths = list(files)
        sent = failed = 0
        for path in paths:
            try:
                answer = client.store_instances([dcmread(path)])
                # One instance per request: a Failed SOP Sequence in the answer (HTTP 200 or
                # 202 from some sites, PS3.18 10.5.3) is this instance refused, not delivered.
                if answer.get("FailedSOPSequence"):
                    failed += 1
                    progress(RetrieveProgress(sent, len(paths), failed))
                    continue
                sent += 1
                if delivered is not None:
                    delivered(path)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise SiteUnreachable(
                    f"{node.label} stopped answering after {sent} of {len(paths)} "
                    "instance(s)") from exc
            except BadAnswer as exc:  # a redirect answers every request: stop
                raise SiteUnreachable(
                    f"{node.label} {exc} (after {sent} of {len(paths)} instance(s))") from exc
            except (requests.RequestException, OSError, ValueError):
                failed += 1
            progress(RetrieveProgress(sent, len(paths), failed))
        return RetrieveProgress(sent, len(paths), failed)


def _part10(ds: Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


def _uids_of(ds: Dataset) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a retrieved instance."""
    return tuple(str(ds.get(k, "")).strip() for k in  # type: ignore[return-value]
                 ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def _is_element(value: object) -> bool:
    """A DICOM JSON attribute (PS3.18 F.2.2): an object whose ``Value``, if any, is a list."""
    return isinstance(value, dict) and isinstance(value.get("Value", []), list)


def _dicom_json(node: Node, answer: object) -> list[dict[str, Any]]:
    """``answer`` when it is a DICOM JSON list of datasets; SiteUnreachable otherwise."""
    if not isinstance(answer, list) or not all(
            isinstance(item, dict) and all(_is_element(v) for v in item.values())
            for item in answer):
        raise SiteUnreachable(f"{node.label} answered the search with something that is not "
                              "DICOM JSON")
    return answer


def _instances_listed(answer: object) -> list[tuple[str, str]]:
    """(Series, SOP Instance UID) of each instance a QIDO-RS answer lists ("" where one is
    missing or not text); an answer that is not a DICOM JSON list is refused."""
    if not isinstance(answer, list):
        raise BadAnswer("listed the study's instances with something that is not DICOM JSON")
    listed = []
    for entry in answer:
        uids = []
        for tag in ("0020000E", "00080018"):
            element = entry.get(tag) if isinstance(entry, dict) else None
            values = element.get("Value") if isinstance(element, dict) else None
            first = values[0] if isinstance(values, list) and values else ""
            uids.append(first.strip() if isinstance(first, str) else "")
        listed.append((uids[0], uids[1]))
    return listed


def _guarded(request: Callable[..., Any], timeout: float, max_bytes: int, seconds: float
             ) -> Callable[..., Any]:
    """``request`` with our ``timeout`` (to connect and between reads; the library's own is
    replaced), no redirect followed (:class:`BadAnswer`), and the whole answer read at once,
    refused as soon as it passes ``max_bytes`` (decoded) or takes longer than ``seconds``."""

    def call(method: str, url: str, **kwargs: Any) -> Any:
        host = urlsplit(url).hostname or ""
        if _is_ip(host) and forbidden_address(host):  # through a proxy: never connected to
            raise BadAnswer(f"{forbidden_address(host)}: not connected to")
        kwargs["timeout"] = timeout
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        started = time.monotonic()
        try:
            response = request(method, url, **kwargs)
        except ForbiddenAddress as exc:
            raise BadAnswer(f"{exc}: not connected to") from None
        try:
            if response.is_redirect or 300 <= response.status_code < 400:
                raise BadAnswer("answered with a redirect to another address, which is not "
                                f"followed (HTTP {response.status_code}): register the "
                                "address the site should be reached at")
            _read_whole(response, max_bytes, started + seconds)
        except BaseException:
            response.close()
            raise
        return response

    return call


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _read_whole(response: requests.Response, max_bytes: int, deadline: float) -> None:
    """Read the answer's body into ``response`` (as requests does without ``stream``)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadAnswer(f"answered with more than {max_bytes >> 20} MB: not read")
    body = bytearray()
    raw = response.raw
    # What has arrived, at most 1 MB at a time: a site sending a byte now and then still
    # meets the deadline (a read of a fixed size would wait for all of it).
    read = getattr(raw, "read1", None) or raw.read
    while True:
        try:
            chunk = read(1 << 20, decode_content=True)
        except (urllib3_errors.HTTPError, OSError) as exc:
            raise requests.ConnectionError(exc) from exc
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise BadAnswer(f"answered with more than {max_bytes >> 20} MB: not read")
        if time.monotonic() > deadline:
            raise BadAnswer("took too long to answer: not waited for")
    response._content = bytes(body)
    response._content_consumed = True
