"""Rendered images (WADO-RS /rendered, /thumbnail): one frame decoded (within the pixel
budget), windowed, encoded."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from imageshare.archive.pixel_budget import check_pixel_budget, decoding
from imageshare.domain.errors import ImageTooLarge, InvalidQuery, NotAcceptable, NotFound

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


_STRIP_PIXELS = 1 << 22  # pixels converted at a time: temporaries stay small for huge frames


def _strips(rows: int, columns: int) -> list[slice]:
    step = max(1, _STRIP_PIXELS // max(1, columns))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _to_8bit(ds: object, frame: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """The frame as 8-bit pixels for display, converted a strip of rows at a time (so that a
    large frame needs little memory beyond itself and its 8-bit result)."""
    strips = _strips(frame.shape[0], frame.shape[1] if frame.ndim > 1 else 1)
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        if frame.dtype == np.uint8:
            return frame
        top = float(frame.max()) or 1.0
        out = np.empty(frame.shape, dtype=np.uint8)
        for rows in strips:
            out[rows] = (frame[rows].astype(np.float32) * (255.0 / top)).clip(0, 255)
        return out

    def values(rows: slice) -> np.ndarray:
        return apply_modality_lut(frame[rows], ds).astype(np.float64, copy=False)

    if window is not None:
        center, width = window
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2

        def scale(rows: slice) -> np.ndarray:
            v = values(rows)
            return np.where(
                v <= low, 0.0,
                np.where(v > high, 255.0, ((v - (center - 0.5)) / (width - 1) + 0.5) * 255),
            )
    else:
        if "WindowCenter" in ds and "WindowWidth" in ds:  # type: ignore[operator]
            def shown(rows: slice) -> np.ndarray:
                return apply_voi_lut(values(rows), ds, index=0).astype(np.float64, copy=False)
        else:
            shown = values
        if len(strips) == 1:
            whole = shown(strips[0])
            lowest, highest = float(whole.min()), float(whole.max())

            def again(_rows: slice) -> np.ndarray:
                return whole
        else:  # two passes over the strips: the range first, then the pixels
            lowest, highest = np.inf, -np.inf
            for rows in strips:
                part = shown(rows)
                lowest, highest = min(lowest, float(part.min())), max(highest, float(part.max()))
            again = shown
        span = (highest - lowest) or 1.0

        def scale(rows: slice) -> np.ndarray:
            return (again(rows) - lowest) * (255.0 / span)

    out = np.empty(frame.shape[:2], dtype=np.uint8)
    invert = getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1"
    for rows in strips:
        scaled = scale(rows)
        if invert:
            scaled = 255.0 - scaled
        out[rows] = scaled.clip(0, 255)
    return out


def render_frame(stream: BinaryIO, frame_index: int, options: RenderOptions) -> bytes:
    """Render frame ``frame_index`` (0-based) of the instance read from ``stream``."""
    fmt = MEDIA_TYPES.get(options.media_type)
    if fmt is None:
        raise NotAcceptable("rendered images are available as image/jpeg or image/png")
    header = dcmread(stream, stop_before_pixels=True)
    size = check_pixel_budget(header)
    if size is None or "Rows" not in header:
        raise NotFound("the instance has no image to render")
    frames = size.frames
    if not 0 <= frame_index < frames:
        raise NotFound(f"frame {frame_index + 1} does not exist (the instance has {frames})")
    stream.seek(0)
    with decoding(header):  # the budget is checked and a decode slot held until encoded
        try:
            array = pixel_array(stream, index=frame_index)
        except MemoryError as exc:
            raise ImageTooLarge("the image does not fit in memory now") from exc
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
            raise NotAcceptable(
                "the image cannot be decoded for rendering (no codec for its transfer syntax)"
            ) from exc
        image = Image.fromarray(_to_8bit(header, array, options.window))
        del array
        if options.viewport:
            image.thumbnail(options.viewport, Image.Resampling.LANCZOS)
        if fmt == "JPEG" and image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format=fmt, **({"quality": options.quality} if fmt == "JPEG" else {}))
    return out.getvalue()
