"""Arrows and length measurements drawn on images: kept for the viewer and stored as a DICOM
Softcopy Presentation State in the study, so that PACS and other viewers show them too.

Each author sees and replaces their own marks; staff see everyone's. A share link's recipient
is an author of their own (``share:<public id>``) and sees only their own marks, under the
share's UIDs, named "you" (never anyone's address)."""

from __future__ import annotations

import io
import math
import pkgutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
import numpy as np
from PIL import ImageCms
from pydicom.uid import generate_uid
from sqlalchemy import Engine, delete, insert, select

from imageshare import __version__
from imageshare.access.scope import Scope
from imageshare.archive.ingest import IngestService
from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound

# (imported under another name: `annotations` is taken by the __future__ import)
from imageshare.storage.index.schema import annotations as marks_table

KINDS = ("arrow", "length")
MAX_MARKS = 50
SERIES_NUMBER = 9904
# ICC profile device classes a presentation state may carry (PS3.3 C.11.15: input or colour
# space profiles; highdicom refuses others, such as the 'mntr' of monitor profiles).
_PR_ICC_CLASSES = ("scnr", "spac")


def share_author(public_id: str) -> str:
    """The author key of marks made through a share link."""
    return f"share:{public_id}"


def _valid_icc(profile: bytes) -> bool:
    try:
        parsed = ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile
    except (OSError, ValueError, TypeError):
        return False
    return (parsed.device_class.strip() in _PR_ICC_CLASSES
            and parsed.xcolor_space.strip() == "RGB"
            and parsed.connection_space.strip() in ("Lab", "XYZ"))


def _standard_srgb() -> bytes:
    """highdicom's sRGB profile (device class 'spac'), valid in presentation states."""
    data = pkgutil.get_data("highdicom", "_icc_profiles/sRGB_v4_ICC_preference.icc")
    if data is None:  # pragma: no cover - part of highdicom's wheel
        raise ImageShareError("no sRGB colour profile is available")
    return data


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
        self._srgb = _standard_srgb()

    def save(self, study_uid: str, sop_uid: str, frame: int, marks: list[dict[str, Any]],
             author: Actor, author_label: str,
             allowed_studies: Collection[str] | None, author_key: str = "") -> int:
        """Replace the author's marks on one frame and store them as a presentation state in
        the study: both or neither (the presentation state is built and stored first; the
        marks are kept only once it is). ``author_key`` tells authors apart (a username, or
        :func:`share_author`; default ``author_label``). Returns how many marks were kept."""
        author_key = author_key or author_label
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
        if parsed:
            state = self._presentation_state(header, frame, frames, parsed, author_label)
            self._ingest.store_stream(state, author, expected_study=str(header.StudyInstanceUID))
        with self._engine.begin() as conn:
            conn.execute(delete(marks_table).where(
                marks_table.c.sop_uid == sop_uid, marks_table.c.frame == frame,
                marks_table.c.author == author_key))
            if parsed:
                conn.execute(insert(marks_table).values(
                    study_uid=study_uid, sop_uid=sop_uid, frame=frame, author=author_key,
                    author_label=author_label[:128], marks=[m.as_json() for m in parsed],
                    created_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=author, action="study.annotate",
                                          outcome="success", study_uid=study_uid,
                                          instance_count=len(parsed)), conn=conn)
        return len(parsed)

    def _icc_profile(self, header: Any) -> bytes:
        """The image's own ICC profile when a presentation state may carry it, else sRGB."""
        try:
            own = header.get("ICCProfile")
        except Exception:  # noqa: BLE001 - an unreadable profile is replaced by sRGB
            own = None
        if isinstance(own, bytes) and own and _valid_icc(own):
            return own
        return self._srgb

    def _presentation_state(self, header: Any, frame: int, frames: int, marks: list[Mark],
                            author_label: str) -> io.BytesIO:
        """The marks as a Softcopy Presentation State (Part 10 bytes); raises ImageShareError
        when one cannot be made for this image."""
        try:
            return self._build_state(header, frame, frames, marks, author_label)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ImageShareError("marks cannot be stored for this image (a presentation "
                                  "state could not be made from its header); nothing was "
                                  "saved") from exc

    def _build_state(self, header: Any, frame: int, frames: int, marks: list[Mark],
                     author_label: str) -> io.BytesIO:
        columns, rows = float(header.Columns), float(header.Rows)

        def inside(x: float, y: float) -> list[float]:
            # Arrowheads of marks near an edge would point outside the image, which a
            # presentation state may not (PIXEL graphic data lies within the image).
            return [min(max(x, 0.0), columns), min(max(y, 0.0), rows)]

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
                    head = inside(x2 + 12 * math.cos(angle + turn),
                                  y2 + 12 * math.sin(angle + turn))
                    objects.append(hd.pr.GraphicObject(
                        "POLYLINE", np.array([[x2, y2], head], dtype=float), "PIXEL"))
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
        extra: dict[str, Any] = {"icc_profile": self._icc_profile(header)} if colour else {}
        state = cls(
            referenced_images=[header], series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="ImageShare",
            manufacturer_model_name="ImageShare", software_versions=__version__,
            device_serial_number="0", content_label="MARKS",
            content_description=f"Marks by {author_label}"[:64],
            graphic_annotations=[annotation], graphic_layers=[layer], **extra)
        out = io.BytesIO()
        state.save_as(out, enforce_file_format=True)
        out.seek(0)
        return out

    def for_study(self, study_uid: str, scope: Scope | None = None,
                  author: str = "") -> dict[str, list[dict[str, Any]]]:
        """Marks in the study, keyed ``SOP|frame``: everyone's for staff (``scope`` None);
        within a :class:`Scope`, only ``author``'s own on the images it reaches."""
        stmt = select(marks_table).where(marks_table.c.study_uid == study_uid)
        if scope is not None:
            stmt = stmt.where(marks_table.c.author == author)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if scope is not None and not scope.covers(study_uid, "", row["sop_uid"]):
                continue
            label = row["author_label"] or row["author"]
            out.setdefault(f"{row['sop_uid']}|{row['frame']}", []).extend(
                {**m, "author": label} for m in row["marks"])
        return out

    def for_share(self, public_id: str, items: Iterable[Any],
                  label: str = "you") -> dict[str, list[dict[str, Any]]]:
        """The marks a share link's recipient made through it, keyed by the share's public
        ``SOP|frame`` (``items`` map real UIDs to public ones), authored ``label``: no other
        recipient's or staff member's marks, no address."""
        public = {i.sop_uid: i.public_sop_uid for i in items if not i.held_back}
        with self._engine.connect() as conn:
            rows = conn.execute(select(marks_table).where(
                marks_table.c.author == share_author(public_id))).mappings().all()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["sop_uid"] in public:
                out.setdefault(f"{public[row['sop_uid']]}|{row['frame']}", []).extend(
                    {"kind": m["kind"], "points": m["points"], "label": m.get("label", ""),
                     "author": label} for m in row["marks"])
        return out
