"""The one place that decides access: :meth:`Policy.authorise`.

Routes and DICOM services declare the action they need; nothing else decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, NotAuthenticated

PUBLIC = "public"
# Actions on the archive and its administration.
STUDY_READ = "study.read"
STUDY_STORE = "study.store"
NODE_MANAGE = "node.manage"
USER_MANAGE = "user.manage"
AUDIT_READ = "audit.read"
TOKEN_SELF = "token.self"
ACCOUNT_SELF = "account.self"
# DICOM services, asked for by remote nodes.
DICOM_ECHO = "dicom.echo"
DICOM_STORE = "dicom.store"
DICOM_QUERY = "dicom.query"
DICOM_RETRIEVE = "dicom.retrieve"

_STAFF = frozenset({STUDY_READ, STUDY_STORE, TOKEN_SELF, ACCOUNT_SELF})
ROLES: dict[str, frozenset[str]] = {
    "admin": _STAFF | {NODE_MANAGE, USER_MANAGE, AUDIT_READ},
    "clinician": _STAFF,
    "radiographer": _STAFF,
    "sonographer": _STAFF,
    "educator": frozenset({STUDY_READ, TOKEN_SELF, ACCOUNT_SELF}),
    "reviewer": frozenset({TOKEN_SELF, ACCOUNT_SELF}),
    "patient": frozenset({ACCOUNT_SELF}),
    "service": frozenset({STUDY_READ, STUDY_STORE, ACCOUNT_SELF}),
}


@dataclass(frozen=True)
class Policy:
    """Access rules of this installation."""

    store_from_any_ae: bool = True

    def allows(self, actor: Actor, action: str, resource: Any = None) -> bool:
        """True when ``actor`` may do ``action`` on ``resource``."""
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
        if actor.kind == "user":
            return action in ROLES.get(actor.role, frozenset())
        return False

    def study_scope(self, actor: Actor) -> frozenset[str] | None:
        """The studies ``actor`` may see: None for all (staff with study.read), else a set.

        Share links and reviewer access narrow this to what was shared; queries and
        retrievals filter with it inside the query.
        """
        if actor.kind == "system" or self.allows(actor, STUDY_READ):
            return None
        return frozenset()

    def authorise(self, actor: Actor, action: str, resource: Any = None) -> None:
        """Return if allowed; raise NotAuthenticated (nobody) or Forbidden (not allowed)."""
        if self.allows(actor, action, resource):
            return
        if actor.kind == "anonymous":
            raise NotAuthenticated("sign in or present an API token")
        raise Forbidden("you are not allowed to do this")
