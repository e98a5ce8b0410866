"""Access reports from the audit trail: every access to one patient's images (a GDPR subject
access request), and everything one user did, as rows, CSV or PDF.

A patient's accesses are the audit rows that name the patient, or one of the patient's
studies (those in the index now, and those the trail ever named with the patient: a study
since deleted or moved stays in the report). Each row says who (staff, a share link, another
site, the system), from where, what, which study, when and with what outcome. A report never
names another patient: a row of one of the patient's studies recorded while it was filed
under another record shows that record as :data:`OTHER_RECORD`, and the accesses to a study
after it was moved to another patient (a correction) are that patient's, not in the report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from imageshare.audit.events import CATALOGUE
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.storage.index.schema import audit_events, patients, studies

MAX_ROWS = 50_000
CHANNELS = {"user": "staff", "share": "share link", "node": "other site", "system": "system",
            "anonymous": "anonymous"}
OTHER_RECORD = "(filed under another record)"
COLUMNS = ("when", "who", "channel", "from", "action", "what", "outcome", "patient", "study",
           "instances")


@dataclass(frozen=True)
class AccessRow:
    """One line of an access report."""

    at: datetime
    actor: str
    channel: str
    source: str
    action: str
    what: str
    outcome: str
    patient_id: str
    study_uid: str
    instance_count: int

    def values(self) -> list[str]:
        """The row's cells, in :data:`COLUMNS` order."""
        return [self.at.strftime("%Y-%m-%d %H:%M:%S UTC"), self.actor, self.channel,
                self.source, self.action, self.what, self.outcome, self.patient_id,
                self.study_uid, str(self.instance_count)]


@dataclass(frozen=True)
class AccessReport:
    """A titled list of accesses over a period."""

    title: str
    subject: str
    since: date | None
    until: date | None
    rows: list[AccessRow]
    truncated: bool = False

    @property
    def period(self) -> str:
        """The period covered, as words."""
        return (f"{self.since.isoformat() if self.since else 'the beginning'} to "
                f"{self.until.isoformat() if self.until else 'now'}")


def _bounds(since: date | None, until: date | None) -> list[Any]:
    conditions = []
    if since:
        conditions.append(audit_events.c.at >= datetime.combine(since, time(), UTC))
    if until:
        conditions.append(audit_events.c.at < datetime.combine(until + timedelta(days=1),
                                                               time(), UTC))
    return conditions


def _row(r: Any) -> AccessRow:
    at = r["at"] if r["at"].tzinfo else r["at"].replace(tzinfo=UTC)
    event = CATALOGUE.get(r["action"])
    return AccessRow(at.astimezone(UTC), r["actor"], CHANNELS.get(r["actor_kind"],
                                                                   r["actor_kind"]),
                     r["source"], r["action"], event.description if event else "",
                     r["outcome"], r["patient_id"], r["study_uid"], r["instance_count"])


def _run(engine: Engine, condition: Any, since: date | None, until: date | None
         ) -> tuple[list[AccessRow], bool]:
    query = (select(audit_events).where(condition, *_bounds(since, until))
             .order_by(audit_events.c.seq, audit_events.c.pk).limit(MAX_ROWS + 1))
    with engine.connect() as conn:
        rows = [_row(r) for r in conn.execute(query).mappings()]
    return rows[:MAX_ROWS], len(rows) > MAX_ROWS


def patient_report(engine: Engine, patient_id: str, since: date | None = None,
                   until: date | None = None) -> AccessReport:
    """Every recorded access to ``patient_id``'s images in the period, oldest first."""
    with engine.connect() as conn:
        current = set(conn.execute(select(studies.c.study_uid).join(
            patients, studies.c.patient_pk == patients.c.pk)
            .where(patients.c.patient_id == patient_id)).scalars())
        uids = set(conn.execute(select(audit_events.c.study_uid).distinct().where(
            audit_events.c.patient_id == patient_id, audit_events.c.study_uid != ""))
            .scalars())
    condition = audit_events.c.patient_id == patient_id
    if current or uids:
        # Rows of the patient's studies recorded without a patient, and rows of the studies
        # filed under the patient now that were recorded under another record (before a
        # correction): accesses to this patient's images. Rows of a study since moved to
        # another patient that name that patient are accesses to someone else's images.
        condition = or_(condition, and_(audit_events.c.study_uid.in_(sorted(uids | current)),
                                        audit_events.c.patient_id == ""))
        if current:
            condition = or_(condition, audit_events.c.study_uid.in_(sorted(current)))
    rows, truncated = _run(engine, condition, since, until)
    rows = [row if row.patient_id in ("", patient_id) else replace(row, patient_id=OTHER_RECORD)
            for row in rows]
    return AccessReport("Access to a patient's images", f"patient {patient_id}", since,
                        until, rows, truncated)


