"""The viewer's description of a share: only its own instances, under their public UIDs."""

from __future__ import annotations

from typing import Any

from pydicom import dcmread

from imageshare.archive.viewing import frame_rate, pixel_spacing, starting_window
from imageshare.sharing.links import Share, ShareItem, ShareService


def share_manifest(service: ShareService, share: Share, base: str) -> dict[str, Any]:
    """Series and frames of the share, for the viewer page served under the link."""
    by_series: dict[str, list[ShareItem]] = {}
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
            path = service.content(share, item)
            if path is None:
                continue
            ds = dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds:
                continue
            study = item.public_study_uid
            first = first or ds
            count = int(ds.get("NumberOfFrames", 1) or 1)
            if count > 1:
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
            "colour": int(first.get("SamplesPerPixel", 1) or 1) > 1,
            "cine": any(f["multi"] for f in frames),
            "frameRate": round(rate, 3) if rate else None,
            "window": starting_window(first), "spacing": pixel_spacing(first),
            "frames": frames,
        })
    return {"study": study, "series": series_out, "initial": 0, "base": base}
