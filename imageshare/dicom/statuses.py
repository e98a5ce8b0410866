"""The DIMSE statuses ImageShare answers, per service: one table (PS3.4 Annex B and C,
PS3.7 Annex C), used by the listener and listed in the conformance statement.

Refusals use the codes each service defines, so that peers such as DCMTK name them; every
refusal that pynetdicom lets us comment on carries an Error Comment saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from imageshare.archive.dicom_json import error_comment


@dataclass(frozen=True)
class DimseStatus:
    """One status of one service: its code, category, the standard's name and when
    ImageShare answers it."""

    service: str
    code: int
    category: str
    meaning: str
    when: str

    def dataset(self, comment: str = "", offending: int | None = None) -> Dataset:
        """The status as a data set, with an Error Comment (at most 64 characters, cut at a
        word) and the tag of the Offending Element (0000,0901) when one is named."""
        ds = Dataset()
        ds.Status = self.code
        if comment:
            ds.ErrorComment = error_comment(comment)
        if offending is not None:
            ds.OffendingElement = [offending]
        return ds


def _status(service: str, code: int, category: str, meaning: str, when: str) -> DimseStatus:
    return DimseStatus(service, code, category, meaning, when)


ECHO_SUCCESS = _status("C-ECHO", 0x0000, "Success", "Success", "the association may echo")
ECHO_NOT_AUTHORISED = _status(
    "C-ECHO", 0x0124, "Failure", "Refused: Not Authorized",
    "the calling AE title may not use the listener")

STORE_SUCCESS = _status("C-STORE", 0x0000, "Success", "Success",
                        "the instance is fsynced and indexed, or was already stored: the same "
                        "data set (the File Meta Information is not compared), or the same "
                        "attributes in another transfer syntax (pixels compared when they "
                        "decode here within 32 MiB); the stored copy is kept")
STORE_DUPLICATE = _status(
    "C-STORE", 0x0111, "Failure", "Duplicate SOP Instance (PS3.7 C)",
    "an instance with this SOP Instance UID but other content is stored: the stored copy is "
    "kept, nothing of the new one (Error Comment 'stored copy kept: this UID is stored with "
    "other content'; audited)")
STORE_NOT_AUTHORISED = _status(
    "C-STORE", 0x0124, "Failure", "Refused: Not Authorized",
    "the calling AE title may not store here")
STORE_OUT_OF_RESOURCES = _status(
    "C-STORE", 0xA700, "Failure", "Refused: Out of Resources",
    "the archive could not store the instance (storage or index unavailable)")
STORE_CONFLICT = _status(
    "C-STORE", 0xA910, "Failure", "Error: Data Set does not match (conflict with stored data)",
    "the study belongs to another patient, or the instance is stored in another series")
STORE_CLASS_MISMATCH = _status(
    "C-STORE", 0xA900, "Failure", "Error: Data Set does not match SOP Class",
    "the data set's SOP Class UID is not the request's Affected SOP Class UID; nothing is "
    "stored (audited as a refusal)")
STORE_CLASS_NOT_NEGOTIATED = _status(
    "C-STORE", 0x0122, "Failure", "Refused: SOP Class not supported (PS3.7 C)",
    "the request's Affected SOP Class UID is not the abstract syntax of the presentation "
    "context it was sent on (a SOP class the association did not negotiate); nothing is "
    "stored (Error Comment 'the SOP class was not negotiated on this presentation context')")
STORE_CANNOT_UNDERSTAND = _status(
    "C-STORE", 0xC000, "Failure", "Error: Cannot understand",
    "the data set cannot be parsed, lacks a required UID, or its pixel data is damaged; or "
    "its SOP Instance UID is not the request's Affected SOP Instance UID (Error Comment "
    "names the mismatch; nothing is stored)")

FIND_PENDING = _status("C-FIND", 0xFF00, "Pending", "Pending: Matches are continuing",
                       "one per match")
FIND_SUCCESS = _status("C-FIND", 0x0000, "Success", "Success", "every match was sent")
FIND_TOO_MANY = _status(
    "C-FIND", 0xA700, "Failure", "Refused: Out of Resources",
    "there are more matches than one answer holds (IMAGESHARE_QIDO_MAX_LIMIT): that many "
    "were sent as pending responses, the rest were not (Error Comment 'more than N matches; "
    "narrow the query'); or, with no match sent, matching the keys would read the stored "
    "headers of more than ten times that many instances (Error Comment says to narrow it "
    "with a patient, study or series)")
FIND_CANCEL = _status("C-FIND", 0xFE00, "Cancel", "Matching terminated due to Cancel",
                      "the peer sent C-CANCEL")
FIND_IDENTIFIER_MISMATCH = _status(
    "C-FIND", 0xA900, "Failure", "Identifier does not match SOP Class",
    "unknown Query/Retrieve Level, a key below the level, a malformed number, or a date or "
    "time key that is malformed or names no real date or time (month 13, hour 25); the "
    "Error Comment names the attribute and the reason. Also, with dicom_strict_hierarchy, "
    "a hierarchical query (no relational-queries negotiated) at SERIES or IMAGE level, or "
    "at STUDY level of the Patient Root model, without one value (no wildcard) of the "
    "unique key of every level above (PS3.4 C.4.1.2.1): the Error Comment names it "
    "('Missing StudyInstanceUID (0020,000D) for a SERIES level query') and so does the "
    "Offending Element")
FIND_CLASS_NOT_NEGOTIATED = _status(
    "C-FIND", 0x0122, "Failure", "Refused: SOP Class not supported (PS3.7 C)",
    "the request's Affected SOP Class UID (its information model) is not the abstract "
    "syntax of the presentation context it was sent on; nothing is matched")
FIND_NOT_AUTHORISED = _status(
    "C-FIND", 0xC001, "Failure", "Unable to process (refused: not authorised)",
    "the calling AE title is not registered for queries (or not from its host)")
FIND_UNABLE = _status(
    "C-FIND", 0xC000, "Failure", "Unable to process",
    "the index could not answer (Error Comment says so; no details)")

MOVE_PENDING = _status("C-MOVE", 0xFF00, "Pending", "Sub-operations are continuing",
                       "before each instance is sent")
MOVE_SUCCESS = _status("C-MOVE", 0x0000, "Success", "Sub-operations complete, no failures",
                       "every instance was stored by the destination")
MOVE_WARNING = _status("C-MOVE", 0xB000, "Warning",
                       "Sub-operations complete, one or more failures",
                       "the destination refused some instances, or their stored files could "
                       "not be read (failed UIDs listed; the others are still sent)")
MOVE_CANCEL = _status("C-MOVE", 0xFE00, "Cancel", "Sub-operations terminated due to Cancel",
                      "the peer sent C-CANCEL")
MOVE_SUB_OPERATIONS_FAILED = _status(
    "C-MOVE", 0xA702, "Failure", "Refused: Out of Resources - Unable to perform sub-operations",
    "every sub-operation failed: the destination refused every instance, or took none of "
    "their SOP classes (failed UIDs listed; pynetdicom's final status); also when it "
    "answered the association but accepted none of the contexts proposed (every instance "
    "counted failed and listed, Error Comment 'destination accepted none of the SOP "
    "classes/syntaxes offered')")
MOVE_DESTINATION_UNKNOWN = _status(
    "C-MOVE", 0xA801, "Failure", "Refused: Move Destination unknown",
    "the Move Destination is not a registered node (Error Comment 'destination AE title not "
    "registered'), or does not answer or rejects the association (Error Comment 'destination "
    "did not accept the association'), or a site registered as one this archive does not "
    "send to, asked for by another AE (Error Comment 'destination does not receive from this "
    "archive')")
MOVE_TOO_MANY = _status(
    "C-MOVE", 0xA701, "Failure",
    "Refused: Out of Resources - Unable to calculate number of matches",
    "more instances match than a C-MOVE response can count (65,535): retrieve by study or "
    "series (Error Comment gives the number)")
MOVE_IDENTIFIER_MISMATCH = _status(
    "C-MOVE", 0xA900, "Failure", "Identifier does not match SOP Class",
    "unknown Query/Retrieve Level, PATIENT level on a Study Root model, or missing unique "
    "keys: the level's own, or (with dicom_strict_hierarchy, no relational-retrieval "
    "negotiated) one value of the unique "
    "key of every level above (PS3.4 C.4.2.2.1); the Error Comment "
    "and the Offending Element name it")
MOVE_CLASS_NOT_NEGOTIATED = _status(
    "C-MOVE", 0x0122, "Failure", "Refused: SOP Class not supported (PS3.7 C)",
    "the request's Affected SOP Class UID (its information model) is not the abstract "
    "syntax of the presentation context it was sent on; nothing is sent")
MOVE_NOT_AUTHORISED = _status(
    "C-MOVE", 0xC514, "Failure", "Unable to process (refused: not authorised)",
    "the calling AE title is not registered for retrieval (pynetdicom gives no Error Comment "
    "before a destination is chosen)")

GET_PENDING = _status("C-GET", 0xFF00, "Pending", "Sub-operations are continuing",
                      "before each instance is sent")
GET_SUCCESS = _status("C-GET", 0x0000, "Success", "Sub-operations complete, no failures",
                      "every instance was stored by the requester")
GET_WARNING = _status("C-GET", 0xB000, "Warning", "Sub-operations complete, one or more failures",
                      "the requester refused some instances, or their stored files could not "
                      "be read (failed UIDs listed; the others are still sent)")
GET_CANCEL = _status("C-GET", 0xFE00, "Cancel", "Sub-operations terminated due to Cancel",
                     "the peer sent C-CANCEL")
GET_SUB_OPERATIONS_FAILED = _status(
    "C-GET", 0xA702, "Failure", "Refused: Out of Resources - Unable to perform sub-operations",
    "every sub-operation failed: the requester refused every instance, or accepted no "
    "context (with the SCP role) for their SOP classes (failed UIDs listed; pynetdicom's "
    "final status)")
GET_TOO_MANY = _status(
    "C-GET", 0xA701, "Failure",
    "Refused: Out of Resources - Unable to calculate number of matches",
    "more instances match than a C-GET response can count (65,535): retrieve by study or "
    "series (Error Comment gives the number)")
GET_IDENTIFIER_MISMATCH = _status(
    "C-GET", 0xA900, "Failure", "Identifier does not match SOP Class",
    "unknown Query/Retrieve Level, PATIENT level on a Study Root model, or missing unique "
    "keys: the level's own, or (with dicom_strict_hierarchy, no relational-retrieval "
    "negotiated) one value of the unique "
    "key of every level above (PS3.4 C.4.3.2.1); the Error Comment "
    "and the Offending Element name it")
GET_CLASS_NOT_NEGOTIATED = _status(
    "C-GET", 0x0122, "Failure", "Refused: SOP Class not supported (PS3.7 C)",
    "the request's Affected SOP Class UID (its information model) is not the abstract "
    "syntax of the presentation context it was sent on; nothing is sent")
GET_NOT_AUTHORISED = _status(
    "C-GET", 0xC001, "Failure", "Unable to process (refused: not authorised)",
    "the calling AE title is not registered for retrieval (or not from its host)")

STATUSES: tuple[DimseStatus, ...] = (
    ECHO_SUCCESS, ECHO_NOT_AUTHORISED,
    STORE_SUCCESS, STORE_NOT_AUTHORISED, STORE_OUT_OF_RESOURCES, STORE_CONFLICT,
    STORE_DUPLICATE, STORE_CLASS_MISMATCH, STORE_CLASS_NOT_NEGOTIATED,
    STORE_CANNOT_UNDERSTAND,
    FIND_PENDING, FIND_SUCCESS, FIND_CANCEL, FIND_IDENTIFIER_MISMATCH,
    FIND_CLASS_NOT_NEGOTIATED, FIND_NOT_AUTHORISED,
    FIND_UNABLE, FIND_TOO_MANY,
    MOVE_PENDING, MOVE_SUCCESS, MOVE_WARNING, MOVE_CANCEL, MOVE_SUB_OPERATIONS_FAILED,
    MOVE_DESTINATION_UNKNOWN, MOVE_TOO_MANY, MOVE_IDENTIFIER_MISMATCH,
    MOVE_CLASS_NOT_NEGOTIATED, MOVE_NOT_AUTHORISED,
    GET_PENDING, GET_SUCCESS, GET_WARNING, GET_CANCEL, GET_SUB_OPERATIONS_FAILED,
    GET_TOO_MANY, GET_IDENTIFIER_MISMATCH, GET_CLASS_NOT_NEGOTIATED, GET_NOT_AUTHORISED,
)
