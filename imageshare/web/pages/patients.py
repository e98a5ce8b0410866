"""Correcting the patient details of a study, and merging two records of one patient."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import PATIENT_CORRECT
from imageshare.archive.corrections import PatientDetails
from imageshare.domain.errors import ImageShareError
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)


def _form_of(details: PatientDetails, reason: str = "") -> dict[str, str]:
    family, _, given = details.name.partition("^")
    return {"family": family, "given": given.replace("^", " ").strip(),
            "patient_id": details.patient_id, "issuer": details.issuer,
            "nhs_number": details.nhs_number, "birth_date": details.birth_date,
            "sex": details.sex, "reason": reason}


@router.get("/studies/{study_uid}/patient")
def correction_form(request: Request, archive: ArchiveDep, study_uid: str,
                    actor: allowed(PATIENT_CORRECT, "study_uid")) -> Response:
    """The form to correct the details the study is filed under."""
    study = archive.catalogue.view(study_uid, actor, archive.policy.study_scope(actor))
    return page(request, "correct.html", study=study,
                form=_form_of(PatientDetails.of(study.patient)))


@router.post("/studies/{study_uid}/patient")
async def correct(
    request: Request, archive: ArchiveDep,
    study_uid: str, actor: allowed(PATIENT_CORRECT, "study_uid"),
    family: Annotated[str, Form()], patient_id: Annotated[str, Form()],
    reason: Annotated[str, Form()] = "", given: Annotated[str, Form()] = "",
    issuer: Annotated[str, Form()] = "", nhs_number: Annotated[str, Form()] = "",
    birth_date: Annotated[str, Form()] = "", sex: Annotated[str, Form()] = "",
) -> Response:
    """Apply the correction to the index and every stored image; kept in the history."""
    name = "^".join(p for p in (family.strip(), " ".join(given.split())) if p)
    details = PatientDetails(name, patient_id, issuer, nhs_number, birth_date, sex)
    try:
        await run_in_threadpool(archive.corrections.correct_study, study_uid, details, reason,
                                actor)
    except ImageShareError as exc:
        study = archive.catalogue.record(study_uid)
        form = _form_of(details, reason)
        form.update(family=family, given=given, birth_date=birth_date.replace("-", ""))
        return page(request, "correct.html", status_code=400, study=study, form=form,
                    error=str(exc))
    return redirect(f"/studies/{study_uid}?notice=corrected")


@router.post("/studies/{study_uid}/merge")
async def merge(
    request: Request, archive: ArchiveDep,
    study_uid: str, actor: allowed(PATIENT_CORRECT, "study_uid"),
    target_patient_id: Annotated[str, Form()], reason: Annotated[str, Form()] = "",
    target_issuer: Annotated[str, Form()] = "",
) -> Response:
    """Move every study of this study's patient to the record with the given number."""
    try:
        await run_in_threadpool(archive.corrections.merge, study_uid, target_patient_id,
                                target_issuer, reason, actor)
    except ImageShareError as exc:
        study = archive.catalogue.record(study_uid)
        return page(request, "correct.html", status_code=400, study=study,
                    form=_form_of(PatientDetails.of(study.patient)), error=str(exc))
    return redirect(f"/studies/{study_uid}?notice=merged")
