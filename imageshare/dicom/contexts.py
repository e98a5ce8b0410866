"""Presentation contexts: what the listener accepts, and what to propose when sending stored
instances. The conformance statement is generated from these tables."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.uid import (
    RE_VALID_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, acse, build_context
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_unrestricted,
)
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
    uid_to_service_class,
)

from imageshare import __version__
from imageshare.archive.transcode import (
    CONVERSION_TARGETS,
    can_encode,
    can_produce,
    is_known_syntax,
)

MAX_CONTEXTS = 128
# Who ImageShare is on the wire (A-ASSOCIATE-RQ/AC, PS3.7 D.3.3.2) and in the File Meta
# Information of the files its listener writes (PS3.10 7.1): a fixed UID under the root of
# the UIDs ImageShare generates (pydicom's), and "IMAGESHARE_<major><minor>".
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.10091129315452597871770911711567289866")
IMPLEMENTATION_VERSION_NAME = "IMAGESHARE_" + "".join(__version__.split(".")[:2])
# Transfer syntaxes the listener accepts for verification and query/retrieve.
LISTENER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
# SOP classes the listener serves as SCP besides storage (which takes every storage SOP class,
# private ones included, in the transfer syntax the sender proposes first: see
# is_storage_sop_class).
SCP_SOP_CLASSES = (
    Verification,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)


# UIDs the DICOM Standard assigns all start so; PS3.6 registers its Storage SOP Classes
# (those of today and those to come) under the second.
DICOM_UID_ROOT = "1.2.840.10008."
STORAGE_SOP_CLASS_ARC = "1.2.840.10008.5.1.4.1.1."
# How the listener tells a storage SOP class it has never heard of from a service it does not
# offer (for the conformance statement).
STORAGE_RECOGNITION = (
    "Storage: a proposed abstract syntax is taken as a storage SOP class (and accepted in the "
    "first transfer syntax the sender proposes that is one of the standard's, under "
    "`1.2.840.10008.1.2`; a context proposing only private transfer syntaxes is rejected with "
    "result 4, transfer syntaxes not supported, as an instance sent in one could not be read) "
    "when it is a valid UID and either a standard storage SOP class (retired and trial ones "
    "too, such as the retired Ultrasound Image Storage `1.2.840.10008.5.1.4.1.1.6` older "
    "scanners send), a standard UID not known here under `1.2.840.10008.5.1.4.1.1` (the arc "
    "where PS3.6 registers new storage SOP classes), or a private UID (outside `1.2.840.10008`:"
    " a private storage SOP class cannot be told from other private UIDs, so every private UID "
    "is accepted, and only C-STORE is served on it). Every other abstract syntax is rejected "
    "with result 3, abstract syntax not supported: Modality Worklist, Modality Performed "
    "Procedure Step, Storage Commitment, Print, Instance Availability Notification, the "
    "query/retrieve models not listed above, non-patient objects (Hanging Protocol, Color "
    "Palette, Implant Templates), and unknown standard UIDs outside the storage arc."
)


def is_storage_sop_class(uid: str) -> bool:
    """Is ``uid``, proposed as an abstract syntax, taken as a storage SOP class (see
    ``STORAGE_RECOGNITION``)? A valid UID outside the DICOM root (private), a storage SOP
    class pynetdicom knows, or a standard UID pynetdicom does not know under the storage arc
    that pydicom does not name as something else."""
    if len(uid) > 64 or not RE_VALID_UID.match(uid):  # (checked before UID() warns)
        return False
    syntax = UID(uid)
    if not syntax.startswith(DICOM_UID_ROOT):
        return True
    service = uid_to_service_class(syntax)
    if service is StorageServiceClass:
        return True
    if service is not ServiceClass or not syntax.startswith(STORAGE_SOP_CLASS_ARC):
        return False  # another service (worklist, commitment, print, ...) or not storage
    # Retired and trial storage classes (pynetdicom serves them as no service at all):
    # ``UltrasoundImageStorageRetired``, ``VLImageStorageTrial``, ...
    keyword = syntax.keyword.removesuffix("Retired").removesuffix("Trial")
    return not syntax.keyword or keyword.endswith("Storage")


def negotiate_listener_contexts(
    rq_contexts: Sequence[PresentationContext],
    ac_contexts: Sequence[PresentationContext],
    roles: dict[UID, tuple[bool | None, bool | None]] | None = None,
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """The listener's answer to proposed presentation contexts: the supported ones
    (verification, query/retrieve) negotiated as usual, every storage SOP class
    (``is_storage_sop_class``) accepted in the first transfer syntax of the standard the sender
    proposed (result 4 when it proposed none: ``_readable_storage_contexts``), and every other
    abstract syntax rejected as not supported (result 3).

    It replaces pynetdicom's ``negotiate_unrestricted``, which takes every abstract syntax it
    has no name for (Modality Worklist FIND among them, made-up standard UIDs too) as storage.
    """
    supported = {str(cx.abstract_syntax) for cx in ac_contexts}
    proposed_storage = [cx for cx in rq_contexts
                        if str(cx.abstract_syntax) not in supported
                        and is_storage_sop_class(str(cx.abstract_syntax))]
    taken = {id(cx) for cx in proposed_storage}
    others = [cx for cx in rq_contexts if id(cx) not in taken]
    results, replies = negotiate_as_acceptor(others, list(ac_contexts), roles)
    storage, unreadable = _readable_storage_contexts(proposed_storage)
    results += unreadable
    stored, stored_replies = negotiate_unrestricted(storage, [], roles)
    proposed = {cx.context_id: cx for cx in storage}
    for cx in stored:
        wanted = (roles or {}).get(UID(str(cx.abstract_syntax)))
        if wanted and wanted[1] and not wanted[0]:  # C-GET: the requestor only receives
            cx.transfer_syntax = [retrieval_syntax(proposed[cx.context_id].transfer_syntax)]
    return (sorted([*results, *stored], key=lambda cx: int(cx.context_id or 0)),
            sorted([*replies, *stored_replies], key=lambda item: str(item.sop_class_uid)))


# Where PS3.6 registers transfer syntaxes: every one not named here (a newer one) encodes
# its data set in Explicit VR Little Endian (PS3.5 A.4), so its header can be read.
STANDARD_SYNTAX_ARC = "1.2.840.10008.1.2."


def is_standard_syntax(uid: str) -> bool:
    """Is ``uid`` a transfer syntax of the standard: one pydicom knows, or a newer one under
    the standard's transfer syntax arc? Private syntaxes are not."""
    if len(uid) > 64 or not RE_VALID_UID.match(uid):  # (checked before UID() warns)
        return False
    return uid.startswith(STANDARD_SYNTAX_ARC) or is_known_syntax(uid)


