"""Comments on a study (or one image of it), kept with who wrote them and when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select

from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import study_comments

MAX_COMMENT = 10_000


@dataclass(frozen=True)
class Comment:
    """One comment."""

    author: str
    body: str
    created_at: datetime
    sop_uid: str = ""


class CommentBook:
    """Adds and lists study comments; both are audited."""

    def __init__(self, engine: Engine, audit: AuditTrail) -> None:
        self._engine = engine
        self._audit = audit

    def add(self, study_uid: str, patient_id: str, body: str, actor: Actor,
            sop_uid: str = "") -> Comment:
        """Keep ``body`` as ``actor``'s comment on the study (and image, if given)."""
        body = body.strip()
        if not body:
            raise ImageShareError("a comment cannot be empty")
        if len(body) > MAX_COMMENT:
            raise ImageShareError(f"a comment has at most {MAX_COMMENT} characters")
        if any((ord(c) < 32 and c not in "\t\r\n") or c == "\x7f" for c in body):
            # A NUL is refused by PostgreSQL (a server error instead of an answer); the
            # others have no place in text a person wrote.
            raise ImageShareError("a comment may not contain control characters")
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(study_comments).values(
                study_uid=study_uid, sop_uid=sop_uid, author=actor.name[:128],
                author_kind=actor.kind, body=body, created_at=now))
            self._audit.record(AuditEvent(
                actor=actor, action="study.comment", outcome="success", patient_id=patient_id,
                study_uid=study_uid), conn=conn)
        return Comment(actor.name, body, now, sop_uid)

    def for_study(self, study_uid: str) -> list[Comment]:
        """The study's comments, oldest first (read as part of an audited study view)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(study_comments.c.author, study_comments.c.body,
                       study_comments.c.created_at, study_comments.c.sop_uid)
                .where(study_comments.c.study_uid == study_uid)
                .order_by(study_comments.c.pk)
            ).all()
        return [Comment(r.author, r.body, r.created_at, r.sop_uid) for r in rows]
