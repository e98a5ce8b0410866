"""A trainee's review logbook (FUSIC, BSE and similar accreditation): every case they shared
for review, with the mentor's feedback per case and per clip and the final sign-off; exported
as CSV and PDF. It holds no patient data: titles, dates, grades and the reviewers' words."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from imageshare.audit.reports import spreadsheet_safe
from imageshare.sharing.links import Share, ShareService


@dataclass(frozen=True)
class LogbookEntry:
    """One shared case and what its reviewer said."""

    share: Share
    feedback: list[dict]
    comments: list[dict]
    clip_names: dict[str, str]

    @property
    def status(self) -> str:
        """signed off, reviewed, or awaiting review."""
        if self.share.signed_off_at is not None:
            return "signed off"
        return "reviewed" if self.feedback else "awaiting review"


def logbook(shares: ShareService, owner: str) -> list[LogbookEntry]:
    """The owner's de-identified shares for review (case shares), newest first."""
    entries = []
    for share in shares.owned(owner):
        if not share.deidentified:
            continue
        entries.append(LogbookEntry(share, shares.feedback(share), shares.comments(share),
                                    shares.clip_names(share)))
    return entries


def _feedback_text(entry: LogbookEntry) -> str:
    parts = []
    for f in entry.feedback:
        on = entry.clip_names.get(f.get("public_sop_uid") or "", "whole case")
        parts.append(f"{on}: view {f['view_obtained']}, quality {f['image_quality']}/5, "
                     f"{f['agreement']}" + (f"; {f['findings']}" if f["findings"] else "")
                     + (f"; {f['comments']}" if f["comments"] else ""))
    return " | ".join(parts)


HEADERS = ("Case", "Shared (UTC)", "Profile", "Reviewer", "Status", "Feedback",
           "Comments", "Signed off (UTC)", "Sign-off note")


def _rows(entries: Sequence[LogbookEntry]) -> list[tuple[str, ...]]:
    return [(e.share.title, f"{e.share.created_at:%Y-%m-%d %H:%M}", e.share.profile,
             e.share.recipient_email or e.share.recipient_user or "link", e.status,
             _feedback_text(e), str(len(e.comments)),
             f"{e.share.signed_off_at:%Y-%m-%d %H:%M}" if e.share.signed_off_at else "",
             e.share.sign_off_note) for e in entries]


def as_csv(entries: Sequence[LogbookEntry]) -> bytes:
    """The logbook as CSV (UTF-8, one row per case; formula-like cells quoted)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HEADERS)
    for row in _rows(entries):
        writer.writerow(spreadsheet_safe(row))
    return out.getvalue().encode("utf-8")


def as_pdf(entries: Sequence[LogbookEntry], trainee: str) -> bytes:
    """The logbook as a PDF (A4 portrait, one block per case)."""
    from fpdf import FPDF

    def text(value: str) -> str:
        return value.encode("latin-1", "replace").decode("latin-1")

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(0, 9, text(f"Review logbook: {trainee}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    signed = sum(1 for e in entries if e.share.signed_off_at is not None)
    pdf.cell(0, 5, text(f"{len(entries)} case(s), {signed} signed off. Generated "
                        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by ImageShare."),
             new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    for row in _rows(entries):
        pdf.set_font("Helvetica", "B", 11)
        pdf.multi_cell(0, 6, text(row[0]), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 9)
        for header, value in zip(HEADERS[1:], row[1:], strict=True):
            if value:
                pdf.multi_cell(0, 5, text(f"{header}: {value}"), new_x="LMARGIN",
                               new_y="NEXT")
        pdf.ln(3)
    return bytes(pdf.output())