def _readable_storage_contexts(
    proposed: Sequence[PresentationContext],
) -> tuple[list[PresentationContext], list[PresentationContext]]:
    """The proposed storage contexts split into (copies holding only the transfer syntaxes
    of the standard, in the sender's order; the contexts proposing none of those, rejected
    with result 4, transfer syntaxes not supported). A sender proposing a private syntax
    first (say GE's ``1.2.840.113619.5.2``) and Implicit VR Little Endian after it gets the
    latter: in the private one, nothing it sent could be read."""
    readable: list[PresentationContext] = []
    rejected: list[PresentationContext] = []
    for rq in proposed:
        known: list[str | bytes | UID] = [
            syntax for syntax in rq.transfer_syntax if is_standard_syntax(str(syntax))]
        cx = PresentationContext()
        cx.context_id = rq.context_id
        cx.abstract_syntax = rq.abstract_syntax
        if known:
            cx.transfer_syntax = known
            readable.append(cx)
        else:
            cx.transfer_syntax = list(rq.transfer_syntax[:1])
            cx.result = 0x04
            rejected.append(cx)
    return readable, rejected


def retrieval_syntax(proposed: Sequence[str]) -> UID:
    """The transfer syntax to accept, of those a C-GET requestor proposed for a storage SOP
    class in which it takes the SCP role (it only receives there): the first one every
    stored instance can be sent in (uncompressed, or a lossless one that is encoded here),
    so that an instance stored in another syntax is converted rather than failed; the
    requestor's first when it proposed none of those (only instances stored in that syntax
    can then be sent). The requestor's first would be taken for storage (instances are kept
    as received), but a requestor preferring lossy JPEG would then get no instance stored
    uncompressed, though it proposed uncompressed syntaxes too."""
    for syntax in proposed:
        if can_encode(str(syntax)):
            return UID(str(syntax))
    return UID(str(proposed[0]))


def restrict_unrestricted_storage() -> None:
    """Make pynetdicom's unrestricted storage service (``_config.UNRESTRICTED_STORAGE_SERVICE``)
    answer with ``negotiate_listener_contexts``: storage SOP classes of every kind, but no
    other service the listener does not offer. Process-wide, like that setting; idempotent."""
    acse.negotiate_unrestricted = negotiate_listener_contexts


def storage_contexts_for(pairs: set[tuple[str, str]], converted: bool = False
                         ) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), then, while there is room, an
    uncompressed fallback per SOP class, within the 128 contexts an association may propose:
    every pair gets its own context before any fallback takes a place (a study of more than
    64 pairs is sent whole as long as it has at most 128).

    With ``converted`` (instances are converted for the receiver when it takes neither their
    stored syntax nor an uncompressed one: C-MOVE sub-operations), then also one context per
    SOP class proposing every other syntax its instances can be converted to here (deflated,
    big endian, RLE, JPEG-LS Lossless, JPEG 2000 Lossless): a receiver that takes only, say,
    JPEG 2000 Lossless gets the instances in it (PS3.4 C.4.2.3.1 lets the SCP choose the
    encoding by what the C-STORE association accepted) instead of accepting nothing."""
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    wanted = [(sop_class, (syntax,) if syntax not in uncompressed else uncompressed)
              for sop_class, syntax in sorted(pairs)]
    classes = sorted({c for c, _s in pairs})
    fallbacks = [(sop_class, uncompressed) for sop_class in classes]
    conversions: list[tuple[str, tuple[str, ...]]] = []
    for sop_class in classes if converted else ():
        stored = {s for c, s in pairs if c == sop_class}
        targets = tuple(t for t in CONVERSION_TARGETS if t not in uncompressed
                        and any(can_produce(s, t) for s in stored if s != t))
        if targets:
            conversions.append((sop_class, targets))
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, syntaxes in wanted + fallbacks + conversions:
        if (sop_class, syntaxes) not in seen and len(contexts) < MAX_CONTEXTS:
            seen.add((sop_class, syntaxes))
            contexts.append(build_context(sop_class, list(syntaxes)))
    return contexts


def identify(ae: AE) -> AE:
    """Give the pynetdicom AE ``ae`` ImageShare's Implementation Class UID and Version Name
    (in place of pynetdicom's own); returns ``ae``."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
