"""A patient's consent decisions (teaching, research, publication): the history and a form to
record a new one, reached from any of the patient's studies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import Field

from imageshare.access.policy import CONSENT_RECORD
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.governance.consent import DECISIONS, PURPOSES, SOURCES, ConsentRecord
from imageshare.web.auth import PrivateRoute, allowed
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.templating import page, redirect
from imageshare.web.params import Strict

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api", tags=["API"], route_class=PrivateRoute)


def _consent_page(request: Request, archive: Archive, study_uid: str, actor: Actor,
                  status_code: int = 200, **extra: object) -> Response:
    study = archive.catalogue.view(study_uid, actor, archive.policy.study_scope(actor))
    return page(request, "consent.html", status_code=status_code, study=study,
                records=archive.consents.history(study_uid, actor), purposes=PURPOSES,
                decisions=DECISIONS, sources=SOURCES,
                today=datetime.now(UTC).date().isoformat(), **extra)


@router.get("/studies/{study_uid}/consent")
def consent_page(request: Request, archive: ArchiveDep, study_uid: str,
                 actor: allowed(CONSENT_RECORD, "study_uid")) -> Response:
    """The patient's consent decisions, newest first, and the form to record one."""
    return _consent_page(request, archive, study_uid, actor)


@router.post("/studies/{study_uid}/consent")
def record_consent(request: Request, archive: ArchiveDep, study_uid: str,
                   actor: allowed(CONSENT_RECORD, "study_uid"),
                   purpose: Annotated[str, Form()], decision: Annotated[str, Form()],
                   given_on: Annotated[str, Form()], source: Annotated[str, Form()],
                   note: Annotated[str, Form()] = "") -> Response:
    """Record a decision of the patient (kept beside the earlier ones)."""
    try:
        archive.consents.record_decision(study_uid, purpose, decision, given_on, source,
                                         actor, note)
    except ImageShareError as exc:
        return _consent_page(request, archive, study_uid, actor, exc.http_status,
                             error=str(exc))
    return redirect(f"/studies/{study_uid}/consent?notice=consent-recorded")


class ConsentIn(Strict):
    """A consent decision of the study's patient (a field it does not define is refused: a
    misspelt ``note`` would be lost from the record)."""

    purpose: str = Field(max_length=16)
    decision: str = Field(max_length=16)
    given_on: str = Field(max_length=10, description="YYYY-MM-DD")
    source: str = Field(max_length=16)
    note: str = Field(default="", max_length=2000)


def _json(record: ConsentRecord) -> dict[str, Any]:
    return {"purpose": record.purpose, "decision": record.decision,
            "given_on": record.given_on, "source": record.source, "note": record.note,
            "recorded_by": record.recorded_by,
            "recorded_at": record.recorded_at.isoformat()}


@api.get("/studies/{study_uid}/consent", summary="The patient's consent decisions")
async def consent_json(archive: ArchiveDep, study_uid: str,
                       actor: allowed(CONSENT_RECORD, "study_uid")) -> list[dict[str, Any]]:
    """Every decision of the study's patient, newest first (the first of each purpose is in
    force)."""
    records = await run_in_threadpool(archive.consents.history, study_uid, actor)
    return [_json(r) for r in records]


@api.post("/studies/{study_uid}/consent", status_code=201,
          summary="Record a consent decision of the patient")
async def record_consent_json(archive: ArchiveDep, study_uid: str, body: ConsentIn,
                              actor: allowed(CONSENT_RECORD, "study_uid")) -> dict[str, Any]:
    """Record teaching, research or publication consent (granted, refused, withdrawn)."""
    record = await run_in_threadpool(archive.consents.record_decision, study_uid,
                                     body.purpose, body.decision, body.given_on, body.source,
                                     actor, body.note)
    return _json(record)
