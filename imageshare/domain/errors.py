"""Typed errors whose messages are fit to show to the user (never patient data for anonymous users).

The one error catalogue: each class carries its HTTP status and title (the web layer's one
exception handler turns them into RFC 9457 problem details) and, where a DICOM service
answers it, its DICOM status (a code of the table in :mod:`imageshare.dicom.statuses` or a
STOW-RS Failure Reason; a plain int here so that the domain imports no DICOM library).
"""

from __future__ import annotations


class ImageShareError(Exception):
    """Base of every error ImageShare reports on purpose."""

    http_status = 400
    title = "Bad request"
    # The DIMSE status (or STOW-RS Failure Reason) of a refusal for this reason; None when
    # no DICOM service answers it.
    dicom_status: int | None = None


class ConfigurationError(ImageShareError):
    """A setting or configuration file is wrong."""

    title = "Configuration error"


class _AboutAnInstance(ImageShareError):
    """An error about one received instance, carrying its UIDs when they could be read."""

    def __init__(self, message: str, sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


class InvalidInstance(_AboutAnInstance):
    """Received bytes are not a storable DICOM instance."""

    title = "Invalid DICOM instance"
    dicom_status = 0xC000  # Error: Cannot understand


class WrongStudy(InvalidInstance):
    """The instance belongs to another study than the one it was sent to."""

    dicom_status = 0xA900  # Error: Data Set does not match SOP Class (STOW-RS)


class ConflictingInstance(_AboutAnInstance):
    """The instance contradicts what the archive already holds (e.g. study of another patient)."""

    http_status = 409
    title = "Conflict with stored data"
    dicom_status = 0xA910  # Error: Data Set does not match (conflict)


class NotFound(ImageShareError):
    """The resource does not exist, or the caller may not know it exists."""

    http_status = 404
    title = "Not found"


class NotAuthenticated(ImageShareError):
    """The caller did not prove who they are."""

    http_status = 401
    title = "Authentication required"


class Forbidden(ImageShareError):
    """The caller is known but may not do this."""

    http_status = 403
    title = "Forbidden"


class InvalidQuery(ImageShareError):
    """A search request cannot be understood."""

    title = "Invalid query"
    dicom_status = 0xA900  # Identifier does not match SOP Class


class UnsupportedParameter(ImageShareError):
    """A request parameter the server does not carry out (e.g. WADO-URI ``anonymize``): refused
    rather than ignored, so that nobody takes the answer for what they asked (PS3.18: 400)."""

    title = "Unsupported parameter"


class NotAcceptable(ImageShareError):
    """The requested representation cannot be produced."""

    http_status = 406
    title = "Not acceptable"


class UnknownNode(ImageShareError):
    """A DICOM node (AE title) is not registered."""

    http_status = 404
    title = "Unknown DICOM node"


class TooManyRequests(ImageShareError):
    """The caller must slow down (too many failed sign-ins)."""

    http_status = 429
    title = "Too many requests"


class OutOfResources(ImageShareError):
    """The archive cannot take more data now (its disk is full or below the free-space floor);
    nothing was stored."""

    http_status = 507
    title = "Insufficient storage"
    dicom_status = 0xA700  # Refused: Out of Resources


class QueryTooBroad(OutOfResources):
    """A search that would read more than the archive reads for one answer: narrow it."""

    http_status = 413  # PS3.18 search: the query is too broad
    title = "Query too broad"


class AuditUnavailable(ImageShareError):
    """The audit trail cannot be written, so nothing that must be audited is done."""

    http_status = 503
    title = "Audit trail unavailable"


class UnknownAuditEvent(ImageShareError):
    """An audit event whose action is not in the catalogue (``imageshare/audit/events.py``)."""

    http_status = 500
    title = "Unknown audit event"


class UndecodableImage(InvalidInstance):
    """The pixels of an instance cannot be decoded (no codec, damaged, unreadable size)."""

    http_status = 422
    title = "Image cannot be decoded"


class ImageTooLarge(UndecodableImage):
    """An image whose decoded pixels would exceed the configured budget (a decompression bomb
    or simply too big); refused before anything is decoded."""

    title = "Image too large to decode"


class PayloadTooLarge(ImageShareError):
    """A request body (or its number of parts) is over a configured limit."""

    http_status = 413
    title = "Request too large"


class ServiceBusy(ImageShareError):
    """The server is at a configured limit of concurrent work; the caller may retry."""

    http_status = 503
    title = "Busy"


class StorageError(ImageShareError):
    """The blob store could not keep or give bytes (unreachable, refused, or not intact)."""

    http_status = 503
    title = "Storage unavailable"


class PublicUrlMissing(ImageShareError):
    """A link for an e-mail is due but IMAGESHARE_PUBLIC_URL is not set (links are never
    built from a request's Host header)."""

    http_status = 409
    title = "Public address not set"


class LinkGone(ImageShareError):
    """The link expired, was revoked or is locked: the recipient is told only that."""

    http_status = 410
    title = "Link no longer valid"


class SiteUnreachable(ImageShareError):
    """The site did not answer (connection refused, timed out, association rejected)."""

    http_status = 502
    title = "Site unreachable"


class UnsupportedMediaType(ImageShareError):
    """A request body is of a media type this route does not take."""

    http_status = 415
    title = "Unsupported media type"


class UploadOffsetMismatch(ImageShareError):
    """A resumable upload's chunk does not start where the received bytes end (tus 409)."""

    http_status = 409
    title = "Upload offset mismatch"


class UploadQuotaExceeded(ImageShareError):
    """An upload would take an invitation (or a file) past its size limit."""

    http_status = 413
    title = "Upload too large"


class DeletionRefused(ImageShareError):
    """A deletion that a legal hold or the images' retention class does not allow yet."""

    http_status = 409
    title = "Kept by retention rules"


class ConsentMissing(ImageShareError):
    """A use of identifiable images the patient has not consented to (or withdrew from)."""

    http_status = 403
    title = "No consent recorded"
