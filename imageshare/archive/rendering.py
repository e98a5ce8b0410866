"""Rendered images (WADO-RS /rendered, /thumbnail): one frame decoded, windowed, encoded."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from imageshare.domain.errors import InvalidQuery, NotAcceptable, NotFound

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}


@dataclass(frozen=True)
class RenderOptions:
    """How to render: window (centre, width) or the file's own, viewport, format, quality."""

    media_type: str = "image/jpeg"
    window: tuple[float, float] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def parse_window(value: str | None) -> tuple[float, float] | None:
    """``center,width[,function]`` from a WADO-RS ``window`` parameter."""
    if not value:
        return None
    parts = value.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError) as exc:
        raise InvalidQuery("window must be 'center,width[,function]'") from exc
    if width <= 0:
        raise InvalidQuery("window width must be positive")
    return center, width


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``width,height`` from a WADO-RS ``viewport`` parameter."""
    if not value:
        return None
    try:
        w, h = (int(p) for p in value.split(",")[:2])
    except ValueError as exc:
        raise InvalidQuery("viewport must be 'width,height'") from exc
    if not (0 < w <= 8192 and 0 < h <= 8192):
        raise InvalidQuery("viewport must be between 1 and 8192 pixels")
    return w, h


def _to_8bit(ds: object, frame: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        if frame.dtype != np.uint8:
            top = float(frame.max()) or 1.0
            frame = (frame.astype(np.float64) * 255.0 / top).clip(0, 255)
        return frame.astype(np.uint8)
    values = apply_modality_lut(frame, ds).astype(np.float64)
    if window is not None:
        center, width = window
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        scaled = np.where(
            values <= low, 0.0,
            np.where(values > high, 255.0, ((values - (center - 0.5)) / (width - 1) + 0.5) * 255),
        )
    elif "WindowCenter" in ds and "WindowWidth" in ds:  # type: ignore[operator]
        scaled = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(scaled.min()), float(scaled.max())
        scaled = (scaled - low) * 255.0 / ((high - low) or 1.0)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * 255.0 / ((high - low) or 1.0)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.clip(0, 255).astype(np.uint8)


def render_frame(stream: BinaryIO, frame_index: int, options: RenderOptions) -> bytes:
    """Render frame ``frame_index`` (0-based) of the instance read from ``stream``."""
    fmt = MEDIA_TYPES.get(options.media_type)
    if fmt is None:
        raise NotAcceptable("rendered images are available as image/jpeg or image/png")
    header = dcmread(stream, stop_before_pixels=True)
    if "Rows" not in header:
        raise NotFound("the instance has no image to render")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame_index < frames:
        raise NotFound(f"frame {frame_index + 1} does not exist (the instance has {frames})")
    stream.seek(0)
    try:
        array = pixel_array(stream, index=frame_index)
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
        raise NotAcceptable(
            "the image cannot be decoded for rendering (no codec for its transfer syntax)"
        ) from exc
    image = Image.fromarray(_to_8bit(header, array, options.window))
    if options.viewport:
        image.thumbnail(options.viewport, Image.Resampling.LANCZOS)
    if fmt == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": options.quality} if fmt == "JPEG" else {}))
    return out.getvalue()
