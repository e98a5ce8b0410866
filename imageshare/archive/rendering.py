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
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import JPEGBaseline8Bit

from imageshare.archive.pixel_budget import (
    check_codestream,
    check_pixel_budget,
    check_stream_codestreams,
    current_limits,
    decoding,
    read_frame,
)
from imageshare.archive.transcode import video_bitstream
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
MAX_VIEWPORT = 8192  # widest and tallest viewport rendered (pixels)


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


DEFAULT_QUALITY = 90  # JPEG quality of a rendering that asks for none


@dataclass(frozen=True)
class RenderOptions:
    """How to render: window or the file's own, viewport (width, height in pixels), the
    region of the frame shown (all of it when None), format, JPEG quality (1 to 100; None:
    the default, 90, and a frame stored as baseline JPEG may be sent as stored)."""

    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    quality: int | None = None
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
    if not (0 < w <= MAX_VIEWPORT and 0 < h <= MAX_VIEWPORT):
        raise InvalidQuery(f"viewport width and height (vw,vh) must be between 1 and "
                           f"{MAX_VIEWPORT} pixels")
    return w, h


def parse_viewport_source(value: str | None) -> Region | None:
    """The source rectangle ``sx,sy,sw,sh`` of a WADO-RS ``viewport=vw,vh,sx,sy,sw,sh``
    (PS3.18 8.3.5.1.3): its top-left corner in source pixels (0 when left empty or out)
    and its width and height (to the frame's edge when left empty or out; a negative one
    selects as many pixels rightwards or downwards from the corner and flips that axis);
    None when the viewport has no source rectangle. InvalidQuery with the reason
    otherwise."""
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
    """The part of ``image`` that ``region`` names (flipped where its size is negative, the
    part clipped to the image); InvalidQuery when it starts outside the image."""
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
        raise InvalidQuery(f"the viewport source starts outside the image ({width}x{height}): "
                           f"sx must be below {width} and sy below {height}")
    # (sx, sy) is the source region's top-left corner whatever the signs; a negative width
    # or height selects as much as its magnitude and flips that axis (PS3.18 8.3.5.1.3).
    # The region is clipped to the image.
    across = width - sx if sw is None else min(abs(sw), width - sx)
    down = height - sy if sh is None else min(abs(sh), height - sy)
    cut = image.crop((sx, sy, sx + across, sy + down))
    if sw is not None and sw < 0:
        cut = cut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sh is not None and sh < 0:
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


# What a functional group may say about how a frame is shown (PS3.3 C.7.6.16.2.9-10).
_FRAME_DISPLAY_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def frame_display_header(ds: Dataset, index: int = 0) -> Dataset:
    """The header that says how frame ``index`` (0-based) is shown: ``ds`` itself, or for an
    enhanced multi-frame instance its top level with the rescale and window of the Shared,
    then that frame's Per-frame Functional Groups (Pixel Value Transformation, Frame VOI LUT)
    in place of the top level's. ``ds`` is not changed."""
    groups: list[Dataset] = []
    for keyword, position in zip(_FUNCTIONAL_GROUPS, (0, index), strict=True):
        sequence = ds.get(keyword)
        if sequence and 0 <= position < len(sequence):
            groups.append(sequence[position])
    found = [item for group in groups for keyword in _FRAME_DISPLAY_GROUPS
             for item in (group.get(keyword) or [])[:1]]
    if not found:
        return ds
    view = Dataset()
    for element in ds:
        if element.keyword not in _FUNCTIONAL_GROUPS:
            view.add(element)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for item in found:
        for element in item:
            view.add(element)
    return view


