"""Rendered images (WADO-RS /rendered, /thumbnail): frames decoded (within the pixel budget),
windowed, encoded as JPEG, PNG or GIF (an animated GIF plays every frame of a multi-frame
instance)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import JPEGBaseline8Bit

from imageshare.archive.pixel_budget import check_pixel_budget, decoding
from imageshare.domain.errors import (
    ImageShareError,
    ImageTooLarge,
    InvalidQuery,
    NotAcceptable,
    NotFound,
)

log = logging.getLogger("imageshare.rendering")

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
MAX_RENDERED_FRAMES = 1000


# VOI LUT functions (PS3.3 C.11.2.1.3) by their PS3.18 ``window`` names.
WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width in modality units, and its function (LINEAR,
    LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2-3)."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Region:
    """The part of a frame to show, cut out before the picture is fitted to the viewport:
    either ``fractions`` of its width and height (left, top, right, bottom, from 0.0 to 1.0:
    the WADO-URI ``region``) or ``pixels`` (sx, sy, sw, sh: the top-left corner and the
    size in source pixels, a negative size flipping that axis: the WADO-RS ``viewport``'s
    source rectangle, sw and sh None for 'to the edge of the frame')."""

    fractions: tuple[float, float, float, float] | None = None
    pixels: tuple[int, int, int | None, int | None] | None = None


@dataclass(frozen=True)
class RenderOptions:
    """How to render: window or the file's own, viewport (width, height in pixels), the
    region of the frame shown (all of it when None), format, JPEG quality (1 to 100)."""

    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90
    region: Region | None = None


def window_of(center: str, width: str, function: str = "linear") -> Window:
    """A window from its centre, width and function as a request gives them (the function
    named as PS3.18 names it: linear, linear-exact or sigmoid, in any case); InvalidQuery
    with the reason for numbers that are not finite, or a width below what the function
    allows (at least 1 for linear, above 0 for the others, PS3.3 C.11.2.1.2)."""
    try:
        centre, span = float(center), float(width)
    except ValueError as exc:
        raise InvalidQuery("window center and width must be numbers") from exc
    if not (np.isfinite(centre) and np.isfinite(span)):
        raise InvalidQuery("window center and width must be finite numbers")
    kind = WINDOW_FUNCTIONS.get(function.strip().lower().replace("_", "-"))
    if kind is None:
        raise InvalidQuery("window function must be linear, linear-exact or sigmoid")
    if kind == "LINEAR" and span < 1:
        raise InvalidQuery("window width must be at least 1 for linear windowing")
    if span <= 0:
        raise InvalidQuery("window width must be greater than 0")
    return Window(centre, span, kind)


def parse_window(value: str | None) -> Window | None:
    """``center,width[,function]`` from a WADO-RS ``window`` parameter (PS3.18; the function
    linear when left out); None when the parameter is absent. InvalidQuery with
    the reason for anything else, an empty value included."""
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) not in (2, 3):
        raise InvalidQuery("window must be 'center,width' or 'center,width,function'")
    return window_of(*parts)


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``vw,vh`` of a WADO-RS ``viewport`` parameter (``vw,vh[,sx,sy,sw,sh]``; the source
    rectangle is :func:`parse_viewport_source`'s); InvalidQuery with the reason for anything
    else, more or fewer values included."""
    if not value:
        return None
    parts = value.split(",")
    if not 2 <= len(parts) <= 6:
        raise InvalidQuery("viewport must be 'vw,vh' or 'vw,vh,sx,sy,sw,sh'")
    try:
        w, h = (int(p) for p in parts[:2])
    except ValueError as exc:
        raise InvalidQuery("viewport width and height must be whole numbers") from exc
    if not (0 < w <= 8192 and 0 < h <= 8192):
        raise InvalidQuery("viewport must be between 1 and 8192 pixels")
    return w, h


