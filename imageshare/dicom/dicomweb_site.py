"""DICOMweb to other sites (the dicomweb-client library): QIDO-RS, WADO-RS, STOW-RS."""

from __future__ import annotations

import io
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from requests.adapters import HTTPAdapter

from imageshare.domain.errors import SiteUnreachable
from imageshare.exchange.nodes import Node
from imageshare.exchange.sites import (
    Criteria,
    Delivered,
    Progress,
    RetrieveProgress,
)

Store = Callable[[io.BytesIO], object]


class _TlsAdapter(HTTPAdapter):
    """requests with our TLS context: BCP 195, the system's and ``tls_ca_file``'s
    authorities, our certificate for sites that ask for one."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """The pool manager, with our context."""
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


class DicomwebSites:
    """The DICOMweb side of :class:`imageshare.exchange.sites.SiteClient`; retrieved instances
    go to ``store`` (the ingest pipeline)."""

    def __init__(self, store: Store, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self._store = store
        self.timeout = timeout
        self._tls = tls  # trusted authorities for sites over https (imageshare/tls.py)

    def _client(self, node: Node, timeout: float | None = None) -> DICOMwebClient:
        session = requests.Session()
        if self._tls is not None:
            session.mount("https://", _TlsAdapter(self._tls))
        headers, session.auth = node.credentials()
        session.headers.update(headers)
        session.request = _with_timeout(session.request, timeout or self.timeout)  # type: ignore[method-assign]  # requests has no per-session timeout: its method is wrapped
        return DICOMwebClient(url=node.dicomweb_url.rstrip("/"), session=session)

    def find_studies(self, node: Node, criteria: Criteria, timeout: float
                     ) -> list[dict[str, Any]]:
        """QIDO-RS /studies."""
        try:
            return self._client(node, timeout).search_for_studies(
                search_filters={k: v for k, v in criteria.items() if v},
                fields=["PatientBirthDate", "PatientSex", "NumberOfStudyRelatedInstances",
                        "StudyDescription", "IssuerOfPatientID",
                        *{k.split(".")[0] for k in criteria if "." in k}])
        except (requests.RequestException, OSError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached") from exc

    def check(self, node: Node, timeout: float) -> str:
        """An authenticated QIDO-RS asking for one study: its answer, for people."""
        started = time.monotonic()
        try:
            self._client(node, timeout).search_for_studies(limit=1, fields=["StudyDate"])
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
        """WADO-RS the study instance by instance into the archive."""
        client = self._client(node)
        try:
            listed = client.search_for_instances(
                study_instance_uid=study_uid, fields=["SeriesInstanceUID"])
            done = failed = 0
            for entry in listed:
                series_uid = entry["0020000E"]["Value"][0]
                sop_uid = entry["00080018"]["Value"][0]
                try:
                    ds = client.retrieve_instance(study_uid, series_uid, sop_uid,
                                                  media_types=(("application/dicom", "*"),))
                    self._store(_part10(ds))
                    done += 1
                except (requests.RequestException, ValueError):
                    failed += 1
                progress(RetrieveProgress(done, len(listed), failed))
        except (requests.RequestException, OSError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached") from exc
        return RetrieveProgress(done, len(listed), failed)

    def send(self, node: Node, files: Iterable[Path], progress: Progress,
             delivered: Delivered | None = None) -> RetrieveProgress:
        """STOW-RS, one instance per request (so that one failure does not sink the rest); a
        site that stops answering raises :class:`SiteUnreachable`."""
        client = self._client(node)
        paths = list(files)
        sent = failed = 0
        for path in paths:
            try:
                client.store_instances([dcmread(path)])
                sent += 1
                if delivered is not None:
                    delivered(path)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise SiteUnreachable(
                    f"{node.label} stopped answering after {sent} of {len(paths)} "
                    "instance(s)") from exc
            except (requests.RequestException, OSError, ValueError):
                failed += 1
            progress(RetrieveProgress(sent, len(paths), failed))
        return RetrieveProgress(sent, len(paths), failed)


def _part10(ds: Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


def _with_timeout(request: Callable[..., Any], timeout: float) -> Callable[..., Any]:
    def call(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return request(method, url, **kwargs)

    return call
