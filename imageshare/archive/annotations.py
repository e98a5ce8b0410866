"""Arrows and length measurements drawn on images: kept for the viewer and stored as a DICOM
Softcopy Presentation State in the study, so that PACS and other viewers show them too."""

from __future__ import annotations

import io
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
import numpy as np
from PIL import ImageCms
from pydicom.uid import generate_uid
from sqlalchemy import Engine, delete, insert, select

from imageshare import __version__
from imageshare.archive.ingest import IngestService
from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.storage.index.schema import annotations

KINDS = ("arrow", "length")
MAX_MARKS = 50
SERIES_NUMBER = 9904


@dataclass(frozen=True)
class Mark:
    """One arrow (from the first point to the second) or length measurement, in image pixels
    (column, row)."""

    kind: str
    points: tuple[tuple[float, float], tuple[float, float]]
    label: str = ""

    @staticmethod
    def parse(data: dict[str, Any], columns: int, rows: int) -> Mark:
        """A mark from JSON; raises ImageShareError for anything malformed."""
        kind = str(data.get("kind", ""))
        if kind not in KINDS:
            raise ImageShareError("a mark is an arrow or a length")
        try:
            (x1, y1), (x2, y2) = ((float(p[0]), float(p[1])) for p in data["points"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageShareError("a mark has two points [x, y]") from exc
        for x, y in ((x1, y1), (x2, y2)):
            if not (0 <= x <= columns and 0 <= y <= rows):
                raise ImageShareError("a mark lies outside the image")
        return Mark(kind, ((x1, y1), (x2, y2)), str(data.get("label", ""))[:64])

    def as_json(self) -> dict[str, Any]:
        """JSON for the viewer."""
        return {"kind": self.kind, "points": [list(p) for p in self.points],
                "label": self.label}


def _length_text(mark: Mark, spacing: tuple[float, float] | None) -> str:
    (x1, y1), (x2, y2) = mark.points
    if spacing:
        length = math.hypot((x2 - x1) * spacing[1], (y2 - y1) * spacing[0])
        return f"{length:.1f} mm"
    return f"{math.hypot(x2 - x1, y2 - y1):.0f} px"


class AnnotationBook:
    """Saves and lists marks per image and author."""

    def __init__(self, engine: Engine, retrieve: RetrieveService, ingest: IngestService,
                 audit: AuditTrail) -> None:
        self._engine = engine
        self._retrieve = retrieve
        self._ingest = ingest
        self._audit = audit
        self._icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()

    def save(self, study_uid: str, sop_uid: str, frame: int, marks: list[dict[str, Any]],
             author: Actor, author_label: str,
             allowed_studies: Collection[str] | None) -> int:
        """Replace the author's marks on one frame; store them as a presentation state in the
        study. Returns how many marks were kept."""
        if len(marks) > MAX_MARKS:
            raise ImageShareError(f"at most {MAX_MARKS} marks per image")
        found = self._retrieve.select(author, "study.annotate", study_uids=[study_uid],
                                      sop_uids=[sop_uid], allowed_studies=allowed_studies)
        header = self._retrieve.header(found[0].sop_uid)
        if header is None or "Rows" not in header:
            raise NotFound("the instance has no image to annotate")
        frames = int(header.get("NumberOfFrames", 1) or 1)
        if not 1 <= frame <= frames:
            raise ImageShareError(f"frame {frame} does not exist")
        parsed = [Mark.parse(m, int(header.Columns), int(header.Rows)) for m in marks]
        with self._engine.begin() as conn:
            conn.execute(delete(annotations).where(
                annotations.c.sop_uid == sop_uid, annotations.c.frame == frame,
                annotations.c.author == author_label))
            if parsed:
                conn.execute(insert(annotations).values(
                    study_uid=study_uid, sop_uid=sop_uid, frame=frame, author=author_label,
                    marks=[m.as_json() for m in parsed], created_at=datetime.now(UTC)))
        if parsed:
            self._store(header, frame, frames, parsed, author, author_label)
        return len(parsed)

    def _store(self, header: Any, frame: int, frames: int, marks: list[Mark], actor: Actor,
               author_label: str) -> None:
        spacing = None
        if "PixelSpacing" in header:
            spacing = (float(header.PixelSpacing[0]), float(header.PixelSpacing[1]))
        layer = hd.pr.GraphicLayer("IMAGESHARE", 1, description="Marks drawn in ImageShare")
        objects, texts = [], []
        for mark in marks:
            (x1, y1), (x2, y2) = mark.points
            objects.append(hd.pr.GraphicObject(
                "POLYLINE", np.array([[x1, y1], [x2, y2]], dtype=float), "PIXEL"))
            if mark.kind == "arrow":
                angle = math.atan2(y1 - y2, x1 - x2)
                for turn in (0.4, -0.4):
                    head = (x2 + 12 * math.cos(angle + turn), y2 + 12 * math.sin(angle + turn))
                    objects.append(hd.pr.GraphicObject(
                        "POLYLINE", np.array([[x2, y2], list(head)], dtype=float), "PIXEL"))
            text = mark.label or (_length_text(mark, spacing) if mark.kind == "length" else "")
            if text:
                texts.append(hd.pr.TextObject(text, "PIXEL", anchor_point=(
                    (x1 + x2) / 2, (y1 + y2) / 2)))
        annotation = hd.pr.GraphicAnnotation(
            referenced_images=[header], graphic_layer=layer,
            referenced_frame_number=frame if frames > 1 else None,
            graphic_objects=objects, text_objects=texts or None)
        colour = int(header.get("SamplesPerPixel", 1) or 1) > 1
        cls = (hd.pr.ColorSoftcopyPresentationState if colour
               else hd.pr.GrayscaleSoftcopyPresentationState)
        extra = {"icc_profile": self._icc} if colour else {}
        state = cls(
            referenced_images=[header], series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="ImageShare", manufacturer_model_name="ImageShare",
            software_versions=__version__, device_serial_number="0",
            content_label="MARKS", content_description=f"Marks by {author_label}"[:64],
            graphic_annotations=[annotation], graphic_layers=[layer], **extra)
        out = io.BytesIO()
        state.save_as(out, enforce_file_format=True)
        out.seek(0)
        self._ingest.store_stream(out, actor, expected_study=str(header.StudyInstanceUID))
        self._audit.record(AuditEvent(actor=actor, action="study.annotate", outcome="success",
                                      study_uid=str(header.StudyInstanceUID),
                                      instance_count=len(marks)))

    def for_study(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """Every author's marks in the study, keyed ``SOP|frame``."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(annotations).where(annotations.c.study_uid == study_uid)
                                ).mappings().all()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(f"{row['sop_uid']}|{row['frame']}", []).extend(
                {**m, "author": row["author"]} for m in row["marks"])
        return out
