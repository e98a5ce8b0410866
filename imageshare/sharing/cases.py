"""Cases and folders ("my archive"): a user's named groups of studies, series and images, with
a description, filed in folders, shared as one thing."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import case_items, cases


@dataclass(frozen=True)
class Case:
    """A named group of items."""

    pk: int
    public_id: str
    owner: str
    title: str
    description: str
    folder: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CaseItem:
    """A study, a series of it, or one instance (empty UIDs mean "all of it")."""

    study_uid: str
    series_uid: str = ""
    sop_uid: str = ""


def _case(row: object) -> Case:
    return from_row(Case, row)


class CaseBook:
    """Keeps users' cases; additions are checked against what the user may see and audited."""

    def __init__(self, engine: Engine, retrieve: RetrieveService, audit: AuditTrail) -> None:
        self._engine = engine
        self._retrieve = retrieve
        self._audit = audit

    def create(self, owner: Actor, title: str, description: str = "", folder: str = "") -> Case:
        """A new, empty case."""
        title = title.strip()
        if not title:
            raise ImageShareError("a case needs a title")
        now = datetime.now(UTC)
        public_id = secrets.token_hex(8)
        with self._engine.begin() as conn:
            conn.execute(insert(cases).values(
                public_id=public_id, owner=owner.name, title=title[:128],
                description=description.strip()[:10_000], folder=folder.strip()[:128],
                created_at=now, updated_at=now))
            # This case, by its own id: not the owner's newest, which a case made at the same
            # moment (a double click, a second tab) may be.
            row = conn.execute(select(cases).where(cases.c.public_id == public_id)
                               ).mappings().one()
        return _case(row)

    def get(self, public_id: str, owner: str) -> Case:
        """One of ``owner``'s cases; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(cases).where(cases.c.public_id == public_id,
                                                   cases.c.owner == owner,
                                                   cases.c.kind == "case")).mappings().first()
        if row is None:
            raise NotFound("no such case")
        return _case(row)

    def of(self, owner: str) -> list[Case]:
        """The owner's cases, by folder then title."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(cases).where(cases.c.owner == owner,
                                                    cases.c.kind == "case")
                                .order_by(cases.c.folder, cases.c.title)).mappings().all()
        return [_case(r) for r in rows]

    def update(self, case: Case, title: str, description: str, folder: str,
               actor: Actor | None = None) -> None:
        """Rename, describe or refile a case (audited as ``case.update`` naming the fields
        changed, when ``actor`` is given). A text longer than its field holds is refused,
        naming the field, never cut short."""
        values = {"title": title.strip(), "description": description.strip(),
                  "folder": folder.strip()}
        if not values["title"]:
            raise ImageShareError("a case needs a title")
        for name, limit in (("title", 128), ("description", 10_000), ("folder", 128)):
            if len(values[name]) > limit:
                raise ImageShareError(f"the {name} may have at most {limit:,} characters "
                                      f"(this has {len(values[name]):,}); nothing was saved")
        with self._engine.begin() as conn:
            conn.execute(update(cases).where(cases.c.pk == case.pk).values(
                updated_at=datetime.now(UTC), **values))
            if actor is not None:
                self._audit.record(AuditEvent(
                    actor=actor, action="case.update", outcome="success",
                    detail={"case": case.public_id,
                            "fields": sorted(n for n in values
                                             if values[n] != getattr(case, n))}), conn=conn)

    def add(self, case: Case, actor: Actor, item: CaseItem,
            allowed_studies: Collection[str] | None) -> None:
        """Add a study, series or instance the user may see (checked and audited)."""
        self._retrieve.select(
            actor, "case.add", study_uids=[item.study_uid],
            series_uids=[item.series_uid] if item.series_uid else [],
            sop_uids=[item.sop_uid] if item.sop_uid else [], allowed_studies=allowed_studies)
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(case_items).values(
                    case_pk=case.pk, study_uid=item.study_uid, series_uid=item.series_uid,
                    sop_uid=item.sop_uid))
                conn.execute(update(cases).where(cases.c.pk == case.pk)
                             .values(updated_at=datetime.now(UTC)))
        except IntegrityError:
            return  # already in the case

    def remove(self, case: Case, item: CaseItem, actor: Actor | None = None) -> None:
        """Take an item out of the case (audited as ``case.update`` of its items, when
        ``actor`` is given)."""
        with self._engine.begin() as conn:
            gone = conn.execute(delete(case_items).where(
                case_items.c.case_pk == case.pk, case_items.c.study_uid == item.study_uid,
                case_items.c.series_uid == item.series_uid,
                case_items.c.sop_uid == item.sop_uid)).rowcount
            if gone and actor is not None:
                self._audit.record(AuditEvent(
                    actor=actor, action="case.update", outcome="success",
                    detail={"case": case.public_id, "fields": ["items"]}), conn=conn)

    def items(self, case: Case) -> list[CaseItem]:
        """What the case holds, in the order it was added."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(case_items.c.study_uid, case_items.c.series_uid,
                                       case_items.c.sop_uid)
                                .where(case_items.c.case_pk == case.pk)
                                .order_by(case_items.c.pk)).all()
        return [CaseItem(*r) for r in rows]

    def delete(self, case: Case, actor: Actor) -> None:
        """Delete the case (the images stay in the archive)."""
        with self._engine.begin() as conn:
            conn.execute(delete(cases).where(cases.c.pk == case.pk))
            self._audit.record(AuditEvent(actor=actor, action="case.delete", outcome="success",
                                          detail={"case": case.public_id}), conn=conn)
