"""What the browser viewer needs to show a study: series, frames in display order, the frame
rate of cine loops and a starting window. Frames are rendered by the server (WADO-RS
/rendered), so the browser never decodes DICOM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from imageshare.archive.rendering import frame_display_header
from imageshare.archive.studies import StudyRecord
from imageshare.archive.transcode import is_video

_MAX_HEADERS = 200


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second of a multi-frame instance: Frame Time, then Cine Rate, then
    Recommended Display Frame Rate, then the mean of the Frame Time Vector."""
    try:
        frame_time = float(ds.get("FrameTime") or 0)
        if frame_time > 0:
            return 1000.0 / frame_time
        for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
            value = float(ds.get(keyword) or 0)
            if value > 0:
                return value
        vector = [float(v) for v in (ds.get("FrameTimeVector") or [])][1:]
        if vector and sum(vector) > 0:
            return 1000.0 * len(vector) / sum(vector)
    except (TypeError, ValueError):
        return None
    return None


def is_colour(ds: Dataset) -> bool:
    """True for colour images: more than one sample per pixel, or a palette (PALETTE COLOR),
    which are shown as they are, not windowed."""
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1
    return samples != 1 or str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR"


def starting_window(ds: Dataset) -> list[float] | None:
    """The window (centre, width) in stored-value units after the modality LUT: the first
    frame's first one (an enhanced multi-frame instance's from its functional groups), else
    the range its bits can hold; None for colour."""
    if is_colour(ds):
        return None
    ds = frame_display_header(ds, 0)
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            return [float(_first(center)), float(_first(width))]
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        slope = float(ds.get("RescaleSlope") or 1)
        intercept = float(ds.get("RescaleIntercept") or 0)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        low = -(2 ** (bits - 1)) if signed else 0
        span = 2 ** bits
        return [intercept + slope * (low + span / 2), slope * span]
    except (TypeError, ValueError):
        return None


def pixel_spacing(ds: Dataset) -> list[float] | None:
    """Row and column spacing in mm (Pixel Spacing, else Imager Pixel Spacing), if known."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                return [float(value[0]), float(value[1])]
            except (TypeError, ValueError):
                return None
    return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, MultiValue | list | tuple) else value


# Video Endoscopic, Video Microscopic and Video Photographic Image Storage
VIDEO_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.5.1.4.1.1.77.1.2.1",
                           "1.2.840.10008.5.1.4.1.1.77.1.4.1"})


def _is_video_file(ds: Dataset | None) -> bool:
    """True when a stored header says its pixel data is a video stream (MPEG-2/4, HEVC)."""
    meta = getattr(ds, "file_meta", None) if ds is not None else None
    return bool(meta is not None and is_video(str(meta.get("TransferSyntaxUID", ""))))


def viewer_manifest(
    study: StudyRecord, header: Callable[[str], Dataset | None], initial_series: str = ""
) -> dict[str, Any]:
    """The viewer's description of ``study`` (image series only, in series order)."""
    out: list[dict[str, Any]] = []
    initial = 0
    budget = _MAX_HEADERS
    for series in study.series:
        if series.is_documents or not series.instances:
            continue
        first = header(series.instances[0].sop_uid) if budget > 0 else None
        budget -= 1
        frames: list[dict[str, Any]] = []
        rate = None
        video_file = _is_video_file(first)
        for inst in series.instances:
            if inst.rows is None:
                continue
            if inst.sop_class_uid in VIDEO_CLASSES or video_file:
                # a video plays in the browser's own player (rendered as video/mp4)
                frames.append({"sop": inst.sop_uid, "frame": 1, "multi": False, "video": True})
            elif inst.frames > 1:
                frames.extend({"sop": inst.sop_uid, "frame": n, "multi": True}
                              for n in range(1, inst.frames + 1))
                if rate is None:
                    ds = first if inst is series.instances[0] else header(inst.sop_uid)
                    rate = frame_rate(ds) if ds is not None else None
            else:
                frames.append({"sop": inst.sop_uid, "frame": 1, "multi": False})
        if not frames:
            continue
        if series.series_uid == initial_series:
            initial = len(out)
        colour = first is not None and is_colour(first)
        out.append({
            "uid": series.series_uid, "modality": series.modality, "number": series.number,
            "description": series.description,
            "colour": colour,
            "cine": any(i.frames > 1 for i in series.instances),
            "video": any(f.get("video") for f in frames),
            "frameRate": round(rate, 3) if rate else None,
            "window": starting_window(first) if first is not None else None,
            "spacing": pixel_spacing(first) if first is not None else None,
            "frames": frames,
        })
    return {"study": study.study_uid, "series": out, "initial": initial}
