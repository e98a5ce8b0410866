"""The catalogue of audit events: every action ImageShare records, its fields and its ATNA form.

Each entry names one action string (``study.retrieve``, ``session.start`` ...), what it means,
the ``detail`` fields it carries, and how it is written as a DICOM PS3.15 A.5 audit message
(IHE ITI ATNA): the EventID and EventTypeCode (DCM codes of CID 400 / CID 401), the
EventActionCode (C, R, U, D, E) and the participant objects it names (patient, study, user,
node, ...). :meth:`imageshare.audit.trail.AuditTrail.record` refuses an action that is not in
the catalogue, and ``docs/audit-events.md`` is generated from it (``imageshare audit events``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActionCode = Literal["C", "R", "U", "D", "E"]


@dataclass(frozen=True)
class Code:
    """A coded value as the audit schema writes it (csd-code, codeSystemName, originalText)."""

    code: str
    system: str
    meaning: str

    def __str__(self) -> str:
        return f"({self.code}, {self.system}, \"{self.meaning}\")"


# DICOM CID 400 Audit Event ID.
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
EXPORT = Code("110106", "DCM", "Export")
IMPORT = Code("110107", "DCM", "Import")
ORDER_RECORD = Code("110109", "DCM", "Order Record")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

# DICOM CID 401 Audit Event Type Code.
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "DCM", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = Code("110136", "DCM", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User security Attributes Changed")

ObjectKind = Literal["patient", "study", "user", "node", "share", "query", "audit-log", "job",
                     "case", "request", "token"]


@dataclass(frozen=True)
class ParticipantObjectType:
    """How one kind of participant object is identified in an ATNA message."""

    kind: ObjectKind
    type_code: str            # ParticipantObjectTypeCode: 1 person, 2 system object, ...
    role: str                 # ParticipantObjectTypeCodeRole (PS3.15 A.5.1.2.2)
    id_type: Code             # ParticipantObjectIDTypeCode
    source: str               # where the object's ID comes from in the audit row


# The query of a Query message is a system object (2) in the role of a report (3), identified
# by the SOP Class UID queried (PS3.15 A.5.3.12); 24 (query) is RFC 3881's, which IHE's own
# transactions use but a DICOM Query message does not.
PARTICIPANT_OBJECTS: dict[str, ParticipantObjectType] = {p.kind: p for p in (
    ParticipantObjectType("patient", "1", "1", Code("2", "RFC-3881", "Patient Number"),
                          "patient_id with its issuer (detail.patient_issuer) as HL7 CX: "
                          "ID^^^NAMESPACE, or ID^^^&OID&ISO; the issuer also in "
                          "ParticipantObjectDetail IssuerOfPatientID"),
    ParticipantObjectType("study", "2", "3", Code("110180", "DCM", "Study Instance UID"),
                          "study_uid"),
    ParticipantObjectType("user", "1", "11", Code("11", "RFC-3881", "User Identifier"),
                          "detail.username / detail.user"),
    ParticipantObjectType("node", "2", "13", Code("110182", "DCM", "Node ID"),
                          "detail.ae_title / detail.calling_ae / detail.site"),
    ParticipantObjectType("share", "2", "13", Code("share", "IMAGESHARE", "Share link"),
                          "detail.share"),
    ParticipantObjectType("query", "2", "3", Code("110181", "DCM", "SOP Class UID"),
                          "detail (the query, base64 in ParticipantObjectQuery)"),
    ParticipantObjectType("audit-log", "2", "13", Code("12", "RFC-3881", "URI"),
                          "the audit trail's URI"),
    ParticipantObjectType("job", "2", "20", Code("job", "IMAGESHARE", "Job"),
                          "detail.job"),
    ParticipantObjectType("case", "2", "3", Code("case", "IMAGESHARE", "Teaching case"),
                          "detail.case"),
    ParticipantObjectType("request", "2", "3", Code("request", "IMAGESHARE",
                                                    "Imaging request"),
                          "detail.request"),
    ParticipantObjectType("token", "2", "13", Code("token", "IMAGESHARE", "API token"),
                          "detail.token / detail.name"),
)}


@dataclass(frozen=True)
class EventType:
    """One action the audit trail records, with its fields and its ATNA mapping."""

    action: str
    description: str
    event_id: Code
    action_code: ActionCode
    objects: tuple[ObjectKind, ...] = ()
    fields: tuple[str, ...] = ()
    event_type: Code | None = None


# The EventActionCode each audit message may carry (PS3.15 A.5.3, one table per EventID): a
# Security Alert, a User Authentication, a Query, the beginning of a transfer and an
# application's activity are executions; a Study Deleted is a deletion, an Export a read, an
# Import a creation. A repository that files events by these pairs (a deletion counted per
# 110105 + D, ...) would miscount any other pairing.
ACTION_CODES: dict[str, str] = {
    APPLICATION_ACTIVITY.code: "E", AUDIT_LOG_USED.code: "R", BEGIN_TRANSFERRING.code: "E",
    INSTANCES_ACCESSED.code: "CRUD", INSTANCES_TRANSFERRED.code: "CRU",
    STUDY_DELETED.code: "D", EXPORT.code: "R", IMPORT.code: "C", ORDER_RECORD.code: "CRUD",
    PATIENT_RECORD.code: "CRUD", QUERY.code: "E", SECURITY_ALERT.code: "E",
    USER_AUTHENTICATION.code: "E",
}
# Events whose EventTypeCode is mandatory, and the codes it may take (None: any of CID 401).
EVENT_TYPES_REQUIRED: dict[str, tuple[str, ...] | None] = {
    SECURITY_ALERT.code: None, USER_AUTHENTICATION.code: (LOGIN.code, LOGOUT.code),
}


def _e(action: str, description: str, event_id: Code, action_code: ActionCode,
       objects: tuple[ObjectKind, ...] = (), fields: tuple[str, ...] = (),
       event_type: Code | None = None) -> EventType:
    """A catalogue entry, refused (ValueError, at import) when its EventID, EventActionCode
    and EventTypeCode do not make a message PS3.15 A.5.3 allows."""
    if action_code not in ACTION_CODES.get(event_id.code, ""):
        raise ValueError(f"{action}: EventID {event_id.code} ({event_id.meaning}) takes the "
                         f"EventActionCode {ACTION_CODES.get(event_id.code)}, not {action_code}")
    if event_id.code in EVENT_TYPES_REQUIRED:
        allowed = EVENT_TYPES_REQUIRED[event_id.code]
        if event_type is None or (allowed is not None and event_type.code not in allowed):
            raise ValueError(f"{action}: EventID {event_id.code} ({event_id.meaning}) needs an "
                             f"EventTypeCode{f' of {allowed}' if allowed else ''}")
    return EventType(action, description, event_id, action_code, objects, fields, event_type)


_STUDY: tuple[ObjectKind, ...] = ("patient", "study")
_REFUSAL = ("service", "reason", "calling_ae", "host")
_SHARE_USE = ("share",)

CATALOGUE: dict[str, EventType] = {e.action: e for e in (
    # Images: stores, reads, queries, changes.
    _e("instance.store", "An instance was stored (C-STORE, STOW-RS, import), found a duplicate, "
       "or was refused or kept aside (conflict, mismatch).", INSTANCES_TRANSFERRED, "C",
       _STUDY, ("sop_instance_uid", "result", "reason", "conflict")),
    _e("study.delete", "A study was deleted from the archive as a whole, its last instance "
       "with it (way: expiry by the retention job, rejection from the inbox, or approved by "
       "two administrators).", STUDY_DELETED, "D", _STUDY, ("reason", "way")),
    _e("instance.delete", "Some instances of a study were deleted, the study staying (way as "
       "for study.delete); also a deletion refused or rolled back, and blobs left after one.",
       INSTANCES_ACCESSED, "D", _STUDY, ("reason", "way")),
    _e("study.query", "A query (C-FIND, QIDO-RS, search page) was answered.", QUERY, "E",
       ("query",), ("level", "keys", "error")),
    _e("study.view", "A study was viewed or rendered in the browser (its frames, renderings "
       "and thumbnails fetched by one user from one address within "
       "audit_view_window_seconds are one event).", INSTANCES_ACCESSED,
       "R", _STUDY, ("reason",)),
    _e("study.retrieve", "Instances were sent over WADO-RS/WADO-URI (each whole "
       "instance; a viewer's stored frames of a study as one event per "
       "audit_view_window_seconds).", BEGIN_TRANSFERRING, "E",
       _STUDY, ("reason",)),
    _e("study.metadata", "A study's metadata was read (WADO-RS metadata).", INSTANCES_ACCESSED,
       "R", _STUDY, ("reason",)),
    _e("study.move", "Instances were sent to another node by C-MOVE (destination: its AE "
       "title).", BEGIN_TRANSFERRING, "E", _STUDY, ("reason", "destination")),
    _e("study.get", "Instances were sent back over the association by C-GET.",
       BEGIN_TRANSFERRING, "E", _STUDY, ("reason",)),
    _e("study.download", "A study was downloaded from the web app.", EXPORT, "R", _STUDY,
       ("reason",)),
    _e("study.export", "A study was exported (ZIP, DICOMDIR, video, images; de-identified or "
       "not).", EXPORT, "R", _STUDY, ("format", "deidentified", "profile", "held_back",
                                      "encrypted", "reason")),
    _e("study.export.download", "A prepared export was downloaded.", EXPORT, "R",
       _STUDY + ("job",), ("job", "reason")),
    _e("study.annotate", "Marks were saved on a study's images.", INSTANCES_ACCESSED, "U",
       _STUDY, ("reason",)),
    _e("study.comment", "A comment was added to a study.", INSTANCES_ACCESSED, "U", _STUDY),
    _e("patient.correction", "A study's patient details were corrected (the history keeps "
       "the old values).", PATIENT_RECORD, "U", _STUDY,
       ("change_id", "previous_patient_id", "attributes")),
    _e("patient.merge", "A study was filed under another patient record.", PATIENT_RECORD, "U",
       _STUDY, ("change_id", "previous_patient_id", "attributes")),
    # Sharing and teaching.
    _e("share.create", "A share link was made for a study.", INSTANCES_ACCESSED, "C",
       _STUDY + ("share",), ("share", "deidentified", "download", "comment", "days",
                             "recipient", "purpose", "reason")),
    _e("share.resolve", "A share's instances were looked up to serve them.",
       INSTANCES_ACCESSED, "R", _STUDY, ("reason",)),
    _e("share.open", "A share link was opened with its passcode.", USER_AUTHENTICATION, "E",
       ("share",), ("share", "user"), LOGIN),
    _e("share.passcode", "A wrong or locked-out passcode was given for a share link.",
       USER_AUTHENTICATION, "E", ("share",), ("share", "failures", "locked", "reason"), LOGIN),
    _e("share.bind", "A share link was bound to a reviewer's account.", SECURITY_ALERT,
       "E", ("share",), ("share",), OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("share.view", "A share's images were viewed (user: the account an identifiable "
       "share is bound to, on every use of it).", INSTANCES_ACCESSED, "R",
       ("study", "share"), ("share", "format", "image", "user")),
    _e("share.render", "An image of a share was rendered.", INSTANCES_ACCESSED, "R",
       ("study", "share"), ("share", "user")),
    _e("share.annotate", "Marks were saved on a shared image.", INSTANCES_ACCESSED, "U",
       ("study", "share"), ("share", "user")),
    _e("share.download", "A share was downloaded.", EXPORT, "R", ("study", "share"),
       ("share", "format", "user")),
    _e("share.comment", "A reviewer commented on a share.", INSTANCES_ACCESSED, "U",
       ("study", "share"), ("share", "image", "user")),
    _e("share.comment.sr", "A reviewer's comment could not be kept as a DICOM SR.",
       INSTANCES_ACCESSED, "C", ("study", "share"), ("share", "error")),
    _e("share.feedback", "A reviewer gave feedback on a share (the case, or one clip).",
       INSTANCES_ACCESSED, "U", ("study", "share"), ("share", "clip", "user")),
    _e("share.signoff", "A mentor signed off a shared case (accreditation logbook).",
       INSTANCES_ACCESSED, "U", ("share",), ("share",)),
    _e("logbook.export", "A trainee exported their review logbook (PDF or CSV).", EXPORT, "R",
       (), ("format", "cases")),
    _e("share.revoke", "A share link was revoked (by its owner, or because the patient "
       "withdrew the consent it was made under).", SECURITY_ALERT, "E", ("share",),
       ("share", "reason"), OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("case.add", "A study's images were added to a teaching case.", INSTANCES_ACCESSED, "R",
       _STUDY, ("reason",)),
    _e("case.update", "A teaching case's texts (title, history, findings, diagnosis, ...) "
       "were changed by its author.", INSTANCES_ACCESSED, "U", ("case",), ("case", "fields")),
    _e("case.delete", "A case was deleted (its attachments with it; the images, and a "
       "teaching case's de-identified copies, stay in the archive): one event per study it "
       "was made from, naming that study and its patient. Not a DICOM deletion: no "
       "instance is deleted.", INSTANCES_ACCESSED, "U", _STUDY + ("case",),
       ("case", "copies", "attachments")),
    _e("teaching.create", "A de-identified, verified copy of a study was made for a teaching "
       "case.", INSTANCES_ACCESSED, "C", _STUDY + ("case",),
       ("case", "profile", "copied", "held_back")),
    _e("case.view", "A teaching case's page or presentation was shown.", INSTANCES_ACCESSED,
       "R", ("case",), ("case", "format")),
    _e("case.attach", "A file (PDF, photo, video, document) was attached to a case.",
       INSTANCES_ACCESSED, "C", ("case",), ("case", "kind")),
    _e("case.attachment", "A case's attached file was opened or downloaded.",
       INSTANCES_ACCESSED, "R", ("case",), ("case", "kind")),
    # Exchange with other sites.
    _e("exchange.search", "Other sites were searched for a patient's imaging.", QUERY, "E",
       ("query", "node"), ("site", "status", "by", "sites")),
    _e("exchange.retrieve", "A study was retrieved from another site.", IMPORT, "C",
       ("study", "node"), ("site", "failed", "temporary", "error")),
    _e("exchange.push", "A study was sent to another site.", INSTANCES_TRANSFERRED, "R",
       _STUDY + ("node",), ("site", "transfer", "priority", "reason", "error", "receipt")),
    _e("exchange.request", "Imaging was requested from another site.", ORDER_RECORD, "C",
       ("patient", "node"), ("site", "state")),
    _e("exchange.request.read", "Requests for imaging (each naming its patient) were listed.",
       ORDER_RECORD, "R", (), ("direction", "requests")),
    _e("exchange.request.receive", "Another site asked us for imaging.", ORDER_RECORD, "C",
       ("request", "node"), ("origin", "request")),
    _e("exchange.request.fulfilled", "A request from another site was answered.",
       ORDER_RECORD, "U", ("request",), ("request",)),
    _e("exchange.request.declined", "A request from another site was declined.",
       ORDER_RECORD, "U", ("request",), ("request",)),
    _e("exchange.request.answer", "Another site answered a request for imaging we sent "
       "(fulfilled or declined).", ORDER_RECORD, "U", ("request", "node"),
       ("request", "state", "site")),
    _e("exchange.arrival", "Another ImageShare said what travels with a study it sent us "
       "(its site, priority, note, contact and transfer).", INSTANCES_ACCESSED, "U",
       ("study", "node"), ("origin", "priority", "transfer")),
    _e("exchange.receipt", "A site's receipt for a study we sent arrived (accepted or "
       "rejected, by whom, when); a second one with another outcome is refused.",
       INSTANCES_TRANSFERRED, "U", _STUDY + ("node",),
       ("site", "transfer", "receipt")),
    _e("inbox.read", "The inbox of received studies was listed.", INSTANCES_ACCESSED, "R"),
    _e("inbox.view", "A received study waiting in the inbox was viewed (before it was "
       "accepted).", INSTANCES_ACCESSED, "R", _STUDY, ("reason",)),
    _e("inbox.accept", "A received study was accepted into the archive.", IMPORT, "C",
       ("study", "node"), ("site", "done")),
    _e("inbox.reject", "A received study was rejected (its instances' deletion is the "
       "instance.delete of the same moment).", INSTANCES_ACCESSED, "U",
       ("study", "node"), ("site",)),
    # Uploads by invitation, staff browser import, their review, patients' own accounts.
    _e("upload.invite", "Someone was invited by e-mail to upload images for a patient.",
       SECURITY_ALERT, "E", ("patient",), ("upload", "max_bytes", "recipient"),
       SECURITY_ROLES_CHANGED),
    _e("upload.import", "A member of staff began importing media in the browser.", IMPORT, "C",
       ("patient",), ("upload", "max_bytes", "recipient")),
    _e("upload.open", "An invitation to upload was opened with its passcode.",
       USER_AUTHENTICATION, "E", (), ("upload",), LOGIN),
    _e("upload.passcode", "A wrong or locked-out passcode was given for an invitation to "
       "upload.", USER_AUTHENTICATION, "E", (), ("upload", "failures", "locked", "reason"),
       LOGIN),
    _e("upload.submit", "An uploader sent their files for review.", IMPORT, "C", ("patient",),
       ("upload",)),
    _e("upload.announce", "A file of an upload was announced (tus creation; perhaps with its "
       "first bytes), or the announcement was refused (reason).", INSTANCES_ACCESSED, "C",
       ("patient",), ("upload", "file", "offset", "length", "reason")),
    _e("upload.chunk", "Bytes of an uploaded file arrived (tus PATCH; offset: how far it "
       "got), or were refused (reason).", INSTANCES_ACCESSED, "U", ("patient",),
       ("upload", "file", "offset", "length", "reason")),
    _e("upload.offset", "How much of an uploaded file arrived was asked (tus HEAD), or the "
       "question was refused (reason).", INSTANCES_ACCESSED, "R", ("patient",),
       ("upload", "file", "offset", "length", "reason")),
    _e("upload.withdraw", "An uploader withdrew a file before sending it (tus termination: "
       "its bytes, and what it was stored as, removed), or the withdrawal was refused "
       "(reason).", INSTANCES_ACCESSED, "D", ("patient",), ("upload", "file", "reason")),
    _e("upload.receive", "An upload's files were made DICOM and stored for review.", IMPORT,
       "C", ("patient",), ("upload", "round", "refused")),
    _e("upload.accept", "An uploaded study was accepted into the record.", IMPORT, "C",
       _STUDY, ("upload", "done")),
    _e("upload.reject", "An uploaded study was rejected (the uploader was asked for new "
       "images; the deletion is the instance.delete of the same moment).",
       INSTANCES_ACCESSED, "U", _STUDY, ("upload",)),
    _e("upload.revoke", "An invitation to upload was ended.", SECURITY_ALERT, "E", (),
       ("upload",), SECURITY_ROLES_CHANGED),
    _e("upload.original", "The original file of an upload was opened.", INSTANCES_ACCESSED,
       "R", _STUDY, ("upload",)),
    _e("upload.read", "The queue of uploads (or one upload) was looked at.",
       INSTANCES_ACCESSED, "R", ("patient",), ("upload",)),
    _e("patient.invite", "A patient was invited to an account for their own images.",
       SECURITY_ALERT, "E", ("patient",), ("role",), SECURITY_ROLES_CHANGED),
    _e("patient.bind", "A patient account was bound to its record on first sign-in.",
       SECURITY_ALERT, "E", ("patient",), ("issuer", "record"), SECURITY_ROLES_CHANGED),
    _e("patient.studies", "A patient looked at the list of their own studies (one event per "
       "patient record the list showed).", INSTANCES_ACCESSED, "R", ("patient",), ()),
    _e("patient.download", "A patient downloaded their own study (or asked for a study not "
       "of their own record: refused, with the reason).", EXPORT, "R", _STUDY,
       ("format", "reason")),
    # Sign-in, accounts, tokens.
    _e("session.start", "A user signed in (or failed to, or was refused: a machine account "
       "with its right password, a sign-in sent by another site).", USER_AUTHENTICATION, "E",
       (), ("stage", "reason"), LOGIN),
    _e("session.code", "A second-factor code was checked.", USER_AUTHENTICATION, "E", (), (),
       LOGIN),
    _e("session.basic", "HTTP Basic credentials were refused.", USER_AUTHENTICATION, "E", (),
       ("route",), LOGIN),
    _e("session.token", "An API token was refused (unknown, revoked or expired).",
       USER_AUTHENTICATION, "E", (), ("route",), LOGIN),
    _e("session.end", "A user signed out.", USER_AUTHENTICATION, "E", (), (), LOGOUT),
    _e("access.denied", "A request was refused by the access policy.", SECURITY_ALERT, "E",
       ("study",), ("wanted", "method", "route", "reason"), USE_OF_RESTRICTED_FUNCTION),
    _e("account.password", "A user changed their password.", SECURITY_ALERT, "E", (),
       ("sessions_ended",), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("account.two-factor", "A user enrolled a second factor.", SECURITY_ALERT, "E", (), (),
       USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("token.create", "An API token was made.", SECURITY_ALERT, "E", ("token",), ("name",),
       USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("token.revoke", "An API token was revoked.", SECURITY_ALERT, "E", ("token",),
       ("token",), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.add", "An account was created.", SECURITY_ALERT, "E", ("user",),
       ("username", "role", "user"), SECURITY_ROLES_CHANGED),
    _e("user.disable", "An account was disabled.", SECURITY_ALERT, "E", ("user",), ("user",),
       USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.enable", "An account was enabled again.", SECURITY_ALERT, "E", ("user",),
       ("user",), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.reset", "An account's password (and optionally second factor) was reset.",
       SECURITY_ALERT, "E", ("user",), ("user",), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.email", "An account's e-mail address (where its notifications go) was set by an "
       "administrator or its owner.", SECURITY_ALERT, "E", ("user",), ("user",),
       USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.email-link", "A one-time link confirming the address an account set for itself "
       "was mailed to that address (or was not: asked for too often).", SECURITY_ALERT, "E",
       ("user",), ("user", "reason"), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.email-confirm", "An account confirmed its own e-mail address with the link "
       "mailed to it (or the link was refused: expired, used, replaced, another account's); "
       "shares sent to the address are the account's from then on.", SECURITY_ALERT, "E",
       ("user",), ("user", "reason"), USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.link-site", "A site account was tied to the connected site it speaks for (or "
       "untied).", SECURITY_ALERT, "E", ("user",), ("username", "site"),
       USER_SECURITY_ATTRIBUTES_CHANGED),
    _e("user.invite", "A reviewer was invited to an account for a share.", SECURITY_ALERT, "E",
       ("share",), ("share", "bound"), SECURITY_ROLES_CHANGED),
    _e("user.accept-invite", "A reviewer accepted an invitation (or presented a bad one).",
       USER_AUTHENTICATION, "E", (), ("reason",), LOGIN),
    # Sites (DICOM nodes) and refused callers.
    _e("node.add", "A remote DICOM node or site was registered.", SECURITY_ALERT, "E",
       ("node",), ("ae_title", "host", "port", "from"), NETWORK_CONFIGURATION),
    _e("node.remove", "A remote DICOM node or site was removed.", SECURITY_ALERT, "E",
       ("node",), ("ae_title", "unlinked_site_accounts"), NETWORK_CONFIGURATION),
    _e("ehr.launch", "An EHR opened ImageShare (IHE IID): a study list or the viewer; or a "
       "launch URL was refused (reason).", USER_AUTHENTICATION, "E", ("study",),
       ("ehr", "signed", "request_type", "opened", "reason"), LOGIN),
    _e("ehr.add", "An EHR was registered for signed launch URLs.", SECURITY_ALERT, "E", (),
       ("ehr",), SECURITY_CONFIGURATION),
    _e("ehr.remove", "A registered EHR was removed.", SECURITY_ALERT, "E", (), ("ehr",),
       SECURITY_CONFIGURATION),
    _e("node.test", "The connection to a site was tested (C-ECHO, an authenticated QIDO-RS).",
       APPLICATION_ACTIVITY, "E", ("node",), ("ae_title", "checks"), NETWORK_CONFIGURATION),
    _e("node.refused.read", "The list of refused DICOM callers was read.", SECURITY_ALERT, "E",
       (), (), NETWORK_CONFIGURATION),
    _e("dicom.association", "An association was rejected before any service (the called "
       "AE title is not this archive's, too many open associations).", SECURITY_ALERT, "E",
       ("node",), _REFUSAL, NODE_AUTHENTICATION),
    _e("dicom.echo", "A C-ECHO was refused.", SECURITY_ALERT, "E", ("node",), _REFUSAL,
       NODE_AUTHENTICATION),
    _e("dicom.store", "A C-STORE association or request was refused.", SECURITY_ALERT, "E",
       ("node",), _REFUSAL, NODE_AUTHENTICATION),
    _e("dicom.query", "A C-FIND was refused.", SECURITY_ALERT, "E", ("node",), _REFUSAL,
       NODE_AUTHENTICATION),
    _e("dicom.retrieve", "A C-MOVE or C-GET was refused.", SECURITY_ALERT, "E", ("node",),
       _REFUSAL, NODE_AUTHENTICATION),
    # The archive as a whole: backups, restores, scrubs.
    _e("archive.backup", "A backup of the index and every blob was written (imageshare "
       "backup).", EXPORT, "R", ("job",), ("destination", "snapshot", "blobs", "copied",
                                           "missing", "corrupt")),
    _e("archive.restore", "The installation was rebuilt from a backup (imageshare restore).",
       IMPORT, "C", ("job",), ("source", "snapshot", "blobs", "signature_checked", "signed_by")),
    _e("archive.verify", "Every blob was checked against its recorded digest (imageshare "
       "verify).", INSTANCES_ACCESSED, "R", (), ("checked", "corrupt", "missing",
                                                 "recorded")),
    _e("storage.seal", "Blobs written before encryption, or sealed under a retired secret "
       "key, and secrets in the index sealed under a retired key, were sealed again under the "
       "current key (imageshare storage seal); refused: left as they were (not matching the "
       "recorded digest, or opened by no key).",
       SECURITY_ALERT, "E", (), ("checked", "already", "sealed", "rekeyed", "refused",
                                 "unchecked", "secrets_rekeyed", "secrets_refused",
                                 "encrypted_only"), SECURITY_CONFIGURATION),
    # Retention: policy rules, legal holds, deletion by two administrators, consent.
    _e("retention.rule.set", "A retention policy rule was set (arrivals of a source, modality, "
       "collection or case type get a retention class).", SECURITY_ALERT, "E", (),
       ("kind", "value", "class"), SECURITY_CONFIGURATION),
    _e("retention.rule.remove", "A retention policy rule was removed.", SECURITY_ALERT, "E",
       (), ("kind", "value"), SECURITY_CONFIGURATION),
    _e("retention.hold.place", "A legal hold was placed on a patient or a study: nothing it "
       "covers is deleted.", SECURITY_ALERT, "E", _STUDY, ("hold", "reason"),
       OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("retention.hold.lift", "A legal hold was lifted.", SECURITY_ALERT, "E", _STUDY,
       ("hold", "reason"), OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("retention.read", "Legal holds, deletion requests or retention rules were listed.",
       SECURITY_ALERT, "E", (), ("list",), SECURITY_CONFIGURATION),
    _e("deletion.request", "An administrator asked for a study's deletion (a second one must "
       "approve).", SECURITY_ALERT, "E", _STUDY, ("request", "reason"),
       USE_OF_RESTRICTED_FUNCTION),
    _e("deletion.approve", "A second administrator approved a study's deletion (or the "
       "approval was refused: requester, hold, retention class); the deletion itself is the "
       "instance.delete (DICOM Study Deleted) it made.", SECURITY_ALERT, "E",
       _STUDY, ("request", "requested_by", "reason"), USE_OF_RESTRICTED_FUNCTION),
    _e("deletion.refuse", "A deletion request was refused or withdrawn.", SECURITY_ALERT, "E",
       _STUDY, ("request", "state"), USE_OF_RESTRICTED_FUNCTION),
    _e("deletion.allow_again", "An administrator let the instances an approved deletion took "
       "away be stored again (until then they are refused when sent again, IHE IOCM).",
       SECURITY_ALERT, "E", _STUDY, ("reason",), OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("consent.record", "A patient's consent decision (teaching, research, publication) was "
       "recorded.", PATIENT_RECORD, "C", ("patient",),
       ("purpose", "decision", "source", "given_on"), OBJECT_SECURITY_ATTRIBUTES_CHANGED),
    _e("consent.read", "A patient's consent records were read.", PATIENT_RECORD, "R",
       ("patient",), ()),
    _e("consent.refused", "A teaching or research use of identifiable images was refused for "
       "want of the patient's consent (case: a teaching case no longer shown).",
       SECURITY_ALERT, "E", _STUDY, ("purpose", "reason", "case"),
       USE_OF_RESTRICTED_FUNCTION),
    # The audit trail itself.
    _e("audit.read", "The audit trail (or a study's access list) was read (with the action "
       "and the text it was filtered by).", AUDIT_LOG_USED, "R", ("audit-log",),
       ("action", "text")),
    _e("audit.report", "An access report was made (a patient's accesses, or one user's "
       "activity).", AUDIT_LOG_USED, "R", ("audit-log", "patient", "user"),
       ("report", "user", "format", "since", "until")),
    _e("audit.export", "The audit trail was exported (imageshare audit export).",
       AUDIT_LOG_USED, "R", ("audit-log",)),
)}


def event_type(action: str) -> EventType | None:
    """The catalogue entry of ``action``, or None when it is not catalogued."""
    return CATALOGUE.get(action)


def markdown() -> str:
    """The catalogue as the Markdown page ``docs/audit-events.md``."""
    lines = [
        "# Audit events",
        "",
        "Generated from `imageshare/audit/events.py` by `imageshare audit events --markdown`;",
        "a test keeps this page in step. Every event is kept in the audit table (hash-chained)",
        "and, when an audit repository is configured, sent as a DICOM PS3.15 A.5 audit",
        "message (IHE ATNA) over syslog/TLS. Codes are DICOM's (DCM, CID 400 and 401) unless",
        "noted; the action codes are C create, R read, U update, D delete, E execute.",
        "",
        "| action | what happened | EventID | EventTypeCode | action code | participant "
        "objects | detail fields |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(CATALOGUE.values(), key=lambda e: e.action):
        lines.append(
            f"| `{e.action}` | {e.description} | {e.event_id.code} {e.event_id.meaning} | "
            f"{f'{e.event_type.code} {e.event_type.meaning}' if e.event_type else ''} | "
            f"{e.action_code} | {', '.join(e.objects)} | "
            f"{', '.join(f'`{f}`' for f in e.fields)} |")
    lines += [
        "",
        "## Participant objects",
        "",
        "| object | ParticipantObjectTypeCode | ParticipantObjectTypeCodeRole | "
        "ParticipantObjectIDTypeCode | ID taken from |",
        "|---|---|---|---|---|",
    ]
    for p in PARTICIPANT_OBJECTS.values():
        lines.append(f"| {p.kind} | {p.type_code} | {p.role} | {p.id_type} | {p.source} |")
    lines += [
        "",
        "Every message names two active participants: the requesting actor (user, node, share",
        "link or the system; `UserIsRequestor=true`, with the network address it came from)",
        "and ImageShare itself (its AE title), and the audit source "
        "(`audit_source_id`, type 4,",
        "application server). Transfers and queries give each end its role (Source / "
        "Destination",
        "Role ID); an export or import adds the media, and a push by a member of staff the "
        "receiving",
        "site, as active participants of their own. Each EventID takes only the action codes "
        "PS3.15",
        "A.5.3 allows it (a security alert, a sign-in, a query: E; a study deleted: D).",
        "",
    ]
    return "\n".join(lines)
