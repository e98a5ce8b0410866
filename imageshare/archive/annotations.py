"""Arrows, length measurements, text and ellipse (area) marks drawn on images, per frame: kept
for the viewer and stored as a DICOM Softcopy Presentation State in the study (Grayscale for
monochrome images, Color with a valid ICC profile for RGB, YBR and palette colour images), so
that PACS and other viewers show them too.

Each author sees and replaces their own marks; staff see everyone's. A share link's recipient
is an author of their own (``share:<public id>``) and sees only their own marks, under the
share's UIDs, named "you" (never anyone's address)."""

from __future__ import annotations

import copy
import functools
import io
import math
import pkgutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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

KINDS = ("arrow", "length", "text", "ellipse")
# Kinds drawn from one point (the text's anchor); the others run from the first point to the
# second (an ellipse fills the box the two points span).
ONE_POINT = ("text",)
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


@functools.cache
def _standard_srgb() -> bytes:
    """highdicom's sRGB profile (device class 'spac'), valid in presentation states (read when
    first needed: it loads highdicom)."""
    data = pkgutil.get_data("highdicom", "_icc_profiles/sRGB_v4_ICC_preference.icc")
    if data is None:  # pragma: no cover - part of highdicom's wheel
        raise ImageShareError("no sRGB colour profile is available")
    return data


def _first_number(value: Any) -> float | None:
    """The first of a possibly multi-valued number, or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes | int | float):
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _modality_lut(header: Any) -> Any:
    """The image's rescale (identity when it has none), given explicitly so that multi-frame
    images without functional groups are handled too."""
    slope = _first_number(header.get("RescaleSlope")) or 1.0
    intercept = _first_number(header.get("RescaleIntercept")) or 0.0
    kind = str(header.get("RescaleType", "") or "")
    if not kind:
        kind = "HU" if str(header.get("Modality", "")) == "CT" else "US"
    import highdicom as hd  # loaded by the processes that draw marks, not every process

    return hd.ModalityLUTTransformation(
        rescale_intercept=intercept, rescale_slope=slope, rescale_type=kind)


def _voi_lut(header: Any) -> Any:
    """The image's first window, else one spanning its stored values."""
    import highdicom as hd
    center = _first_number(header.get("WindowCenter"))
    width = _first_number(header.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        return hd.pr.SoftcopyVOILUTTransformation(window_center=center, window_width=width)
    bits = int(header.get("BitsStored", 8) or 8)
    slope = _first_number(header.get("RescaleSlope")) or 1.0
    intercept = _first_number(header.get("RescaleIntercept")) or 0.0
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    low = -(2 ** (bits - 1)) if signed else 0
    span = 2 ** bits
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=(low + span / 2) * slope + intercept,
        window_width=max(span * abs(slope), 1))


@dataclass(frozen=True)
class Mark:
    """One arrow (from the first point to the second), length measurement, ellipse (in the box
    the two points span; its area is shown) or text (at one point), in image pixels
    (column, row)."""

    kind: str
    points: tuple[tuple[float, float], ...]
    label: str = ""

    @staticmethod
    def parse(data: dict[str, Any], columns: int, rows: int) -> Mark:
        """A mark from JSON; raises ImageShareError for anything malformed."""
        kind = str(data.get("kind", ""))
        if kind not in KINDS:
            raise ImageShareError("a mark is an arrow, a length, a text or an ellipse")
        wanted = 1 if kind in ONE_POINT else 2
        raw = data.get("points")
        if not isinstance(raw, list) or not all(
                isinstance(p, list) and len(p) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
                for p in raw):
            # "12" or ["1", "2"] are not points: refused, not read as digits.
            raise ImageShareError(f"a mark has {wanted} point(s) [x, y], each two numbers")
        points = tuple((float(p[0]), float(p[1])) for p in raw)
        if len(points) != wanted:
            raise ImageShareError(f"a mark of kind {kind} has {wanted} point(s) [x, y]")
        for x, y in points:
            if not (math.isfinite(x) and math.isfinite(y)
                    and 0 <= x <= columns and 0 <= y <= rows):
                raise ImageShareError("a mark lies outside the image")
        label = data.get("label", "")
        if label is None:
            label = ""
        if not isinstance(label, str):
            raise ImageShareError("a mark's label is text")
        if len(label) > 64:
            raise ImageShareError("a mark's label has at most 64 characters")
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in label):
            raise ImageShareError("a mark's label may not contain control characters")
        if kind == "text" and not label.strip():
            raise ImageShareError("a text mark needs its text")
        return Mark(kind, points, label)

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


def _area_text(mark: Mark, spacing: tuple[float, float] | None) -> str:
    (x1, y1), (x2, y2) = mark.points
    area = math.pi * abs(x2 - x1) / 2 * abs(y2 - y1) / 2
    if spacing:
        return f"{area * spacing[0] * spacing[1]:.1f} mm2"
    return f"{area:.0f} px2"


def _mark_text(mark: Mark, spacing: tuple[float, float] | None) -> str:
    """What is written next to a mark: its label, else its length or area."""
    if mark.label:
        return mark.label
    if mark.kind == "length":
        return _length_text(mark, spacing)
    if mark.kind == "ellipse":
        return _area_text(mark, spacing)
    return ""


