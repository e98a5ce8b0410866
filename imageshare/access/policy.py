"""The one place that decides access: :meth:`Policy.authorise`.

Routes and DICOM services declare the action they need; nothing else decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imageshare.access.scope import COMMENT, DOWNLOAD, VIEW, Grant, Scope
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, NotAuthenticated

PUBLIC = "public"
# Actions on the archive and its administration.
STUDY_READ = "study.read"
# Taking the stored DICOM bytes away (WADO-RS retrieve, WADO-URI application/dicom).
STUDY_DOWNLOAD = "study.download"
STUDY_STORE = "study.store"
# Attaching a document (a letter, a report as PDF) to a local study from the study page:
# staff only (a ``site`` account stores over STOW-RS into the inbox, never onto our studies).
DOCUMENT_ATTACH = "study.document"
NODE_MANAGE = "node.manage"
USER_MANAGE = "user.manage"
AUDIT_READ = "audit.read"
# Retention policy, legal holds, two-administrator deletion.
RETENTION_MANAGE = "retention.manage"
# Recording and reading a patient's consent decisions (teaching, research, publication).
CONSENT_RECORD = "consent.record"
TOKEN_SELF = "token.self"
ACCOUNT_SELF = "account.self"
STUDY_COMMENT = "study.comment"
EXPORT_IDENTIFIABLE = "study.export"
EXPORT_DEIDENTIFIED = "study.export.deidentified"
SHARE_CREATE = "share.create"
CASE_MANAGE = "case.manage"
EXCHANGE = "exchange.use"
# Site-to-site messages (a request for prior imaging, an arrival's announcement, a receipt,
# an answer): only another ImageShare's ``site`` account sends them, never staff.
EXCHANGE_RECEIVE = "exchange.receive"
# What someone holding an opened share link may do (within the share's items only).
SHARE_VIEW = "share.view"
SHARE_DOWNLOAD = "share.download"
SHARE_COMMENT = "share.comment"
PATIENT_CORRECT = "patient.correct"
# Uploads: staff invite, import in the browser and review (QC); someone holding an opened
# invitation to upload sends files (to that invitation only); a patient reaches their own.
UPLOAD_MANAGE = "upload.manage"
UPLOAD_SEND = "upload.send"
PATIENT_SELF = "patient.self"
# DICOM services, asked for by remote nodes.
DICOM_ECHO = "dicom.echo"
DICOM_STORE = "dicom.store"
DICOM_QUERY = "dicom.query"
DICOM_RETRIEVE = "dicom.retrieve"
# Not an action: a node's stores carrying this grant land in the inbox for review.
INBOX = "inbox"

_STAFF = frozenset(
    {STUDY_READ, STUDY_DOWNLOAD, STUDY_STORE, STUDY_COMMENT, PATIENT_CORRECT, TOKEN_SELF,
     ACCOUNT_SELF, EXPORT_IDENTIFIABLE, EXPORT_DEIDENTIFIED, SHARE_CREATE, CASE_MANAGE, EXCHANGE,
     UPLOAD_MANAGE, CONSENT_RECORD, DOCUMENT_ATTACH}
)
# An administrator signed in with a password who has not yet set up two-factor sign-in
# (required for admins) may only do that.
ENROLLING = "enrolling"
# An account signed in with a temporary password an administrator gave may only choose its
# own (the account page), on every channel.
CHANGING_PASSWORD = "changing-password"
# A browser that gave the right password and still owes its TOTP code may only send that.
AWAITING_CODE = "awaiting-code"
SESSION_CODE = "session.code"
ROLES: dict[str, frozenset[str]] = {
    "admin": _STAFF | {NODE_MANAGE, USER_MANAGE, AUDIT_READ, RETENTION_MANAGE},
    "clinician": _STAFF,
    "radiographer": _STAFF,
    "sonographer": _STAFF,
    "educator": frozenset({STUDY_READ, STUDY_DOWNLOAD, STUDY_COMMENT, EXPORT_DEIDENTIFIED,
                           SHARE_CREATE, CASE_MANAGE, TOKEN_SELF, ACCOUNT_SELF}),
    "reviewer": frozenset({TOKEN_SELF, ACCOUNT_SELF}),
    "patient": frozenset({ACCOUNT_SELF, PATIENT_SELF}),
    "service": frozenset({STUDY_READ, STUDY_DOWNLOAD, STUDY_STORE, ACCOUNT_SELF}),
    # Another hospital's ImageShare: what it stores lands in the inbox; it may send requests.
    "site": frozenset({STUDY_STORE, ACCOUNT_SELF, EXCHANGE_RECEIVE}),
    ENROLLING: frozenset({ACCOUNT_SELF}),
    CHANGING_PASSWORD: frozenset({ACCOUNT_SELF}),
    AWAITING_CODE: frozenset({SESSION_CODE}),
}
# Roles a person can be given (``service`` is for machine accounts, ENROLLING is a stage).
PERSON_ROLES = ("admin", "clinician", "radiographer", "sonographer", "educator", "reviewer",
                "patient")
# Roles an account can be given: a person's, a machine's or another hospital's (never a stage
# of signing in: an account made "awaiting-code" could only ever send codes).
ACCOUNT_ROLES = (*PERSON_ROLES, "service", "site")
# Actions a grant (an identifiable share naming the user) gives on its own items, by right.
SHARED_ACTIONS = {STUDY_READ: VIEW, STUDY_COMMENT: COMMENT, STUDY_DOWNLOAD: DOWNLOAD}
# Roles that must sign in with a second factor on every channel.
SECOND_FACTOR_ROLES = frozenset({"admin"})
# Stages of an account that can do nothing but finish signing in.
_STAGES = (ENROLLING, CHANGING_PASSWORD, AWAITING_CODE)


def effective_role(role: str, two_factor: bool, cli_token: bool = False,
                   must_change_password: bool = False) -> str:
    """The role an account acts with: an account whose role requires a second factor and
    that has not set one up may only enrol (ENROLLING), and one holding a temporary password
    may only choose its own (CHANGING_PASSWORD), whatever the channel (HTTP Basic, session,
    API token). Tokens made on the server's own command line are the exception: they are for
    machines, made by someone who can already read the data folder."""
    if cli_token:
        return role
    if must_change_password:
        return CHANGING_PASSWORD
    if role in SECOND_FACTOR_ROLES and not two_factor:
        return ENROLLING
    return role


def fully_signed_in(actor: Actor) -> bool:
    """True for a person's account past every stage of signing in: not one that still owes
    its TOTP code (AWAITING_CODE) nor one that must first set up its second factor
    (ENROLLING). What an account reaches by being named (an identifiable share) needs this,
    as everything else of the account's does."""
    return actor.kind == "user" and actor.role not in _STAGES and actor.role in ROLES


