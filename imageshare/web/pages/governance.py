"""Governance pages for administrators: legal holds, deletion requests (two administrators)
and retention policy rules. Each form calls one retention service method, which audits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from imageshare.access.policy import RETENTION_MANAGE
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.domain.retention import class_help
from imageshare.retention.service import RULE_CLASSES, RULE_KINDS
from imageshare.web.auth import allowed
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)


def _listed(archive: Archive, actor: Actor, what: str) -> None:
    archive.audit.record(AuditEvent(actor=actor, action="retention.read", outcome="success",
                                    detail={"list": what}))


def _holds_page(request: Request, archive: Archive, actor: Actor, status_code: int = 200,
                **extra: object) -> Response:
    _listed(archive, actor, "holds")
    return page(request, "holds.html", status_code=status_code,
                holds=archive.retention.holds(in_force_only=False), **extra)


@router.get("/admin/holds")
def holds(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE),
          study: str = "") -> Response:
    """Legal holds in force and lifted; a form to place one (``study`` fills it in)."""
    return _holds_page(request, archive, actor, study_uid=study[:64])


@router.post("/admin/holds")
def place_hold(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE),
               reason: Annotated[str, Form()], patient_id: Annotated[str, Form()] = "",
               issuer: Annotated[str, Form()] = "",
               study_uid: Annotated[str, Form()] = "") -> Response:
    """Place a legal hold on a patient or a study."""
    try:
        archive.retention.place_hold(actor, reason, patient_id=patient_id, issuer=issuer,
                                     study_uid=study_uid)
    except ImageShareError as exc:
        return _holds_page(request, archive, actor, exc.http_status, error=str(exc),
                           study_uid=study_uid[:64])
    return redirect("/admin/holds?notice=hold-placed")


@router.post("/admin/holds/{hold_id}/lift")
def lift_hold(request: Request, archive: ArchiveDep, hold_id: str,
              actor: allowed(RETENTION_MANAGE), reason: Annotated[str, Form()] = ""
              ) -> Response:
    """Lift a legal hold, saying why."""
    try:
        archive.retention.lift_hold(hold_id, actor, reason)
    except ImageShareError as exc:
        return _holds_page(request, archive, actor, exc.http_status, error=str(exc))
    return redirect("/admin/holds?notice=hold-lifted")


def _deletions_page(request: Request, archive: Archive, actor: Actor, status_code: int = 200,
                    **extra: object) -> Response:
    _listed(archive, actor, "deletions")
    requests = archive.retention.deletion_requests()
    return page(request, "deletions.html", status_code=status_code, requests=requests,
                refused={d.public_id: archive.retention.refused_again(d) for d in requests},
                **extra)


@router.get("/admin/deletions")
def deletions(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE),
              study: str = "") -> Response:
    """Deletion requests (pending first to decide); a form to request one."""
    return _deletions_page(request, archive, actor, study_uid=study[:64])


@router.post("/admin/deletions")
def request_deletion(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE),
                     study_uid: Annotated[str, Form()], reason: Annotated[str, Form()]
                     ) -> Response:
    """Ask for a study's deletion; another administrator must approve."""
    try:
        archive.retention.request_deletion(study_uid.strip(), actor, reason)
    except ImageShareError as exc:
        return _deletions_page(request, archive, actor, exc.http_status, error=str(exc),
                               study_uid=study_uid[:64])
    return redirect("/admin/deletions?notice=deletion-requested")


@router.post("/admin/deletions/{request_id}/{decision}")
def decide_deletion(request: Request, archive: ArchiveDep, request_id: str, decision: str,
                    actor: allowed(RETENTION_MANAGE), note: Annotated[str, Form()] = ""
                    ) -> Response:
    """Approve (another administrator than the requester: the study is deleted) or refuse;
    after a deletion, allow its images to be stored again (``note``: why)."""
    try:
        if decision == "approve":
            archive.retention.approve_deletion(request_id, actor, note)
        elif decision == "refuse":
            archive.retention.refuse_deletion(request_id, actor, note)
        elif decision == "allow-again":
            archive.retention.allow_again(request_id, actor, note)
        else:
            raise ImageShareError("approve, refuse or allow again")
    except ImageShareError as exc:
        return _deletions_page(request, archive, actor, exc.http_status, error=str(exc))
    notice = "deletion-allow-again" if decision == "allow-again" else f"deletion-{decision}d"
    return redirect(f"/admin/deletions?notice={notice}")


def _rules_page(request: Request, archive: Archive, actor: Actor, status_code: int = 200,
                **extra: object) -> Response:
    _listed(archive, actor, "rules")
    return page(request, "retention.html", status_code=status_code,
                rules=archive.retention.rules(), kinds=RULE_KINDS,
                classes=[c.value for c in RULE_CLASSES],
                explained=[(c.value, text)
                           for c, text in class_help(archive.retention.periods).items()],
                periods=archive.retention.periods, **extra)


@router.get("/admin/retention")
def retention_rules(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE)
                    ) -> Response:
    """The retention classes, their periods and the policy rules giving them."""
    return _rules_page(request, archive, actor)


@router.post("/admin/retention")
def set_rule(request: Request, archive: ArchiveDep, actor: allowed(RETENTION_MANAGE),
             kind: Annotated[str, Form()], value: Annotated[str, Form()],
             retention_class: Annotated[str, Form()] = "",
             remove: Annotated[str, Form()] = "") -> Response:
    """Set (or, with ``remove``, drop) the class arrivals matching ``kind`` = ``value`` get."""
    try:
        if remove:
            archive.retention.remove_rule(kind, value, actor)
        else:
            archive.retention.set_rule(kind, value, retention_class, actor)
    except ImageShareError as exc:
        return _rules_page(request, archive, actor, exc.http_status, error=str(exc))
    return redirect("/admin/retention?notice=" + ("rule-removed" if remove else "rule-set"))
