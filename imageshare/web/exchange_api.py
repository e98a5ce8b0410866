"""Exchange between hospitals over the JSON API: federated search and retrieval."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from imageshare.access.policy import EXCHANGE
from imageshare.archive.search import normalise_nhs_number
from imageshare.exchange.federated import PatientQuery
from imageshare.web.auth import allowed
from imageshare.web.exports import job_view

router = APIRouter(prefix="/api/exchange", tags=["API"])


def patient_query(nhs: str, hospital_number: str, name: str, dob: str) -> PatientQuery:
    """The query from request parameters (the NHS number checked)."""
    return PatientQuery(normalise_nhs_number(nhs) if nhs.strip() else "",
                        hospital_number.strip()[:64], name.strip()[:200],
                        dob.strip().replace("-", "")[:8])


@router.get("/search", summary="Federated search for a patient's studies")
async def federated_search(request: Request, actor: allowed(EXCHANGE), nhs: str = "",
                           hospital_number: str = "", name: str = "", dob: str = ""
                           ) -> dict[str, Any]:
    """Local studies and those of every searchable site, each site within its timeout."""
    archive = request.app.state.archive
    query = patient_query(nhs, hospital_number, name, dob)
    result = await run_in_threadpool(archive.exchange.search, query, actor,
                                     archive.policy.study_scope(actor))
    return {"linking": result.linking,
            "local": [asdict(s) for s in result.local],
            "sites": [{**{k: v for k, v in asdict(a).items() if k != "studies"},
                       "studies": [asdict(s) for s in a.studies]} for a in result.sites]}


class RetrieveIn(BaseModel):
    """A remote study to bring here."""

    site: str = Field(min_length=1, max_length=16)
    study_uid: str = Field(min_length=1, max_length=64)


@router.post("/retrieve", status_code=202, summary="Retrieve a study from a site")
def retrieve(request: Request, body: RetrieveIn, actor: allowed(EXCHANGE)) -> dict[str, Any]:
    """Starts the retrieval (a temporary copy); follow it at /api/jobs/{id}."""
    job = request.app.state.archive.exchange.retrieve(body.site, body.study_uid, actor)
    return job_view(job)