# Patient and study attributes a presentation state copies from the image it marks (highdicom
# requires them present; an image without them gets them empty, as Type 2 allows).
_COPIED_EMPTY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _conformant(keyword: str, value: str) -> bool:
    """Whether a stored date (YYYYMMDD) or time (HHMMSS.FFFFFF) is written as PS3.5 says."""
    if not value:
        return True
    if keyword.endswith("Date"):
        return len(value) == 8 and value.isdigit()
    whole, _, fraction = value.strip().partition(".")
    return (len(whole) in (2, 4, 6) and whole.isdigit()
            and (not fraction or (len(fraction) <= 6 and fraction.isdigit())))


def _multiframe_iod(header: Any) -> bool:
    """Whether the image's IOD has frames (a Number of Frames in a single-frame IOD, as some
    Secondary Capture files carry, does not make it one)."""
    try:
        from highdicom._standard_utils import is_multiframe_image
        return bool(is_multiframe_image(header))
    except (KeyError, ValueError, AttributeError):
        return False


class AnnotationBook:
    """Saves and lists marks per image and author."""

    def __init__(self, engine: Engine, retrieve: RetrieveService, ingest: IngestService,
                 audit: AuditTrail) -> None:
        self._engine = engine
        self._retrieve = retrieve
        self._ingest = ingest
        self._audit = audit

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
        return _standard_srgb()

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
        import highdicom as hd

        columns, rows = float(header.Columns), float(header.Rows)
        reference = copy.deepcopy(header)
        for keyword in _COPIED_EMPTY:
            if keyword not in reference:
                setattr(reference, keyword, "")
        for keyword in ("StudyDate", "StudyTime", "PatientBirthDate"):
            if not _conformant(keyword, str(reference.get(keyword) or "")):
                setattr(reference, keyword, "")  # a non-conformant stored value is not copied
        if str(reference.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            # Palette colour images are colour images for a presentation state (PS3.3
            # A.35.2); the copy only serves to reference them, so it may say RGB.
            reference.SamplesPerPixel = 3
            reference.PhotometricInterpretation = "RGB"

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
            text = _mark_text(mark, spacing)
            if mark.kind == "text":
                (x, y), = mark.points
                texts.append(hd.pr.TextObject(text, "PIXEL", anchor_point=(x, y)))
                continue
            (x1, y1), (x2, y2) = mark.points
            if mark.kind == "ellipse":
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                rx, ry = max(abs(x2 - x1) / 2, 0.5), max(abs(y2 - y1) / 2, 0.5)
                horizontal = [[cx - rx, cy], [cx + rx, cy]]
                vertical = [[cx, cy - ry], [cx, cy + ry]]
                axes = horizontal + vertical if rx >= ry else vertical + horizontal
                objects.append(hd.pr.GraphicObject(
                    "ELLIPSE", np.array([inside(*p) for p in axes], dtype=float), "PIXEL",
                    is_filled=False))
                anchor = (cx, cy)
            else:
                objects.append(hd.pr.GraphicObject(
                    "POLYLINE", np.array([[x1, y1], [x2, y2]], dtype=float), "PIXEL"))
                if mark.kind == "arrow":
                    angle = math.atan2(y1 - y2, x1 - x2)
                    for turn in (0.4, -0.4):
                        head = inside(x2 + 12 * math.cos(angle + turn),
                                      y2 + 12 * math.sin(angle + turn))
                        objects.append(hd.pr.GraphicObject(
                            "POLYLINE", np.array([[x2, y2], head], dtype=float), "PIXEL"))
                anchor = ((x1 + x2) / 2, (y1 + y2) / 2)
            if text:
                texts.append(hd.pr.TextObject(text, "PIXEL", anchor_point=anchor))
        per_frame = frames > 1 and _multiframe_iod(reference)
        annotation = hd.pr.GraphicAnnotation(
            referenced_images=[reference], graphic_layer=layer,
            referenced_frame_number=frame if per_frame else None,
            graphic_objects=objects or None, text_objects=texts or None)
        colour = (int(header.get("SamplesPerPixel", 1) or 1) > 1
                  or str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR")
        common: dict[str, Any] = dict(
            referenced_images=[reference], series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="ImageShare",
            manufacturer_model_name="ImageShare", software_versions=__version__,
            device_serial_number="0", content_label="MARKS",
            content_description=f"Marks by {author_label}"[:64],
            graphic_annotations=[annotation], graphic_layers=[layer])
        state: Any
        if colour:
            state = hd.pr.ColorSoftcopyPresentationState(
                icc_profile=self._icc_profile(header), **common)
        else:
            state = hd.pr.GrayscaleSoftcopyPresentationState(
                modality_lut_transformation=_modality_lut(header),
                voi_lut_transformations=[_voi_lut(header)], **common)
        if "Laterality" not in state:
            state.Laterality = ""  # Type 2C in General Series; its body part is not known
        if any(not m.label.isascii() for m in marks) or not author_label.isascii():
            state.SpecificCharacterSet = "ISO_IR 192"
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

    def senders_for_share(self, owner: str, items: Iterable[Any]) -> dict[str, list[dict[str,
                                                                                      Any]]]:
        """The marks the share's sender (``owner``) drew on its images, keyed by the share's
        public ``SOP|frame``, without any author name: what a teaching case presented from its
        link shows (the sender chose to share them)."""
        public = {i.sop_uid: i.public_sop_uid for i in items if not i.held_back}
        with self._engine.connect() as conn:
            rows = conn.execute(select(marks_table).where(
                marks_table.c.author == owner,
                marks_table.c.sop_uid.in_(list(public)))).mappings().all()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(f"{public[row['sop_uid']]}|{row['frame']}", []).extend(
                {"kind": m["kind"], "points": m["points"], "label": m.get("label", "")}
                for m in row["marks"])
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
