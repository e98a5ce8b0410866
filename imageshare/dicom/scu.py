"""DIMSE to other sites (pynetdicom): C-FIND studies, C-MOVE them to us, C-STORE to them."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from imageshare.dicom import reactor
from imageshare.dicom.contexts import identify, storage_contexts_for
from imageshare.domain.errors import SiteUnreachable
from imageshare.exchange.nodes import Node, forbidden_address
from imageshare.exchange.sites import (
    Criteria,
    Delivered,
    Progress,
    RetrieveProgress,
)

log = logging.getLogger("imageshare.scu")
FIND_MAX_RESULTS = 2000  # studies of one patient at one site: far more than any has
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
              "StudyInstanceUID", "IssuerOfPatientID")


def _address_of(node: Node) -> str:
    """The IP address to reach ``node`` at: its host name resolved once, here, and the
    first address a site may have (:func:`forbidden_address`), so that a DNS answer pointing
    at a metadata service or a link-local address is never connected to (and the address
    checked is the one connected to). SiteUnreachable, saying why, otherwise."""
    try:
        found = socket.getaddrinfo(node.host, node.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise SiteUnreachable(f"{node.label} cannot be reached (its host name does not "
                              "resolve)") from exc
    refused = ""
    # IPv4 first, as the address was reached before it was resolved here
    for _family, _type, _proto, _name, sockaddr in sorted(
            found, key=lambda entry: entry[0] != socket.AF_INET):
        address = str(sockaddr[0])
        why = forbidden_address(address)
        if not why:
            return address
        refused = refused or why
    raise SiteUnreachable(f"{node.label} is not connected to: its host {refused}")


class DimseSites:
    """The DIMSE side of :class:`imageshare.exchange.sites.SiteClient`."""

    def __init__(self, ae_title: str, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None,
                 find_max_results: int = FIND_MAX_RESULTS) -> None:
        self.ae_title = ae_title
        self.timeout = timeout
        self.find_max_results = find_max_results  # studies one C-FIND may answer with
        self.tls = tls  # for nodes registered with TLS (BCP 195, imageshare/tls.py)
        reactor.install()  # PDUs sent at once (TCP_NODELAY)

    def _ae(self, timeout: float) -> AE:
        ae = identify(AE(ae_title=self.ae_title))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = min(timeout, 10)
        return ae

    def _associate(self, ae: AE, node: Node) -> Any:
        tls_args = None
        if node.tls:
            if self.tls is None:
                raise SiteUnreachable(f"{node.label} needs DICOM TLS, which is not set up here")
            tls_args = (self.tls, node.host)
        address = _address_of(node)
        try:
            assoc = ae.associate(address, node.port, ae_title=node.ae_title,
                                 tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_ABORTED, _wake_waiting)])
        except (OSError, RuntimeError) as exc:
            raise SiteUnreachable(f"{node.label} cannot be reached") from exc
        if assoc.is_rejected:
            raise SiteUnreachable(f"{node.label} refused the association (is our AE title "
                                  f"{self.ae_title} registered there, at this address?)")
        if not assoc.is_established:
            raise SiteUnreachable(f"{node.label} cannot be reached")
        return assoc

    def check(self, node: Node, timeout: float) -> str:
        """C-ECHO the node: its answer, for people."""
        ae = self._ae(timeout)
        ae.add_requested_context(Verification)
        started = time.monotonic()
        assoc = self._associate(ae, node)
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if not status or status.Status != 0:
            raise SiteUnreachable(f"{node.label} did not answer C-ECHO with success")
        return f"C-ECHO answered in {round((time.monotonic() - started) * 1000)} ms"

    def find_studies(self, node: Node, criteria: Criteria, timeout: float
                     ) -> list[dict[str, Any]]:
        """C-FIND at STUDY level (Study Root): at most :attr:`find_max_results` studies, all
        within ``timeout`` seconds (else :class:`SiteUnreachable`, the association aborted)."""
        ae = self._ae(timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_KEYS:
            setattr(query, keyword, criteria.get(keyword, ""))
        for key, value in criteria.items():
            if "." in key:  # a key inside a sequence: one item (PS3.4 C.2.2.2.6)
                sequence, keyword = key.split(".", 1)
                item = Dataset()
                setattr(item, keyword, value)
                setattr(query, sequence, [item])
        assoc = self._associate(ae, node)
        results: list[dict[str, Any]] = []
        completed = False
        deadline = time.monotonic() + timeout
        try:
            for status, identifier in assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind):
                if not status:
                    raise SiteUnreachable(f"{node.label} stopped answering")
                # An answer that never ends (or trickles) would hold a search worker and
                # fill memory: cut off, the association aborted (finally, below).
                if time.monotonic() > deadline:
                    raise SiteUnreachable(f"{node.label} did not finish answering within "
                                          f"{timeout:g} s")
                if status.Status in (0xFF00, 0xFF01) and len(results) >= self.find_max_results:
                    raise SiteUnreachable(f"{node.label} answered with more than "
                                          f"{self.find_max_results} studies: not read")
                if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    # A value that does not fit its VR (an IS of "abc") is left out of its
                    # study; it does not lose the site's whole answer.
                    results.append(identifier.to_json_dict(suppress_invalid_tags=True))
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    log.info("C-FIND to %s ended with status 0x%04X", node.ae_title,
                             status.Status)
            completed = True
        finally:
            if completed:
                assoc.release()
            else:  # a release would wait for the rest of the answer
                assoc.abort()
        return results

    def retrieve_study(self, node: Node, study_uid: str, progress: Progress
                       ) -> RetrieveProgress:
        """C-MOVE the study to our own AE title (the site must know our address)."""
        ae = self._ae(self.timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        assoc = self._associate(ae, node)
        last = RetrieveProgress(0, 0)
        try:
            for status, _identifier in assoc.send_c_move(
                    query, self.ae_title, StudyRootQueryRetrieveInformationModelMove):
                if not status:
                    raise SiteUnreachable(f"{node.label} stopped answering")
                done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                warned = int(status.get("NumberOfWarningSuboperations", 0) or 0)
                left = int(status.get("NumberOfRemainingSuboperations", 0) or 0)
                last = RetrieveProgress(done + warned, done + warned + failed + left, failed)
                progress(last)
                if status.Status not in (0xFF00, 0x0000, 0xB000):
                    raise SiteUnreachable(
                        f"{node.label} refused the retrieval (status 0x{status.Status:04X})")
        finally:
            assoc.release()
        return last

    def send(self, node: Node, files: Iterable[Path], progress: Progress,
             delivered: Delivered | None = None) -> RetrieveProgress:
        """C-STORE each file, in the syntax it is stored in. A connection lost part way (the
        site stopped, the network went) raises :class:`SiteUnreachable` naming how far it got;
        what was acknowledged before is reported to ``delivered`` one by one."""
        paths = list(files)
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
        pairs = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}
        ae = self._ae(self.timeout)
        ae.requested_contexts = storage_contexts_for(pairs)
        assoc = self._associate(ae, node)
        sent = failed = 0
        completed = False

        def lost() -> SiteUnreachable:
            return SiteUnreachable(f"the connection to {node.label} was lost after {sent} of "
                                   f"{len(paths)} instance(s)")

        try:
            for path in paths:
                try:
                    status = assoc.send_c_store(path)
                except ValueError:  # no accepted presentation context for this instance
                    failed += 1
                    progress(RetrieveProgress(sent, len(paths), failed))
                    continue
                except (RuntimeError, OSError) as exc:
                    raise lost() from exc
                if not status:  # no answer: the peer went away (or fell silent)
                    raise lost()
                if status.Status in (0x0000, 0xB000, 0xB006, 0xB007):
                    sent += 1
                    if delivered is not None:
                        delivered(path)
                else:
                    failed += 1
                progress(RetrieveProgress(sent, len(paths), failed))
            completed = True
        finally:
            # A broken or interrupted association is aborted: a release would wait for an
            # answer that may never come.
            if assoc.is_established and completed:
                assoc.release()
            elif assoc.is_established:
                assoc.abort()
        return RetrieveProgress(sent, len(paths), failed)


def _wake_waiting(event: Any) -> None:
    """The peer went away (connection closed, A-ABORT): pynetdicom would otherwise keep a
    request waiting for its answer until the DIMSE timeout; hand it "no answer" at once."""
    event.assoc.dimse.msg_queue.put((None, None))
