"""Who is acting: a user, a remote DICOM node, the system itself, or nobody yet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActorKind = Literal["user", "node", "system", "anonymous", "share", "upload"]


@dataclass(frozen=True)
class Actor:
    """The party behind a request, as audit and authorisation see it.

    ``source`` is where the request came from (an IP address, ``AE@host``, ``cli``).
    ``grants`` holds what a registered DICOM node was allowed (query, retrieve, store).
    """

    kind: ActorKind
    name: str
    role: str = ""
    source: str = ""
    registered: bool = True
    grants: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """How the actor is written in audit trails."""
        return f"{self.kind}:{self.name}"


SYSTEM = Actor(kind="system", name="imageshare", role="system", source="local")
ANONYMOUS = Actor(kind="anonymous", name="anonymous", role="", source="", registered=False)


def cli_actor(username: str = "cli") -> Actor:
    """The operator running a command on the server's machine."""
    return Actor(kind="system", name=username, role="admin", source="cli")