def arrival_class(actor: Actor) -> str:
    """Where instances ``actor`` stores land: ``inbox`` (held for review, expiring unless
    accepted) when another site sends them, a node registered with an inbox or another
    ImageShare storing over STOW-RS with its ``site`` account; else ``clinical``. Nothing else
    expires unasked. A DICOM caller nobody registered (let in by
    ``IMAGESHARE_STORE_FROM_ANY_AE``, or calling from another host than the one registered)
    is not trusted as a modality of ours: what it stores lands in the inbox too. Ingest asks
    this (given to it by the composition root)."""
    from_site = (actor.kind == "node" and (INBOX in actor.grants or not actor.registered)) or (
        actor.kind == "user" and actor.role == "site")
    return "inbox" if from_site else "clinical"


def site_origin(actor: Actor, linked: str, claimed: str = "") -> str:
    """The AE title a site-to-site message from ``actor`` comes from: always the node its
    ``site`` account is linked to (``linked``, "" when none), never what the message says.
    Raises Forbidden for an account that is not a site account, an unlinked one, or a message
    that names another site (``claimed``, when given, must be the linked node)."""
    if actor.kind != "user" or actor.role != "site":
        raise Forbidden("only a connected site's account sends site-to-site messages")
    if not linked:
        raise Forbidden(f"site account {actor.name!r} is not linked to a connected site: an "
                        "administrator links it (imageshare user link-site "
                        f"{actor.name} AE_TITLE) before it may send site-to-site messages")
    if claimed and claimed.strip().upper() != linked.upper():
        raise Forbidden(f"site account {actor.name!r} speaks for {linked} only, not for "
                        f"{claimed.strip()[:16]!r}")
    return linked


def _nothing_shared(_actor: Actor) -> Sequence[Grant]:
    return ()


@dataclass(frozen=True)
class Policy:
    """Access rules of this installation."""

    store_from_any_ae: bool = False
    # What is shared with a user outside their role: the items of identifiable shares naming
    # them, each with its rights (sharing fills this in).
    shared_with: Callable[[Actor], Sequence[Grant]] = field(default=_nothing_shared)

    def allows(self, actor: Actor, action: str, resource: Any = None) -> bool:
        """True when ``actor`` may do ``action`` on ``resource`` (a Study Instance UID for
        study actions; None asks about the action in general)."""
        if action == PUBLIC:
            return True
        if actor.kind == "system":
            return True
        if actor.kind == "node":
            if action == DICOM_ECHO:
                return True
            if action == DICOM_STORE:
                return self.store_from_any_ae or (actor.registered and action in actor.grants)
            if action in (DICOM_QUERY, DICOM_RETRIEVE):
                return actor.registered and action in actor.grants
            return False
        if actor.kind == "upload":
            return action == UPLOAD_SEND
        if actor.kind == "share":
            if action == SHARE_VIEW:
                return True
            if action == SHARE_COMMENT:
                return "comment" in actor.grants
            return action == SHARE_DOWNLOAD and "download" in actor.grants
        if actor.kind == "user":
            if action in ROLES.get(actor.role, frozenset()):
                return True
            right = SHARED_ACTIONS.get(action)
            if right is None or actor.role in _STAGES:
                return False
            return any(right in g.rights and (not isinstance(resource, str)
                                              or g.study_uid == resource)
                       for g in self.shared_with(actor))
        return False

    def study_scope(self, actor: Actor, right: str = VIEW) -> Scope | None:
        """What ``actor`` may reach with ``right`` (view, comment or download): None for
        everything (staff whose role reads the archive), else a :class:`Scope` of the items
        shared with them (empty for everyone else).

        Queries and retrievals apply it inside their SQL, down to series and instances.
        """
        if actor.kind == "system":
            return None
        role_action = {VIEW: STUDY_READ, COMMENT: STUDY_COMMENT, DOWNLOAD: STUDY_DOWNLOAD}[right]
        if actor.kind == "user" and role_action in ROLES.get(actor.role, frozenset()):
            return None
        if actor.kind == "user" and actor.role not in _STAGES:
            return Scope(g for g in self.shared_with(actor) if right in g.rights)
        return Scope(())

    def authorise(self, actor: Actor, action: str, resource: Any = None) -> None:
        """Return if allowed; raise NotAuthenticated (nobody) or Forbidden (not allowed)."""
        if self.allows(actor, action, resource):
            return
        if actor.kind == "anonymous":
            raise NotAuthenticated("sign in or present an API token")
        raise Forbidden("you are not allowed to do this")