def parse_viewport_source(value: str | None) -> Region | None:
    """The source rectangle ``sx,sy,sw,sh`` of a WADO-RS ``viewport=vw,vh,sx,sy,sw,sh``
    (PS3.18 8.3.5.1.3): its top-left corner in source pixels (0 when left empty or out)
    and its width and height (to the frame's edge when left empty or out; negative flips
    the axis); None when the viewport has no source rectangle. InvalidQuery with the
    reason otherwise."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) <= 2 or not any(parts[2:]):
        return None  # no source rectangle (parse_viewport refuses other shapes)
    parts += [""] * (6 - len(parts))
    try:
        sx, sy = (int(p) if p else 0 for p in parts[2:4])
        sw, sh = (int(p) if p else None for p in parts[4:6])
    except ValueError as exc:
        raise InvalidQuery("viewport source values must be whole numbers") from exc
    if sx < 0 or sy < 0 or sw == 0 or sh == 0:
        raise InvalidQuery("viewport source must start inside the image and not be empty")
    return Region(pixels=(sx, sy, sw, sh))


def parse_region(value: str | None) -> Region | None:
    """``left,top,right,bottom`` of a WADO-URI ``region`` (fractions of the image from 0.0
    to 1.0, left below right and top below bottom); None when absent. InvalidQuery with
    the reason for anything else."""
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 4:
        raise InvalidQuery("region must be 'left,top,right,bottom' (fractions from 0 to 1)")
    try:
        left, top, right, bottom = (float(p) for p in parts)
    except ValueError as exc:
        raise InvalidQuery("region values must be numbers from 0 to 1") from exc
    if not all(0.0 <= v <= 1.0 for v in (left, top, right, bottom)):
        raise InvalidQuery("region values must be numbers from 0 to 1")
    if not (left < right and top < bottom):
        raise InvalidQuery("region's left must be below its right, its top below its bottom")
    return Region(fractions=(left, top, right, bottom))


def _cut(image: Image.Image, region: Region | None) -> Image.Image:
    """The part of ``image`` that ``region`` names (flipped where its size is negative);
    InvalidQuery when it lies outside the image."""
    if region is None:
        return image
    width, height = image.size
    if region.fractions is not None:
        left, top, right, bottom = region.fractions
        box = (int(left * width), int(top * height),
               max(int(left * width) + 1, round(right * width)),
               max(int(top * height) + 1, round(bottom * height)))
        return image.crop(box)
    assert region.pixels is not None
    sx, sy, sw, sh = region.pixels
    if sx >= width or sy >= height:
        raise InvalidQuery(f"the viewport source lies outside the image ({width}x{height})")
    sw = width - sx if sw is None else sw
    sh = height - sy if sh is None else sh
    # A negative size reaches back from the corner (and flips): PS3.18 8.3.5.1.3.
    x0, x1 = sorted((sx, sx + sw))
    y0, y1 = sorted((sy, sy + sh))
    box = (max(0, x0), max(0, y0), min(width, x1), min(height, y1))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise InvalidQuery(f"the viewport source lies outside the image ({width}x{height})")
    cut = image.crop(box)
    if sw < 0:
        cut = cut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh < 0:
        cut = cut.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return cut


def _shaped(image: Image.Image, options: RenderOptions) -> Image.Image:
    """``image`` cut to the options' region, then fitted into their viewport."""
    image = _cut(image, options.region)
    if options.viewport:
        image.thumbnail(options.viewport, Image.Resampling.LANCZOS)
    return image


_STRIP_PIXELS = 1 << 22  # pixels converted at a time: temporaries stay small for huge frames


