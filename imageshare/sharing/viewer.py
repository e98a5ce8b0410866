"""The viewer's description of a share: only its own instances, under their public UIDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from imageshare.archive.studies import ENCAPSULATED_PDF
from imageshare.archive.transcode import is_video
from imageshare.archive.viewing import (
    VIDEO_CLASSES,
    frame_rate,
    is_colour,
    pixel_spacing,
    starting_window,
)
from imageshare.domain.errors import NotFound
from imageshare.sharing.links import Share, ShareItem, ShareService


def shown_file(service: ShareService, share: Share, item: ShareItem) -> Path | None:
    """The file the recipient sees of ``item``, or None when there is none to show: held
    back by de-identification, or deleted from the archive since it was shared (a rejected
    or expired instance leaves the rest of the share working)."""
    try:
        return service.content(share, item)
    except NotFound:
        return None


def is_video_instance(ds: Dataset) -> bool:
    """True for an instance whose pixel data is a video stream (MPEG-2/4, HEVC) or of a
    video storage class: it plays in the browser's own player, not frame by frame."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return is_video(syntax) or str(ds.get("SOPClassUID", "")) in VIDEO_CLASSES


def share_manifest(service: ShareService, share: Share, base: str) -> dict[str, Any]:
    """Series and frames of the share, for the viewer page served under the link (a video
    as one item the viewer plays; instances held back or deleted since are left out), and
    its PDF documents (a report), which the recipient reads with the view right alone."""
    by_series: dict[str, list[ShareItem]] = {}
    documents: list[dict[str, str]] = []
    for item in service.items(share):
        if not item.held_back:
            by_series.setdefault(item.public_series_uid, []).append(item)
    series_out: list[dict[str, Any]] = []
    study = ""
    for public_series, members in by_series.items():
        first = None
        frames: list[dict[str, Any]] = []
        rate = None
        for item in members:
            path = shown_file(service, share, item)
            if path is None:
                continue
            ds = dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds:
                if str(ds.get("SOPClassUID", "")) == ENCAPSULATED_PDF:
                    documents.append({"sop": item.public_sop_uid,
                                      "title": str(ds.get("DocumentTitle", "") or "")
                                      or f"Document {len(documents) + 1}"})
                continue
            study = item.public_study_uid
            first = first or ds
            count = int(ds.get("NumberOfFrames", 1) or 1)
            if is_video_instance(ds):
                frames.append({"sop": item.public_sop_uid, "frame": 1, "multi": False,
                               "video": True})
            elif count > 1:
                frames += [{"sop": item.public_sop_uid, "frame": n, "multi": True}
                           for n in range(1, count + 1)]
                rate = rate or frame_rate(ds)
            else:
                frames.append({"sop": item.public_sop_uid, "frame": 1, "multi": False})
        if first is None or not frames:
            continue
        series_out.append({
            "uid": public_series, "study": members[0].public_study_uid,
            "modality": str(first.get("Modality", "")),
            "number": first.get("SeriesNumber"),
            "description": str(first.get("SeriesDescription", "") or ""),
            "colour": is_colour(first),
            "cine": any(f["multi"] for f in frames),
            "video": any(f.get("video") for f in frames),
            "frameRate": round(rate, 3) if rate else None,
            "window": starting_window(first), "spacing": pixel_spacing(first),
            "frames": frames,
        })
    return {"study": study, "series": series_out, "initial": 0, "base": base,
            "documents": documents}
