"""Access reports for information governance: one patient's accesses (subject access request)
and one user's activity, as a page, CSV or PDF. The patient is named in the form's body, never
in the address."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from imageshare.access.policy import AUDIT_READ
from imageshare.audit.reports import AccessReport, as_csv, as_pdf
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.templating import page

router = APIRouter(include_in_schema=False)
FORMATS = ("page", "csv", "pdf")


def _day(value: str, label: str) -> date | None:
    value = value.strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ImageShareError(f"{label} must be a date (YYYY-MM-DD)") from exc


# A downloaded report names a patient and everyone who saw their images: no browser or proxy
# keeps a copy (a shared computer's cache, a caching proxy), and nothing sniffs its type.
_PRIVATE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _answer(request: Request, report: AccessReport, fmt: str, actor: Actor) -> Response:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if fmt == "csv":
        return Response(as_csv(report), media_type="text/csv; charset=utf-8", headers={
            **_PRIVATE,
            "Content-Disposition": f'attachment; filename="access-report-{stamp}.csv"'})
    if fmt == "pdf":
        return Response(as_pdf(report, actor.label), media_type="application/pdf", headers={
            **_PRIVATE,
            "Content-Disposition": f'attachment; filename="access-report-{stamp}.pdf"'})
    return page(request, "reports.html", report=report)


def _checked(fmt: str, since: str, until: str) -> tuple[str, date | None, date | None]:
    if fmt not in FORMATS:
        raise ImageShareError("format is page, csv or pdf")
    start, end = _day(since, "since"), _day(until, "until")
    if start and end and end < start:
        raise ImageShareError("'until' is before 'since'")
    return fmt, start, end


@router.get("/admin/reports")
def reports(request: Request, _actor: allowed(AUDIT_READ)) -> Response:
    """The forms for a patient's access report and a user's activity report."""
    return page(request, "reports.html", report=None)


@router.post("/admin/reports/patient")
def patient_accesses(
    request: Request, archive: ArchiveDep, actor: allowed(AUDIT_READ),
    patient_id: Annotated[str, Form()],
    since: Annotated[str, Form()] = "", until: Annotated[str, Form()] = "",
    format: Annotated[str, Form()] = "page",  # noqa: A002 - the form's field name
) -> Response:
    """Every access to one patient's images (staff, share links, other sites, exports)."""
    fmt, start, end = _checked(format, since, until)
    patient_id = patient_id.strip()[:64]
    if not patient_id:
        raise ImageShareError("a patient ID is needed")
    report = archive.reports.for_patient(actor, patient_id, start, end, fmt)
    return _answer(request, report, fmt, actor)


@router.post("/admin/reports/user")
def user_activity(
    request: Request, archive: ArchiveDep, actor: allowed(AUDIT_READ),
    username: Annotated[str, Form()],
    since: Annotated[str, Form()] = "", until: Annotated[str, Form()] = "",
    format: Annotated[str, Form()] = "page",  # noqa: A002 - the form's field name
) -> Response:
    """Everything one user (or ``kind:name`` actor, e.g. ``node:PACS``) did in a period."""
    fmt, start, end = _checked(format, since, until)
    username = username.strip()[:128]
    if not username:
        raise ImageShareError("a user name is needed")
    label = username if ":" in username else f"user:{username}"
    report = archive.reports.for_user(actor, label, start, end, fmt)
    return _answer(request, report, fmt, actor)