def _strips(rows: int, columns: int) -> list[slice]:
    step = max(1, _STRIP_PIXELS // max(1, columns))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _to_8bit(ds: Dataset, frame: np.ndarray, window: Window | None) -> np.ndarray:
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

    if frame.ndim != 2:
        raise ValueError("the frame is not a two-dimensional image")

    def values(rows: slice) -> np.ndarray:
        try:
            return apply_modality_lut(frame[rows], ds).astype(np.float64, copy=False)
        except Exception:  # noqa: BLE001 - invalid rescale values: the stored values shown
            return frame[rows].astype(np.float64)

    if window is not None:
        chosen: Window = window

        def scale(rows: slice) -> np.ndarray:
            return _windowed(values(rows), chosen)
    else:
        if "WindowCenter" in ds and "WindowWidth" in ds:
            def shown(rows: slice) -> np.ndarray:
                try:
                    return apply_voi_lut(values(rows), ds, index=0).astype(np.float64,
                                                                            copy=False)
                except Exception:  # noqa: BLE001 - invalid window values: full range
                    return values(rows)
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
            again = shown  # type: ignore[assignment]  # same signature, another name
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


def _windowed(v: np.ndarray, window: Window) -> np.ndarray:
    """Modality values through a VOI window (PS3.3 C.11.2.1.2-3) onto 0..255 (the caller
    clips)."""
    center, width = window.center, window.width
    # Whole-array arithmetic evaluates every branch: a width of 1 divides by zero in the one
    # never chosen, and the sigmoid overflows far from the centre (to 0 or 255, as it should).
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if window.function == "SIGMOID":
            return 255.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
        if window.function == "LINEAR_EXACT":
            return ((v - center) / width + 0.5) * 255.0
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        return np.where(
            v <= low, 0.0,
            np.where(v > high, 255.0, ((v - (center - 0.5)) / (width - 1) + 0.5) * 255),
        )


# Colour JPEG photometric interpretations a browser's JPEG decoder renders as DICOM means them
# (YCbCr converted to RGB): not RGB-in-JPEG, which would be converted once too often.
_BROWSER_YBR = ("YBR_FULL_422", "YBR_FULL")


class _Frames:
    """Decodes frames of one stored instance, one at a time."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.header: Dataset = dcmread(stream, stop_before_pixels=True)
        size = check_pixel_budget(self.header)  # refuses bombs before anything is decoded
        if size is None or "Rows" not in self.header:
            raise NotFound("the instance has no image to render")
        self.count = size.frames

    def check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise NotFound(f"frame {index + 1} does not exist (the instance has {self.count})")

    def image(self, index: int, options: RenderOptions) -> Image.Image:
        self.check(index)
        self.stream.seek(0)
        with decoding(self.header):  # a decode slot is held until the frame is 8-bit
            try:
                array = pixel_array(self.stream, index=index)
            except MemoryError as exc:
                raise ImageTooLarge("the image does not fit in memory now") from exc
            except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
                raise NotAcceptable(
                    "the image cannot be decoded for rendering (no codec for its transfer "
                    "syntax, or damaged pixel data)"
                ) from exc
            image = Image.fromarray(_to_8bit(self.header, array, options.window))
            del array
        return _shaped(image, options)

    def stored_jpeg(self, index: int, options: RenderOptions) -> bytes | None:
        """The frame's stored baseline JPEG bitstream when it can be sent as the rendering
        asked for (JPEG, no window, no viewport, 8-bit YBR colour that browsers decode as
        DICOM means it), else None."""
        self.check(index)
        header = self.header
        syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
        if (options.media_type != "image/jpeg" or options.window or options.viewport
                or options.region or syntax != JPEGBaseline8Bit
                or str(header.get("PhotometricInterpretation", "")) not in _BROWSER_YBR
                or int(header.get("SamplesPerPixel", 1) or 1) != 3
                or int(header.get("BitsAllocated", 0) or 0) != 8):
            return None
        self.stream.seek(0)
        dcmread(self.stream, stop_before_pixels=True)
        element = self.stream.read(8)
        if len(element) != 8 or element[:4] != b"\xe0\x7f\x10\x00" or element[4:6] != b"OB":
            return None
        self.stream.read(4)  # reserved bytes, then the undefined length
        try:
            frame = get_frame(self.stream, index, number_of_frames=self.count)
        except (ValueError, OSError, EOFError):
            return None
        return frame if frame[:3] == b"\xff\xd8\xff" else None

    def frame_duration_ms(self) -> int:
        """How long each frame shows: Frame Time, else Cine Rate, else the recommended rate."""
        for keyword, per_second in (("FrameTime", False), ("CineRate", True),
                                    ("RecommendedDisplayFrameRate", True)):
            try:
                value = float(self.header.get(keyword) or 0)
            except (TypeError, ValueError):
                continue
            if value > 0:
                return max(10, round(1000 / value if per_second else value))
        return 33


def _encode(image: Image.Image, options: RenderOptions) -> bytes:
    fmt = MEDIA_TYPES[options.media_type]
    if fmt == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": options.quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def _rendering(work: Any) -> Any:
    """Run ``work``; anything but a typed refusal becomes 'cannot be rendered'."""
    try:
        return work()
    except ImageShareError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd stored values must not become a 500
        log.warning("rendering failed: %s", type(exc).__name__)
        raise NotAcceptable("the image cannot be rendered from its stored values") from exc


def _check_media(options: RenderOptions) -> None:
    if options.media_type not in MEDIA_TYPES:
        raise NotAcceptable("rendered images are available as image/jpeg, image/png or "
                            "image/gif")


def render_frame(stream: BinaryIO, frame_index: int, options: RenderOptions) -> bytes:
    """Render frame ``frame_index`` (0-based) of the instance read from ``stream``. A colour
    frame stored as baseline JPEG (YBR_FULL / YBR_FULL_422, as ultrasound cine loops often
    are) asked for as JPEG at its own size is sent as stored: the same picture, without a
    decode and a second lossy encode (about 2 ms instead of 45 for a 640x480 frame)."""
    _check_media(options)

    def work() -> bytes:
        frames = _Frames(stream)
        stored = frames.stored_jpeg(frame_index, options)
        if stored is not None:
            return stored
        return _encode(frames.image(frame_index, options), options)

    return _rendering(work)


def render_video_still(stream: BinaryIO, options: RenderOptions) -> bytes:
    """The first picture of a video instance (its poster: thumbnails, a still asked for
    as an image), decoded from its MPEG stream."""
    _check_media(options)

    def work() -> bytes:
        import av

        ds = dcmread(stream)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        data = b"".join(generate_fragments(ds.PixelData))
        form = None if data[4:8] == b"ftyp" else (
            "hevc" if syntax.startswith(("1.2.840.10008.1.2.4.107",
                                         "1.2.840.10008.1.2.4.108")) else
            "mpegvideo" if syntax.startswith(("1.2.840.10008.1.2.4.100",
                                              "1.2.840.10008.1.2.4.101")) else "h264")
        with av.open(io.BytesIO(data), format=form) as container:
            for picture in container.decode(video=0):  # type: ignore[union-attr]
                image = picture.to_image()
                break
            else:
                raise NotAcceptable("the video holds no picture to show")
        return _encode(_shaped(image, options), options)

    return _rendering(work)


def frame_count(stream: BinaryIO) -> int:
    """How many frames the image read from ``stream`` has (NotFound when it is no image)."""
    return _rendering(lambda: _Frames(stream).count)


def render_frames(
    stream: BinaryIO, frame_indexes: Sequence[int] | None, options: RenderOptions
) -> list[bytes]:
    """Render the given frames (0-based; None for every frame), each as its own image."""
    _check_media(options)

    def work() -> list[bytes]:
        frames = _Frames(stream)
        indexes = list(range(frames.count)) if frame_indexes is None else list(frame_indexes)
        if len(indexes) > MAX_RENDERED_FRAMES:
            raise InvalidQuery(f"at most {MAX_RENDERED_FRAMES} frames are rendered at once")
        for index in indexes:
            frames.check(index)
        return [_encode(frames.image(i, options), options) for i in indexes]

    return _rendering(work)


def render_animation(stream: BinaryIO, options: RenderOptions) -> bytes:
    """Every frame of the instance as one animated GIF at the instance's frame rate."""

    def work() -> bytes:
        frames = _Frames(stream)
        if frames.count > MAX_RENDERED_FRAMES:
            raise InvalidQuery(f"at most {MAX_RENDERED_FRAMES} frames are rendered at once")
        images = [frames.image(i, options) for i in range(frames.count)]
        out = io.BytesIO()
        images[0].save(out, format="GIF", save_all=len(images) > 1, append_images=images[1:],
                       duration=frames.frame_duration_ms(), loop=0)
        return out.getvalue()

    return _rendering(work)