def _header_window(ds: Dataset) -> Window | None:
    """The header's first window (Window Center and Width, VOI LUT Function), or None when it
    has none that can be used (missing, not numbers, too narrow for its function)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        function = str(ds.get("VOILUTFunction") or "linear")
        return window_of(str(_first(center)), str(_first(width)), function)
    except (InvalidQuery, TypeError, ValueError, IndexError):
        return None


def _first(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return value
    try:
        return value[0]
    except TypeError:
        return value


def _voi_lut(ds: Dataset) -> tuple[np.ndarray, int, int] | None:
    """The first VOI LUT of the header's VOI LUT Sequence (PS3.3 C.11.2.1.1) as (its
    entries, the first value mapped, the largest value an entry can take), or None when it
    has none that can be used."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes | bytearray):
            syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
            order = ">" if syntax == "1.2.840.10008.1.2.2" else "<"
            table = np.frombuffer(bytes(data[: len(data) // 2 * 2]), dtype=f"{order}u2")
        else:
            table = np.asarray(_listed(data), dtype=np.int64)
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    table = table[: entries or 65536].astype(np.float64)
    if not table.size or not 1 <= bits <= 16:
        return None
    top = (1 << bits) - 1
    if bits > 8 and float(table.max()) <= 255:  # 8-bit entries under a 16-bit descriptor
        top = 255
    return table, first, top


def _listed(value: Any) -> list[Any]:
    return [value] if isinstance(value, int | float) else list(value)


def _palette_rgb(ds: Dataset, frame: np.ndarray, strips: list[slice]) -> np.ndarray:
    """A PALETTE COLOR frame through its palette (normal or segmented, 8 or 16 bits per
    entry, PS3.3 C.7.6.3.1.5-6) as 8-bit RGB, a strip of rows at a time."""
    bits = 16
    try:
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    parts = [apply_color_lut(frame[rows], ds) for rows in strips[:1]]
    if parts[0].dtype == np.uint8:
        top = 255.0
    else:
        top = float((1 << bits) - 1) if 8 < bits <= 16 else 65535.0
        if _palette_peak(ds) <= 255:  # 8-bit entries under a 16-bit descriptor
            top = 255.0
    out = np.empty((*frame.shape, 3), dtype=np.uint8)
    for number, rows in enumerate(strips):
        rgb = parts[0] if number == 0 else apply_color_lut(frame[rows], ds)
        out[rows] = (rgb.astype(np.float32) * (255.0 / top) + 0.5).clip(0, 255)
    return out


def _palette_peak(ds: Dataset) -> float:
    """The largest entry of a palette (every colour and index), for telling 8-bit entries
    in a 16-bit descriptor; the 16-bit maximum when it cannot be told."""
    try:
        return float(apply_color_lut(np.arange(1 << 16, dtype=np.uint16)[
            : int(ds.RedPaletteColorLookupTableDescriptor[0] or 65536)]
            + int(ds.RedPaletteColorLookupTableDescriptor[1]), ds).max())
    except Exception:  # noqa: BLE001 - an odd palette: no quirk assumed
        return 65535.0


def _to_8bit(ds: Dataset, frame: np.ndarray, window: Window | None,
             index: int = 0) -> np.ndarray:
    """Frame ``index`` (0-based) as 8-bit pixels for display, converted a strip of rows at a
    time (so that a large frame needs little memory beyond itself and its 8-bit result).
    Greyscale goes through the modality LUT (rescale, or the frame's own in an enhanced
    multi-frame instance), then ``window``, else the header's first window, else its VOI
    LUT, else the range of the frame's values; MONOCHROME1 is inverted and values that are
    not numbers (floating-point NaN) show black. A palette goes through its colour LUT, and
    colour of more than 8 bits is scaled from the range its bits can hold."""
    ds = frame_display_header(ds, index)
    strips = _strips(frame.shape[0], frame.shape[1] if frame.ndim > 1 else 1)
    if frame.ndim == 2 and str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        return _palette_rgb(ds, frame, strips)
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        if frame.dtype == np.uint8:
            return frame
        try:
            bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
        except (TypeError, ValueError):
            bits = 0
        top = float((1 << bits) - 1) if 8 < bits <= 32 and np.issubdtype(
            frame.dtype, np.integer) else float(np.nanmax(frame)) or 1.0
        out = np.empty(frame.shape, dtype=np.uint8)
        for rows in strips:
            part = np.nan_to_num(frame[rows].astype(np.float32) * (255.0 / top))
            out[rows] = part.clip(0, 255)
        return out

    if frame.ndim != 2:
        raise ValueError("the frame is not a two-dimensional image")

    def values(rows: slice) -> np.ndarray:
        try:
            return apply_modality_lut(frame[rows], ds).astype(np.float64, copy=False)
        except Exception:  # noqa: BLE001 - invalid rescale values: the stored values shown
            return frame[rows].astype(np.float64)

    chosen = window or _header_window(ds)
    lut = None if chosen is not None else _voi_lut(ds)
    if chosen is not None:
        windowed: Window = chosen

        def scale(rows: slice) -> np.ndarray:
            return _windowed(values(rows), windowed)
    elif lut is not None:
        table, first, top = lut

        def scale(rows: slice) -> np.ndarray:
            v = np.nan_to_num(values(rows), nan=float(first), posinf=float(first + table.size),
                              neginf=float(first))
            at = np.clip(np.floor(v) - first, 0, table.size - 1).astype(np.intp)
            return table[at] * (255.0 / top)
    else:  # no window: the range of the frame's (finite) values
        lowest, highest = np.inf, -np.inf
        whole = values(strips[0]) if len(strips) == 1 else None
        for rows in strips:
            part = whole if whole is not None else values(rows)
            finite = part[np.isfinite(part)]
            if finite.size:
                lowest = min(lowest, float(finite.min()))
                highest = max(highest, float(finite.max()))
        if not np.isfinite(lowest):
            lowest = highest = 0.0
        span = (highest - lowest) or 1.0

        def scale(rows: slice) -> np.ndarray:
            part = whole if whole is not None else values(rows)
            return (part - lowest) * (255.0 / span)

    out = np.empty(frame.shape[:2], dtype=np.uint8)
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    for rows in strips:
        scaled = scale(rows)
        if invert:
            scaled = 255.0 - scaled
        out[rows] = np.nan_to_num(scaled.clip(0, 255), nan=255.0 if invert else 0.0)
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
        # a compressed frame claiming more pixels than the header is refused before decoding
        check_stream_codestreams(self.stream, self.header, index)
        with decoding(self.header):  # a decode slot is held until the frame is 8-bit
            try:
                array = read_frame(self.stream, self.header, index)
            except MemoryError as exc:
                raise ImageTooLarge("the image does not fit in memory now") from exc
            except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
                raise NotAcceptable(
                    "the image cannot be decoded for rendering (no codec for its transfer "
                    "syntax, or damaged pixel data)"
                ) from exc
            image = Image.fromarray(_to_8bit(self.header, array, options.window, index))
            del array
        return _shaped(image, options)

    def stored_jpeg(self, index: int, options: RenderOptions) -> bytes | None:
        """The frame's stored baseline JPEG bitstream when it can be sent as the rendering
        asked for (JPEG, no window, no viewport, no quality of its own, 8-bit YBR colour
        that browsers decode as DICOM means it), else None."""
        self.check(index)
        header = self.header
        syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
        if (options.media_type != "image/jpeg" or options.window or options.viewport
                or options.region or options.quality is not None or syntax != JPEGBaseline8Bit
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
        if frame[:3] != b"\xff\xd8\xff":
            return None
        check_codestream(header, frame)  # no larger picture than the header says goes out
        return frame

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
    image.save(out, format=fmt,
               **({"quality": options.quality or DEFAULT_QUALITY} if fmt == "JPEG" else {}))
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
        check_pixel_budget(ds)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        data = video_bitstream(ds.PixelData)
        form = None if data[4:8] == b"ftyp" else (
            "hevc" if syntax.startswith(("1.2.840.10008.1.2.4.107",
                                         "1.2.840.10008.1.2.4.108")) else
            "mpegvideo" if syntax.startswith(("1.2.840.10008.1.2.4.100",
                                              "1.2.840.10008.1.2.4.101")) else "h264")
        with av.open(io.BytesIO(data), format=form) as container:
            video = container.streams.video[0]
            _check_picture_size(int(video.width or 0), int(video.height or 0))
            for picture in container.decode(video=0):  # type: ignore[union-attr]
                image = picture.to_image()
                break
            else:
                raise NotAcceptable("the video holds no picture to show")
        return _encode(_shaped(image, options), options)

    return _rendering(work)


def _check_picture_size(width: int, height: int) -> None:
    """Refuse (:class:`ImageTooLarge`) a video picture whose size, as its stream declares it,
    is over the budget of one decoded frame (RGB), before it is decoded."""
    size = width * height * 3
    if size > current_limits().max_frame_bytes:
        raise ImageTooLarge(f"the video's pictures ({width} × {height} pixels) are over the "
                            "budget of one decoded frame")


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
        images: list[Image.Image] = []
        held, limit = 0, current_limits().max_frame_bytes
        for i in range(frames.count):
            image = frames.image(i, options)
            held += image.width * image.height * len(image.getbands())
            if held > limit:  # every picture is held until the GIF is written
                raise ImageTooLarge(
                    f"the animation would hold more than {limit >> 20} MiB of pictures; ask "
                    "for a smaller viewport, or for the frames one at a time")
            images.append(image)
        out = io.BytesIO()
        images[0].save(out, format="GIF", save_all=len(images) > 1, append_images=images[1:],
                       duration=frames.frame_duration_ms(), loop=0)
        return out.getvalue()

    return _rendering(work)