def user_report(engine: Engine, actor_label: str, since: date | None = None,
                until: date | None = None) -> AccessReport:
    """Everything the actor (``user:NAME``, ``node:AE``, ...) did in the period."""
    rows, truncated = _run(engine, audit_events.c.actor == actor_label, since, until)
    return AccessReport("Activity of one user", actor_label, since, until, rows, truncated)


class AccessReports:
    """Access reports for information governance, each one audited as it is made."""

    def __init__(self, engine: Engine, audit: AuditTrail) -> None:
        self._engine = engine
        self._audit = audit

    def for_patient(self, actor: Actor, patient_id: str, since: date | None,
                    until: date | None, fmt: str) -> AccessReport:
        """Every access to ``patient_id``'s images in the period; the request is audited."""
        report = patient_report(self._engine, patient_id, since, until)
        self._audit.record(AuditEvent(
            actor=actor, action="audit.report", outcome="success", patient_id=patient_id,
            instance_count=len(report.rows),
            detail={"report": "patient", "format": fmt, **_period(since, until)}))
        return report

    def for_user(self, actor: Actor, actor_label: str, since: date | None,
                 until: date | None, fmt: str) -> AccessReport:
        """Everything ``actor_label`` did in the period; the request is audited."""
        report = user_report(self._engine, actor_label, since, until)
        self._audit.record(AuditEvent(
            actor=actor, action="audit.report", outcome="success",
            instance_count=len(report.rows),
            detail={"report": "user", "user": actor_label, "format": fmt,
                    **_period(since, until)}))
        return report


def _period(since: date | None, until: date | None) -> dict[str, str]:
    return {"since": since.isoformat() if since else "",
            "until": until.isoformat() if until else ""}


def as_csv(report: AccessReport) -> bytes:
    """The report as CSV (UTF-8, a header line, one line per access)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in report.rows:
        writer.writerow(spreadsheet_safe(row.values()))
    return out.getvalue().encode("utf-8")


# What makes a spreadsheet (Excel, LibreOffice, Sheets) read a cell as a formula: its first
# character, also after leading blanks, which some of them skip, and the full-width forms
# Excel takes for the ASCII ones; a leading tab or line break starts one too (OWASP CSV
# injection).
_FORMULA_START = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")
_BLANKS = " \t\r\n\x0b\x0c\u00a0\u3000"


def spreadsheet_safe(cells: Sequence[str]) -> list[str]:
    """The cells, each one a spreadsheet would run as a formula (``=HYPERLINK(...)`` as a
    patient ID or an AE title, ``\\t=cmd|...``, `` =1+1`` ...) quoted with a leading
    apostrophe."""
    return [f"'{c}" if c and (c[0] in "\t\r\n" or c.lstrip(_BLANKS)[:1] in _FORMULA_START)
            else c for c in cells]


def as_pdf(report: AccessReport, generated_by: str) -> bytes:
    """The report as a PDF (A4 landscape, one table)."""
    from fpdf import FPDF

    def text(value: str) -> str:
        return value.encode("latin-1", "replace").decode("latin-1")

    pdf = FPDF(orientation="L", format="A4")
    pdf.set_auto_page_break(True, margin=12)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, text(f"{report.title}: {report.subject}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.cell(0, 5, text(f"Period: {report.period}. {len(report.rows)} access(es)"
                        f"{' (first ' + str(MAX_ROWS) + ' shown)' if report.truncated else ''}."
                        f" Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
                        f"{generated_by} from the hash-chained audit trail."),
             new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    widths = (34, 42, 20, 30, 36, 30, 16, 50, 12)
    headers = ("When (UTC)", "Who", "Channel", "From", "Action", "Patient", "Outcome",
               "Study", "Images")
    pdf.set_font("Helvetica", "B", 8)
    for width, header in zip(widths, headers, strict=True):
        pdf.cell(width, 5, header, border=1)
    pdf.ln()
    pdf.set_font("Helvetica", "", 7)
    for row in report.rows:
        cells = (row.at.strftime("%Y-%m-%d %H:%M:%S"), row.actor, row.channel, row.source,
                 row.action, row.patient_id, row.outcome, row.study_uid,
                 str(row.instance_count))
        for width, cell in zip(widths, cells, strict=True):
            pdf.cell(width, 4.5, text(cell[:64]), border=1)
        pdf.ln()
    return bytes(pdf.output())
