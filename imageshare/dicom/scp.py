"""The DICOM listener: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET mapped onto services.

Each handler builds the calling node's Actor, asks the policy, calls one service and maps
typed errors to DIMSE status codes. Received datasets are written straight to staging files
by pynetdicom (``STORE_RECV_CHUNKED_DATASET``) and never decoded whole in memory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
)
from pynetdicom.transport import ThreadedAssociationServer

from imageshare.access.policy import (
    DICOM_ECHO,
    DICOM_QUERY,
    DICOM_RETRIEVE,
    DICOM_STORE,
    Policy,
    arrival_class,
)
from imageshare.archive.dicom_json import NUMBER_STRING_VRS, error_comment, left_out
from imageshare.archive.ingest import IngestService, no_room
from imageshare.archive.query import LEVELS, Query, QueryService
from imageshare.archive.retrieve import RetrieveService, StoredInstance
from imageshare.archive.transcode import CONVERSION_TARGETS, can_produce, transcode
from imageshare.dicom import reactor, statuses
from imageshare.dicom.contexts import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    LISTENER_SYNTAXES,
    SCP_SOP_CLASSES,
    identify,
    restrict_unrestricted_storage,
    storage_contexts_for,
)
from imageshare.dicom.proxy_protocol import proxy_server_class
from imageshare.dicom.reactor import no_delay
from imageshare.dicom.tls_server import tls_server_class
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    ImageShareError,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    OutOfResources,
    QueryTooBroad,
)
from imageshare.exchange.arrivals import Arrivals
from imageshare.exchange.nodes import NodeRegistry, RefusedCallers
from imageshare.storage.files import owned_prefix

log = logging.getLogger("imageshare.dicom")

# Status codes by their use here; the one table with every service's statuses (and when
# each is answered) is imageshare.dicom.statuses; a refusal for a typed error answers the
# error's own DICOM status (imageshare.domain.errors).
NOT_AUTHORISED = statuses.STORE_NOT_AUTHORISED.code
STORE_OUT_OF_RESOURCES = statuses.STORE_OUT_OF_RESOURCES.code
STORED_COPY_KEPT = "stored copy kept: this UID is stored with other content"
# The Number of ... Sub-operations of a C-MOVE or C-GET response are US: no more can be counted.
MAX_SUB_OPERATIONS = 65535
DESTINATION_NOT_REGISTERED = "destination AE title not registered"
DESTINATION_DID_NOT_ACCEPT = "destination did not accept the association"
DESTINATION_NOT_SENT_TO = "destination does not receive from this archive"
NOT_NEGOTIATED = "the SOP class was not negotiated on this presentation context"
DESTINATION_NEEDS_TLS = "destination is reached over DICOM TLS, which is not set up here"
DESTINATION_TOOK_NOTHING = "destination accepted none of the SOP classes/syntaxes offered"


def _over_tls(assoc: Any) -> bool:
    """Did ``assoc`` arrive over DICOM TLS?"""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    return isinstance(getattr(transport, "socket", None), ssl.SSLSocket)


def _peer_certificate(assoc: Any) -> str:
    """SHA-256 (lowercase hex) of the certificate the caller presented over DICOM TLS, or ""
    (plain port, or no certificate)."""
    transport = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(transport, ssl.SSLSocket):
        return ""
    try:
        der = transport.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return ""
    return hashlib.sha256(der).hexdigest() if der else ""


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds


class DicomListener:
    """Serves the archive over DIMSE on one port; start() returns once it listens."""

    def __init__(
        self,
        ae_title: str,
        port: int | None,
        host: str,
        ingest: IngestService,
        query: QueryService,
        retrieve: RetrieveService,
        nodes: NodeRegistry,
        policy: Policy,
        max_associations: int = 32,
        timeout: float = 60.0,
        max_pdu: int = 262144,
        check_calling_host: bool = True,
        check_called_ae: bool = True,
        shared_port: bool = False,
        refusals: RefusedCallers | None = None,
        arrivals: Arrivals | None = None,
        tls_port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        proxy_protocol_from: str = "",
        retrievals: Callable[[str], Collection[str]] | None = None,
        strict_hierarchy: bool = False,
    ) -> None:
        self.ingest = ingest
        # Refuse a C-FIND, C-MOVE or C-GET that leaves out the unique key of a level above its
        # own (PS3.4 C.4.1.2.1) unless relational queries (retrieval) were negotiated. By
        # default such a request is answered as a relational one, as Orthanc and dcm4chee's
        # "lenient" mode do: findscu and many scripts cannot negotiate the option.
        self.strict_hierarchy = strict_hierarchy
        self.ae_title = ae_title.strip()
        # The studies we are retrieving from a site (by its AE title): all a C-STORE under
        # our own C-MOVE (Move Originator: our AE title) may bring.
        self.retrievals = retrievals
        self.query = query
        self.retrieve = retrieve
        self.nodes = nodes
        self.policy = policy
        self.port = port
        self.host = host
        self.check_calling_host = check_calling_host
        self.shared_port = shared_port
        self.refusals = refusals
        self.arrivals = arrivals  # C-STORE Priority HIGH into the inbox: an urgent arrival
        # DICOM TLS (BCP 195) on a port of its own, served by the same handlers.
        self.tls_port = tls_port
        self.ssl_context = ssl_context
        self._tls_server: Any = None
        # C-MOVE to a node registered with TLS opens its association over TLS.
        self.client_ssl_context = client_ssl_context
        # Behind a TCP balancer sending the PROXY protocol: its addresses (setting text).
        self.proxy_protocol_from = proxy_protocol_from
        self._actors: weakref.WeakKeyDictionary[Any, Actor] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Accept every storage SOP class (private and future ones too) in the transfer syntax
        # the sender prefers (its first proposal): stored as received, never re-encoded; and
        # reject every other service not offered (worklist, MPPS, commitment, print...).
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        restrict_unrestricted_storage()
        ae = identify(AE(ae_title=ae_title))
        # pynetdicom writes received data sets to temporary files: ours go to the staging
        # folder (next to the blobs, so that storing is a rename) and keep a full disk from
        # aborting the association (the store is answered A700 instead).
        _STAGING[ae] = ingest.staging_dir
        dimse_messages.NamedTemporaryFile = _received_file
        # ... after a File Meta Information naming ImageShare, not pynetdicom.
        dimse_messages.create_file_meta = _file_meta
        ae.maximum_associations = max_associations
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.maximum_pdu_size = max_pdu
        # A call to another AE title is refused before any service (the scanner meant
        # another archive); pynetdicom rejects it with reason 7 and EVT_REJECTED lists it.
        ae.require_called_aet = check_called_ae
        for uid in SCP_SOP_CLASSES:
            ae.add_supported_context(uid, list(LISTENER_SYNTAXES))
        self.ae = ae
        self._server: Any = None

    def start(self) -> None:
        """Listen in background threads."""
        reactor.install()
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_SOP_EXTENDED, _on_sop_extended),
            (evt.EVT_CONN_CLOSE, _remove_cut_off),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        base = _SharedPortServer if self.shared_port else _AssociationServer

        def served(server: type) -> type:
            """``server``, reading the PROXY protocol from the balancer when it sends it."""
            if not self.proxy_protocol_from:
                return server
            return proxy_server_class(server, self.proxy_protocol_from)

        server_class = served(base)
        if self.port is not None:  # None: DICOM TLS only
            self._server = self.ae.make_server(
                (self.host, self.port), evt_handlers=handlers,  # type: ignore[arg-type]  # see below
                server_class=server_class,  # (pynetdicom's handler type is narrower than its
            )  # own handlers' return types)
            threading.Thread(
                target=self._server.serve_forever, name="dicom-acceptor", daemon=True
            ).start()
            self.port = self._server.server_address[1]
        if self.ssl_context is not None:
            self._tls_server = self.ae.make_server(
                (self.host, self.tls_port), evt_handlers=handlers,  # type: ignore[arg-type]  # see above
                server_class=served(tls_server_class(base)), ssl_context=self.ssl_context,
            )
            threading.Thread(
                target=self._tls_server.serve_forever, name="dicom-tls-acceptor", daemon=True
            ).start()
            self.tls_port = self._tls_server.server_address[1]

    def stop(self, grace: float = 0.0) -> int:
        """Stop accepting associations (plain and TLS), let open ones finish for up to
        ``grace`` seconds, then abort the rest; returns how many had to be aborted."""
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        if not servers:
            return 0
        # The servers were made with make_server, so the AE does not list them: stop them
        # directly (pynetdicom's own shutdown() would look for them in the AE and raise).
        for server in servers:
            socketserver.BaseServer.shutdown(server)
            server.server_close()
        deadline = time.monotonic() + grace
        while self._open_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._open_associations()
        for assoc in left:
            assoc.abort()
        if left:
            log.warning("%d DICOM association(s) still open after %.0f s were aborted",
                        len(left), grace)
        for assoc in self.ae.active_associations:  # connections that never associated
            if assoc.is_acceptor and not assoc.is_established:
                assoc.kill()
        return len(left)

    def _open_associations(self) -> list[Any]:
        """Associations being served (a connection that never associated is not waited for)."""
        return [a for a in self.ae.active_associations
                if a.is_acceptor and a.is_alive() and a.is_established]

    # -- who is calling ----------------------------------------------------------------------

    def _actor(self, event: Any) -> Actor:
        assoc = event.assoc
        with self._lock:
            actor = self._actors.get(assoc)
        if actor is not None:
            return actor
        calling = str(assoc.requestor.ae_title).strip()
        address = str(assoc.requestor.address)
        node = self.nodes.find(calling)
        registered = node is not None and (
            not self.check_calling_host or _same_host(node.host, address)
        ) and (not node.tls or _over_tls(assoc)) and (  # a TLS node never in plain text,
            # and, with a pinned certificate, only with that one (not any the CA signed)
            not node.tls_certificate or _peer_certificate(assoc) == node.tls_certificate)
        actor = Actor(
            kind="node", name=calling, role="node", source=f"{calling}@{address}",
            registered=registered, grants=node.grants if (node and registered) else frozenset(),
        )
        with self._lock:
            self._actors[assoc] = actor
        return actor

    def _refused(self, event: Any, actor: Actor, action: str, service: str,
                 reason: str = "") -> str:
        """Audit a refused request, list its caller for administrators; returns the reason."""
        address = str(event.assoc.requestor.address)
        if not reason:
            node = self.nodes.find(actor.name)
            reason = ("AE title not registered" if node is None
                      else "this AE title is registered for DICOM TLS: call the TLS port"
                      if node.tls and not _over_tls(event.assoc)
                      else "the certificate presented is not the one registered for this "
                      "AE title" if node.tls_certificate
                      and _peer_certificate(event.assoc) != node.tls_certificate
                      else "calling host does not match the registered host"
                      if not actor.registered else f"{service} not granted to this AE title")
        if self.refusals is not None:
            try:
                self.refusals.record(actor, address, action, service, reason)
            except Exception as exc:  # noqa: BLE001 - the request is refused all the same
                log.warning("refused %s could not be audited: %s", service,
                            type(exc).__name__)
        log.info("refused %s from %s: %s", service, actor.name, reason)
        return reason

    def _on_rejected(self, event: Any) -> None:
        """List an association refused before any service (called AE title not ours, too
        many associations) for administrators, with the reason."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        if self.ae.require_called_aet and called != self.ae_title:
            reason = f"called AE title {called!r} is not this archive's ({self.ae_title})"
        else:
            reason = "too many open associations"
        actor = self._actor(event)
        with self._lock:
            self._actors.pop(assoc, None)
        self._refused(event, actor, "dicom.association", "association", reason)

    # -- handlers --------------------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        actor = self._actor(event)
        if self.policy.allows(actor, DICOM_ECHO):
            return statuses.ECHO_SUCCESS.code
        self._refused(event, actor, DICOM_ECHO, "C-ECHO")
        return statuses.ECHO_NOT_AUTHORISED.code

    def _on_store(self, event: Any) -> Dataset | int:
        try:
            actor = self._actor(event)
        except Exception as exc:  # noqa: BLE001 - the index is unreachable: try again later
            log.error("C-STORE refused, caller unknown: %s", type(exc).__name__)
            return _status(STORE_OUT_OF_RESOURCES, "the archive's index is unavailable")
        if not self.policy.allows(actor, DICOM_STORE):
            reason = self._refused(event, actor, DICOM_STORE, "C-STORE")
            return _status(NOT_AUTHORISED, f"not allowed to store here: {reason}")
        path = Path(event.dataset_path)
        received = _claim(str(path), event.assoc)
        off_context = _not_negotiated(event)
        if off_context:
            # Nothing of it is stored: the association never agreed to this SOP class.
            self._refused(event, actor, DICOM_STORE, "C-STORE", off_context)
            return statuses.STORE_CLASS_NOT_NEGOTIATED.dataset(off_context)
        if received is not None and received.error is not None:
            log.error("C-STORE could not be received: %s", received.error.strerror)
            comment = ("out of resources: the archive's disk is full" if no_room(received.error)
                       else "the archive could not write the received data set")
            return _status(STORE_OUT_OF_RESOURCES, comment)
        # The data set must be the instance the request announced: the file's meta
        # information is written from the request (pynetdicom), its data set as received.
        request = event.request
        announced = (str(getattr(request, "AffectedSOPClassUID", "") or ""),
                     str(getattr(request, "AffectedSOPInstanceUID", "") or ""))
        try:
            result = self.ingest.store_staged(path, actor, announced=announced,
                                              requested=self._requested(request, actor))
        except Exception as exc:  # noqa: BLE001 - nothing was acknowledged; no details
            if isinstance(exc, ImageShareError) and exc.dicom_status is not None:
                return _status(exc.dicom_status, str(exc))
            log.error("C-STORE failed: %s", type(exc).__name__)
            log.debug("C-STORE trace", exc_info=exc)
            return _status(STORE_OUT_OF_RESOURCES, "the archive could not store the instance")
        if result.outcome == "kept_first":
            # Audited by the ingest; the sender must see that its content was not stored.
            log.info("instance arrived again with new content; stored copy kept")
            return statuses.STORE_DUPLICATE.dataset(STORED_COPY_KEPT)
        if self.arrivals is not None and int(getattr(event.request, "Priority", 0) or 0) == 1 \
                and arrival_class(actor) == "inbox":
            try:
                self.arrivals.urgent_from_dicom(actor, result.study_uid)
            except Exception as exc:  # noqa: BLE001 - the store stands; the flag is extra
                log.error("urgent arrival could not be flagged: %s", type(exc).__name__)
        return 0x0000

    def _requested(self, request: Any, actor: Actor) -> Collection[str] | None:
        """For a C-STORE sub-operation of a C-MOVE this archive asked for (PS3.7 9.1.1:
        its Move Originator is our AE title), the studies it may bring: those we are
        retrieving from the caller; None for any other C-STORE."""
        originator = str(getattr(request, "MoveOriginatorApplicationEntityTitle", "") or "")
        if self.retrievals is None or originator.strip() != self.ae_title:
            return None
        return self.retrievals(actor.name)

    def _above_missing(self, event: Any, service: str) -> tuple[str, int] | None:
        """(Error Comment, offending tag) when the request breaks the hierarchical rules
        (:func:`hierarchy_refusal`) and is to be refused; None when it keeps them, was made
        relational by negotiation, or the listener is not strict about the hierarchy."""
        above = hierarchy_refusal(event.identifier, _study_root(event), _relational(event),
                                  "query" if service == "C-FIND" else "retrieve")
        if above is None or not self.strict_hierarchy:
            return None
        log.info("%s refused: %s", service, above[0])
        return above

    def _query_for(self, event: Any) -> Query:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in LEVELS:
            raise InvalidQuery("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
        if level == "PATIENT" and _study_root(event):
            raise InvalidQuery("the Study Root model has no PATIENT level")
        body = Dataset()
        for element in identifier:
            if element.tag.group in (0x0000, 0x0002) or element.keyword == "QueryRetrieveLevel":
                continue
            body.add(element)
        # One match past the maximum is fetched, to tell a cut answer from a complete one.
        return Query(level=level, identifier=body.to_json_dict(), fuzzy=False, one_more=True)

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        actor = self._actor(event)
        if not self.policy.allows(actor, DICOM_QUERY):
            reason = self._refused(event, actor, DICOM_QUERY, "C-FIND")
            yield statuses.FIND_NOT_AUTHORISED.dataset(f"not allowed to query: {reason}"), None
            return
        off_context = _not_negotiated(event)
        if off_context:
            self._refused(event, actor, DICOM_QUERY, "C-FIND", off_context)
            yield statuses.FIND_CLASS_NOT_NEGOTIATED.dataset(off_context), None
            return
        above = self._above_missing(event, "C-FIND")
        if above is not None:
            yield statuses.FIND_IDENTIFIER_MISMATCH.dataset(*above), None
            return
        try:
            query = self._query_for(event)
            matches = self.query.find(query, actor)
        except (InvalidQuery, ValueError) as exc:
            # InvalidQuery's own DICOM status is this one (0xA900).
            yield statuses.FIND_IDENTIFIER_MISMATCH.dataset(str(exc)), None
            return
        except OutOfResources as exc:  # too broad: refused before the work
            yield statuses.FIND_TOO_MANY.dataset(str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001
            log.error("C-FIND failed: %s", type(exc).__name__)
            log.debug("C-FIND trace", exc_info=exc)
            yield statuses.FIND_UNABLE.dataset("the query could not be processed"), None
            return
        syntax = UID(str(event.context.transfer_syntax))
        most = self.query.max_results
        for match in matches[:most]:
            if event.is_cancelled:
                yield statuses.FIND_CANCEL.code, None
                return
            yield statuses.FIND_PENDING.code, response_identifier(
                match.attributes, query.level, syntax,
                answer_charset(event.identifier.get("SpecificCharacterSet"), match.attributes))
        if len(matches) > most:
            # The list is incomplete: never end it with Success.
            yield statuses.FIND_TOO_MANY.dataset(
                f"more than {most} matches; narrow the query"), None

    def _instances_for(self, event: Any, actor: Actor, action: str,
                       detail: dict[str, str] | None = None) -> list[StoredInstance]:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()

        def uids(keyword: str) -> list[str]:
            value = identifier.get(keyword)
            if value in (None, ""):
                return []
            values = [value] if isinstance(value, str) else list(value)
            return [str(v).strip() for v in values if str(v).strip()]

        if level not in LEVELS:
            raise InvalidQuery("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
        if level == "PATIENT" and _study_root(event):
            raise InvalidQuery("the Study Root model has no PATIENT level")
        # The unique key of the retrieve level (PS3.4 C.4.2.2.1): without it a retrieve
        # would answer Success having sent nothing.
        unique = _UNIQUE_KEYS[level]
        if not uids(unique):
            raise InvalidQuery(f"a {level} level retrieve names its {unique}")
        # At most what a response can count; the detail (a C-MOVE's destination) audited.
        select = functools.partial(self.retrieve.select, actor, action, detail=detail,
                                   most=MAX_SUB_OPERATIONS)
        if level == "PATIENT":
            # Of the issuer named, if any: the patients a C-FIND with these keys finds.
            issuer = "\\".join(uids("IssuerOfPatientID"))
            return select(patient_ids=uids("PatientID"), issuer=issuer)
        if level == "STUDY":
            return select(study_uids=uids("StudyInstanceUID"))
        return select(
            study_uids=uids("StudyInstanceUID"),
            series_uids=uids("SeriesInstanceUID"),
            sop_uids=uids("SOPInstanceUID") if level == "IMAGE" else (),
        )

    def _datasets(
        self, found: list[StoredInstance], event: Any,
        accepted: Callable[[], set[tuple[str, str]] | None],
    ) -> Iterator[tuple[int, Any]]:
        """The instances to send. ``accepted()`` gives the (SOP class, transfer syntax) pairs
        the receiving side took, if known: an instance it cannot take as stored is converted
        (decoded and encoded again) to a syntax it took for that SOP class; one that cannot
        be converted is offered as stored, and that sub-operation fails alone. So does one
        whose stored bytes cannot be read (a missing or damaged file): it is listed among the
        failed instances, and the others are still sent."""
        for inst in found:
            if event.is_cancelled:
                yield statuses.MOVE_CANCEL.code, None
                return
            target = sending_syntax(inst.sop_class_uid, inst.transfer_syntax, accepted())
            try:
                ds = self._for_sending(inst, target)
            except Exception as exc:  # noqa: BLE001 - this sub-operation fails alone
                log.error("instance %s could not be read to be sent: %s", inst.sop_uid,
                          type(exc).__name__)
                ds = _unsendable(inst)
            yield statuses.MOVE_PENDING.code, ds

    def _for_sending(self, inst: StoredInstance, target: str | None) -> Dataset:
        """The stored instance, converted to ``target`` when given and possible."""
        with self.retrieve.open(inst) as fp:
            if target is not None:
                try:
                    # Within the pixel budget (transcode checks it before decoding).
                    return dcmread(io.BytesIO(transcode(fp, target)))
                except NotAcceptable as exc:
                    log.info("instance %s not convertible for the receiver: %s",
                             inst.sop_uid, exc)
                except Exception as exc:  # noqa: BLE001 - a codec failed: offered as stored
                    log.warning("instance %s could not be converted for the receiver: %s",
                                inst.sop_uid, type(exc).__name__)
                fp.seek(0)
            return dcmread(fp)

    @staticmethod
    def _taken_by(store: list[Any]) -> set[tuple[str, str]] | None:
        """What the C-MOVE destination accepted on the association this C-MOVE opened to it
        (``store`` holds it once established; None before)."""
        if not store:
            return None
        return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in store[0].accepted_contexts}

    def _on_move(self, event: Any) -> Iterator[Any]:
        actor = self._actor(event)
        if not self.policy.allows(actor, DICOM_RETRIEVE):
            self._refused(event, actor, DICOM_RETRIEVE, "C-MOVE")
        # A refusal raises before the first yield: pynetdicom then answers
        # statuses.MOVE_NOT_AUTHORISED's code, without a comment.
        self.policy.authorise(actor, DICOM_RETRIEVE)
        wanted = str(event.move_destination).strip()
        destination = self.nodes.find(wanted)
        # pynetdicom answers A801 itself (unknown destination, or one that did not accept the
        # association), without a comment: the one the answer gets.
        comments = _move_comments(event.assoc)
        message_id = int(getattr(event.request, "MessageID", 0) or 0)
        if destination is None:
            self._refused(event, actor, DICOM_RETRIEVE, "C-MOVE",
                          f"move destination {wanted[:16]} not registered")
            comments[message_id] = DESTINATION_NOT_REGISTERED
            yield None, None
            return
        if destination.tls and self.client_ssl_context is None:
            # Registered for DICOM TLS and no TLS here to reach it: never in plain text.
            self._refused(event, actor, DICOM_RETRIEVE, "C-MOVE",
                          f"move destination {wanted[:16]} needs DICOM TLS, not set up here")
            comments[message_id] = DESTINATION_NEEDS_TLS
            yield None, None
            return
        if not destination.send_to and destination.ae_title != actor.name:
            # A site this archive does not send to receives nothing because a third AE
            # asked for it (a node may always retrieve to itself).
            self._refused(event, actor, DICOM_RETRIEVE, "C-MOVE",
                          f"move destination {wanted[:16]} does not receive from this archive")
            comments[message_id] = DESTINATION_NOT_SENT_TO
            yield None, None
            return
        comments[message_id] = DESTINATION_DID_NOT_ACCEPT
        refusal: Dataset | None = None  # the failure to answer, with its comment
        found: list[StoredInstance] = []
        off_context = _not_negotiated(event)
        try:
            above = self._above_missing(event, "C-MOVE")
            if off_context:
                self._refused(event, actor, DICOM_RETRIEVE, "C-MOVE", off_context)
                found, refusal = [], statuses.MOVE_CLASS_NOT_NEGOTIATED.dataset(off_context)
            elif above is not None:
                found, refusal = [], statuses.MOVE_IDENTIFIER_MISMATCH.dataset(*above)
            else:
                found = self._instances_for(event, actor, "study.move",
                                            {"destination": destination.ae_title})
        except NotFound:
            found = []
        except QueryTooBroad as exc:
            found, refusal = [], statuses.MOVE_TOO_MANY.dataset(str(exc))
        except (ImageShareError, ValueError) as exc:
            log.info("C-MOVE refused: %s", type(exc).__name__)
            found, refusal = [], statuses.MOVE_IDENTIFIER_MISMATCH.dataset(str(exc))
        # pynetdicom associates with the destination before it sends any status, so even a
        # refusal proposes one context.
        contexts = storage_contexts_for(
            {(i.sop_class_uid, i.transfer_syntax) for i in found}
            or {(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)},
            converted=True,
        )
        # The association pynetdicom opens to the destination for this C-MOVE (not another
        # C-MOVE's to the same destination, whose accepted contexts may differ).
        store: list[Any] = []

        def took_nothing(accepted: Any) -> None:
            """The destination answered the association but accepted none of the contexts
            proposed: pynetdicom aborts it and answers A801, replaced by this answer."""
            if accepted.assoc.accepted_contexts:
                return
            log.info("C-MOVE destination %s accepted none of the contexts proposed",
                     destination.ae_title)
            comments[message_id] = _NothingTaken(
                refusal, (), 1) if refusal is not None else _NothingTaken(
                statuses.MOVE_SUB_OPERATIONS_FAILED.dataset(DESTINATION_TOOK_NOTHING),
                tuple(i.sop_uid for i in found), len(found))

        options: dict[str, Any] = {
            "contexts": contexts,
            "evt_handlers": [(evt.EVT_ESTABLISHED, lambda opened: store.append(opened.assoc)),
                             (evt.EVT_ACCEPTED, took_nothing)],
        }
        if destination.tls:
            options["tls_args"] = (self.client_ssl_context, destination.host)
        yield destination.host, destination.port, options
        if refusal is not None:
            # pynetdicom sends a failure status only after the sub-operations count.
            yield 1
            comments.pop(message_id, None)  # the destination accepted: no A801 from here on
            yield refusal, None
            return
        yield len(found)
        comments.pop(message_id, None)  # the destination accepted: no A801 from here on
        yield from self._datasets(found, event, lambda: self._taken_by(store))

    def _on_get(self, event: Any) -> Iterator[Any]:
        actor = self._actor(event)
        _move_comments(event.assoc)  # (its final response checked: see _responses_checked)
        # pynetdicom answers Success to a count of 0: a refusal counts one sub-operation.
        if not self.policy.allows(actor, DICOM_RETRIEVE):
            reason = self._refused(event, actor, DICOM_RETRIEVE, "C-GET")
            yield 1
            yield statuses.GET_NOT_AUTHORISED.dataset(f"not allowed to retrieve: {reason}"), None
            return
        off_context = _not_negotiated(event)
        if off_context:
            self._refused(event, actor, DICOM_RETRIEVE, "C-GET", off_context)
            yield 1
            yield statuses.GET_CLASS_NOT_NEGOTIATED.dataset(off_context), None
            return
        above = self._above_missing(event, "C-GET")
        if above is not None:
            yield 1
            yield statuses.GET_IDENTIFIER_MISMATCH.dataset(*above), None
            return
        try:
            found = self._instances_for(event, actor, "study.get")
        except NotFound:
            found = []
        except QueryTooBroad as exc:
            yield 1
            yield statuses.GET_TOO_MANY.dataset(str(exc)), None
            return
        except (ImageShareError, ValueError) as exc:
            yield 1
            yield statuses.GET_IDENTIFIER_MISMATCH.dataset(str(exc)), None
            return
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in event.assoc.accepted_contexts
        }
        yield len(found)
        yield from self._datasets(found, event, lambda: accepted)


_LITTLE_ENDIAN_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def sending_syntax(
    sop_class: str, stored: str, taken: set[tuple[str, str]] | None
) -> str | None:
    """The syntax to convert an instance to before sending it, or None to send it as stored:
    the receiver took the stored syntax (pynetdicom itself moves between implicit and
    explicit little endian), or nothing it took can be produced."""
    if taken is None or (sop_class, stored) in taken:
        return None
    offered = {syntax for cls, syntax in taken if cls == sop_class}
    if stored in _LITTLE_ENDIAN_NATIVE and offered & _LITTLE_ENDIAN_NATIVE:
        return None
    preference = {syntax: rank for rank, syntax in enumerate(CONVERSION_TARGETS)}
    for syntax in sorted(offered, key=lambda s: preference.get(s, len(preference))):
        if can_produce(stored, syntax):
            return syntax
    return None


def _encodes(ds: Dataset, implicit: bool, little: bool) -> bool:
    """Does ``ds`` encode in this syntax? (Checked quietly: pynetdicom's own encoder logs the
    failing value.)"""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    try:
        write_dataset(fp, ds)
    except Exception:  # noqa: BLE001 - any failure means "does not encode"
        return False
    return True


_NOT_RETURNED = ("00080005", "00080052")


# The character sets a C-FIND answer is given in when the request named one and every value
# of the answer can be written in it (Python's codec for each): a requester that does not
# know UTF-8 reads its own. ISO 2022 code extensions and JIS X 0201 are answered in UTF-8.
_ANSWER_CODECS = {
    "": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 126": "iso8859_7",
    "ISO_IR 127": "iso8859_6", "ISO_IR 138": "iso8859_8", "ISO_IR 144": "iso8859_5",
    "ISO_IR 148": "iso8859_9", "ISO_IR 166": "tis_620", "GB18030": "gb18030", "GBK": "gbk",
    "ISO_IR 192": "utf_8",
}
UTF8 = "ISO_IR 192"


def answer_charset(asked: Any, attrs: dict[str, Any]) -> str:
    """The Specific Character Set of a C-FIND answer holding ``attrs`` (stored DICOM JSON)
    to a request whose identifier named ``asked`` (absent: the default repertoire, written
    ``""``): the requester's own when every text value fits it, else UTF-8."""
    if asked is not None and not isinstance(asked, str):
        values = [str(v).strip() for v in asked]
        if len(values) != 1:
            return UTF8
        asked = values[0]
    name = str(asked or "").strip()
    codec = _ANSWER_CODECS.get(name)
    if codec is None:
        return UTF8
    try:
        for text in _texts(attrs):
            text.encode(codec)
    except UnicodeEncodeError:
        return UTF8
    return name


def _texts(attrs: dict[str, Any]) -> Iterator[str]:
    """Every string value of stored DICOM JSON, in sequences and person names too."""
    for element in attrs.values():
        if not isinstance(element, dict):
            continue
        for value in element.get("Value") or ():
            if isinstance(value, str):
                yield value
            elif isinstance(value, dict):
                if element.get("vr") == "SQ":
                    yield from _texts(value)
                else:  # a person name's groups
                    yield from (v for v in value.values() if isinstance(v, str))


def response_identifier(attrs: dict[str, Any], level: str, syntax: UID,
                        charset: str = UTF8) -> Dataset:
    """A C-FIND response identifier from stored DICOM JSON, in the Specific Character Set
    ``charset`` (:func:`answer_charset`; ``""``: the default repertoire), that always
    encodes: a value that does not fit its VR is sent as stored (IS, DS) or left out with a
    warning."""
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    clean = {tag: element for tag, element in attrs.items() if tag not in _NOT_RETURNED}
    try:
        ds = Dataset.from_json(clean)
        _set_charset(ds, charset)
        ds.QueryRetrieveLevel = level
        if _encodes(ds, implicit, little):
            return ds
    except Exception:  # noqa: BLE001 - some value is invalid: built element by element
        pass
    instance = str(((attrs.get("00080018") or {}).get("Value") or [""])[0])
    ds = Dataset()
    _set_charset(ds, charset)
    ds.QueryRetrieveLevel = level
    for tag, element in sorted(clean.items()):
        try:
            part = Dataset.from_json({tag: element})
            _set_charset(part, charset)
            if not _encodes(part, implicit, little):
                raise ValueError("not encodable")
            ds[int(tag, 16)] = part[int(tag, 16)]
            continue
        except Exception as exc:  # noqa: BLE001 - invalid stored value for its VR
            reason = type(exc).__name__
        vr = str(element.get("vr", "")) if isinstance(element, dict) else ""
        values = element.get("Value") if isinstance(element, dict) else None
        if vr in NUMBER_STRING_VRS and isinstance(values, list):
            raw = "\\".join(str(v) for v in values).encode("ascii", "replace")
            raw += b" " * (len(raw) % 2)
            ds[int(tag, 16)] = RawDataElement(Tag(int(tag, 16)), vr, len(raw), raw, 0,
                                              implicit, little)
            continue
        left_out(instance, tag, vr, reason)
    return ds


def _set_charset(ds: Dataset, charset: str) -> None:
    """Name ``charset`` as the Specific Character Set of ``ds`` (none for the default
    repertoire)."""
    if charset:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's association server, whose accepted connections wait for their peer at
    most the network timeout in any one read or write: a peer that stops in the middle of a
    PDU is let go (the connection closed) instead of holding its association, one of the
    server's limited number, and the server's shutdown, for ever. Their PDUs go out at once
    (TCP_NODELAY): a small data PDU after its command PDU otherwise waits for the peer's
    delayed acknowledgement, 40 ms for every C-GET sub-operation of a small instance."""

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection, with the network timeout on its reads and writes, and its
        small PDUs sent at once."""
        client, address = super().get_request()
        no_delay(client)
        if not isinstance(client, ssl.SSLSocket):  # TLS: set after the handshake
            client.settimeout(self.ae.network_timeout)
        return client, address


class _SharedPortServer(_AssociationServer):
    """An association server whose port other ImageShare processes share (SO_REUSEPORT):
    the kernel spreads new associations over the processes, so that they use every core."""

    def server_bind(self) -> None:
        """Set SO_REUSEPORT, then bind as usual."""
        assert self.socket is not None  # made by the constructor before it binds
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _file_meta(**kwargs: Any) -> Any:
    """pynetdicom's File Meta Information for a received data set, naming ImageShare's
    implementation."""
    kwargs["implementation_uid"] = IMPLEMENTATION_CLASS_UID
    kwargs["implementation_version"] = IMPLEMENTATION_VERSION_NAME
    return create_file_meta(**kwargs)


@dataclass(frozen=True)
class _NothingTaken:
    """The final answer to a C-MOVE whose destination answered its association but accepted
    none of the presentation contexts proposed (pynetdicom then aborts that association and
    would answer A801, Move Destination unknown, though the destination is known and
    answered): the handler's refusal, if it had one, else Failure A702 with every instance
    failed and listed (PS3.4 C.4.2.1.4.2, C.4.2.3.1)."""

    status: Dataset  # Status, Error Comment, Offending Element
    failed: tuple[str, ...]  # the Failed SOP Instance UID List
    count: int  # the Number of Failed Sub-operations


_MOVE_COMMENTS: weakref.WeakKeyDictionary[Any, dict[int, str | _NothingTaken]] = \
    weakref.WeakKeyDictionary()
_MOVE_COMMENTS_LOCK = threading.Lock()


def _move_comments(assoc: Any) -> dict[int, str | _NothingTaken]:
    """What the association's A801 answers get (by C-MOVE Message ID): an Error Comment, or
    a whole other answer when the destination took nothing. pynetdicom sends A801 on its
    own, with no comment, so its DIMSE sender is wrapped (once, see
    :func:`_responses_checked`) to add the one the C-MOVE handler chose."""
    with _MOVE_COMMENTS_LOCK:
        comments = _MOVE_COMMENTS.get(assoc)
        if comments is not None:
            return comments
        comments = _MOVE_COMMENTS[assoc] = {}
    _responses_checked(assoc, comments)
    return comments


# Statuses of a C-MOVE or C-GET response that may count the sub-operations not yet invoked:
# Pending (and Canceled, where they are the ones left undone).
_COUNTING_REMAINING = {0xFF00, 0xFF01, statuses.MOVE_CANCEL.code}


def _responses_checked(assoc: Any, comments: dict[int, str | _NothingTaken]) -> None:
    """Wrap the association's DIMSE sender (once) so that its C-MOVE and C-GET responses say
    what PS3.4 C.4.2.1.6 and C.4.3.1.3 ask: a final response (Success, Warning, Failure)
    has no Number of Remaining Sub-operations (pynetdicom sends the last pending one's 0
    again), and an A801 answer gets the Error Comment in ``comments`` for its Message ID,
    or is replaced by the answer there (:class:`_NothingTaken`)."""
    dimse = assoc.dimse
    if getattr(dimse, "_imageshare_checked", False):
        return
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        """Send ``primitive``, a final C-MOVE or C-GET response without a Remaining count
        and a C-MOVE A801 answer with its comment (or the answer that replaces it)."""
        reply: Any = primitive  # pynetdicom types ErrorComment as always None
        if isinstance(primitive, (C_MOVE, C_GET)) and reply.Status is not None:
            if isinstance(primitive, C_MOVE) and reply.Status == \
                    statuses.MOVE_DESTINATION_UNKNOWN.code and not reply.ErrorComment:
                comment = comments.pop(int(reply.MessageIDBeingRespondedTo or 0), "")
                if isinstance(comment, _NothingTaken):
                    _answer_nothing_taken(assoc, reply, comment, context_id)
                elif comment:
                    reply.ErrorComment = comment
            if int(reply.Status) not in _COUNTING_REMAINING:
                reply.NumberOfRemainingSuboperations = None
        send(primitive, context_id)

    dimse.send_msg = send_msg
    dimse._imageshare_checked = True


def _answer_nothing_taken(assoc: Any, reply: Any, answer: _NothingTaken,
                          context_id: int) -> None:
    """Make the A801 ``reply`` the final answer ``answer``: its status (with its Error
    Comment and Offending Element), the sub-operations counted as failed, and the failed
    instances listed in an Identifier in the C-MOVE context's transfer syntax."""
    reply.Status = int(answer.status.Status)
    for element in answer.status:
        if element.keyword != "Status" and hasattr(reply, element.keyword):
            setattr(reply, element.keyword, element.value)
    reply.NumberOfCompletedSuboperations = 0
    reply.NumberOfWarningSuboperations = 0
    reply.NumberOfFailedSuboperations = answer.count
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = list(answer.failed)
    syntax = next((UID(str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
                   if cx.context_id == context_id), ImplicitVRLittleEndian)
    encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    reply.Identifier = io.BytesIO(encoded or b"")


_UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
# The levels of the Patient Root and the Study Root information models, top first
# (PS3.4 C.6.1.1, C.6.2.1).
_PATIENT_ROOT_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_STUDY_ROOT_LEVELS = ("STUDY", "SERIES", "IMAGE")
# The query/retrieve SOP classes whose relational option (byte 1 of the Service Class
# Application Information, PS3.4 C.5.1.1, C.5.2.1, C.5.3.1) is accepted when proposed.
_RELATIONAL_MODELS = frozenset(str(uid) for uid in SCP_SOP_CLASSES
                                if str(uid).startswith("1.2.840.10008.5.1.4.1.2."))
_RELATIONAL: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()
_RELATIONAL_LOCK = threading.Lock()


def _on_sop_extended(event: Any) -> dict[UID, bytes]:
    """Answer SOP Class Extended Negotiation (PS3.7 D.3.3.5): relational-queries (C-FIND)
    and relational-retrieval (C-MOVE, C-GET) are accepted for the query/retrieve models when
    the requestor asks for them, every other option (combined date-time matching, fuzzy
    semantic matching of names, timezone adjustment, enhanced multi-frame conversion) is
    answered 0, not supported. The association remembers which models are relational."""
    answers: dict[UID, bytes] = {}
    relational = set()
    for uid, info in (getattr(event, "app_info", None) or {}).items():
        name = str(uid).strip()
        if name not in _RELATIONAL_MODELS or not info:
            continue
        wanted = info[0] == 1
        answers[UID(name)] = bytes([1 if wanted else 0]) + bytes(len(info) - 1)
        if wanted:
            relational.add(name)
    with _RELATIONAL_LOCK:
        _RELATIONAL[event.assoc] = frozenset(relational)
    return answers


def _relational(event: Any) -> bool:
    """Was the relational option negotiated for the request's information model?"""
    with _RELATIONAL_LOCK:
        models = _RELATIONAL.get(event.assoc, frozenset())
    return str(event.context.abstract_syntax).strip() in models


def hierarchy_refusal(identifier: Dataset, study_root: bool, relational: bool, what: str
                      ) -> tuple[str, int] | None:
    """Why a request identifier breaks the hierarchical (baseline) rules of PS3.4 C.4.1.2.1
    (C-FIND), C.4.2.2.1 (C-MOVE) and C.4.3.2.1 (C-GET): an Error Comment and the offending
    tag. Every level above the Query/Retrieve Level (within the model: a Study Root model
    has no PATIENT level) is named by one value of its unique key, without wildcards; a
    relational request (the option negotiated) need not. ``what`` is "query" or "retrieve".
    None when the identifier keeps the rules (or its level is checked elsewhere)."""
    if relational:
        return None
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    levels = _STUDY_ROOT_LEVELS if study_root else _PATIENT_ROOT_LEVELS
    if level not in levels:
        return None  # refused by the level checks, with their own reason
    for above in levels[:levels.index(level)]:
        keyword = _UNIQUE_KEYS[above]
        tag = Tag(keyword)
        named = f"{keyword} ({tag.group:04X},{tag.element:04X})"
        value = identifier.get(keyword)
        values = [] if value in (None, "") else (
            [value] if isinstance(value, str) else list(value))
        texts = [str(v).strip() for v in values]
        if not any(texts):
            article = "an" if level == "IMAGE" else "a"
            return f"Missing {named} for {article} {level} level {what}", int(tag)
        if len(texts) != 1 or "*" in texts[0] or "?" in texts[0]:
            return f"{named}: give one value, no wildcards", int(tag)
    return None


def _unsendable(inst: StoredInstance) -> Dataset:
    """A stand-in for an instance that cannot be read: its UIDs and no transfer syntax, so
    that pynetdicom fails its sub-operation (and lists its SOP Instance UID as failed)
    without sending anything."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_uid
    return ds


def _not_negotiated(event: Any) -> str:
    """Why a request was sent on a presentation context negotiated for another SOP class
    (its Affected SOP Class UID is not the context's abstract syntax: PS3.7 9.1, PS3.8
    7.1.1.13), as an Error Comment; "" when it was sent on its own. pynetdicom serves a
    request by its Affected SOP Class UID whatever the context, so a C-STORE of a SOP class
    the association never negotiated (on a Verification or another class's context) would
    otherwise be stored."""
    asked = str(getattr(event.request, "AffectedSOPClassUID", "") or "").strip()
    agreed = str(event.context.abstract_syntax).strip()
    if not asked or asked == agreed:
        return ""
    return NOT_NEGOTIATED


def _study_root(event: Any) -> bool:
    """Is the request on a Study Root model (FIND, MOVE or GET), which has no PATIENT level?"""
    return str(event.context.abstract_syntax).startswith("1.2.840.10008.5.1.4.1.2.2.")


def _same_host(registered: str, address: str) -> bool:
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(registered, None)}
    except OSError:
        return False



# -- received data sets -------------------------------------------------------------------------

_STAGING: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
_RECEIVED: weakref.WeakValueDictionary[str, _ReceivedFile] = weakref.WeakValueDictionary()
# The files each association is receiving into and has not yet handed to a C-STORE handler:
# what is left when its connection closes was cut off mid-transfer, and is removed then.
_UNCLAIMED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_UNCLAIMED_LOCK = threading.Lock()


def _claim(path: str, assoc: Any) -> _ReceivedFile | None:
    """Hand the received file ``path`` to the C-STORE handler (pynetdicom removes it after)."""
    with _UNCLAIMED_LOCK:
        _UNCLAIMED.get(assoc, set()).discard(path)
    return _RECEIVED.pop(path, None)


def _remove_cut_off(event: Any) -> None:
    """On a closed connection, remove what the association received only in part."""
    with _UNCLAIMED_LOCK:
        names = _UNCLAIMED.pop(event.assoc, set())
    for name in names:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as exc:  # left for the staging sweep
            log.warning("a partly received data set could not be removed: %s",
                        exc.strerror or type(exc).__name__)


class _ReceivedFile:
    """The file pynetdicom writes a received data set to (in place of its NamedTemporaryFile):
    in the listener's staging folder, and a write that fails (a full disk) is remembered
    instead of raised, so that the C-STORE is answered "out of resources" rather than the
    association being aborted with no status. The space is given back at once."""

    def __init__(self, folder: Path, assoc: Any = None) -> None:
        fd, self.name = tempfile.mkstemp(dir=folder, prefix=owned_prefix(), suffix=".dcm")
        self._raw = os.fdopen(fd, "wb", buffering=0)
        self.error: OSError | None = None
        _RECEIVED[self.name] = self
        if assoc is not None:
            with _UNCLAIMED_LOCK:
                _UNCLAIMED.setdefault(assoc, set()).add(self.name)

    @property
    def file(self) -> _ReceivedFile:
        """pynetdicom flushes ``.file``."""
        return self

    def write(self, data: bytes) -> int:
        """Write all of ``data`` unless a write failed before; never raises."""
        view = memoryview(data)
        while view and self.error is None:
            try:
                view = view[self._raw.write(view) or 0:]
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        """Unbuffered: nothing to do."""

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        try:
            self._raw.truncate(0)
        except OSError:
            pass

    def close(self) -> None:
        """Close the file (it stays on disk for the handler)."""
        try:
            self._raw.close()
        except OSError as exc:
            self.error = self.error or exc


def _received_file(*_args: Any, **_kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm"), made in the
    staging folder of the listener whose association is receiving (this runs in its thread).
    If even creating the file fails, an already failed stand-in keeps the association alive."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    folder = _STAGING.get(getattr(assoc, "ae", None)) or Path(tempfile.gettempdir())
    try:
        return _ReceivedFile(folder, assoc)
    except OSError as exc:
        return _FailedFile(folder, exc)


class _FailedFile(_ReceivedFile):
    """A received data set that could not even be given a file: everything is dropped."""

    def __init__(self, folder: Path, error: OSError) -> None:
        self.name = str(folder / f"unwritable-{id(self):x}.dcm")
        self.error = error
        _RECEIVED[self.name] = self

    def write(self, data: bytes) -> int:
        """Drop ``data``."""
        return len(data)

    def close(self) -> None:
        """Nothing is open."""
