"""Changing an instance's transfer syntax when a receiver cannot take it as stored.

Conversion decodes the data set and encodes it again: compressed pixel data is decompressed
with pydicom's codec plugins (and compressed again for a lossless target), and big-endian
values are swapped to little endian (or back), so that any stored syntax can reach any
receiver that takes an uncompressed one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import nullcontext
from fractions import Fraction
from typing import Any, BinaryIO, cast

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from imageshare.archive.pixel_budget import decoding
from imageshare.domain.errors import ImageShareError, NotAcceptable

UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
# Syntaxes ImageShare can convert any decodable instance to, in order of preference.
CONVERSION_TARGETS: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless,
)
_SWAP_UNITS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

COMPRESSED_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.100.1": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.101.1": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.102.1": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.103.1": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.104.1": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.105.1": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.106.1": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}


# Compressed transfer syntaxes whose pixels were changed by compression (lossy): what such
# an instance holds is only the compressed data, so that PS3.18 8.7.3.3 sends its bulk data
# as stored where the default is otherwise uncompressed.
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
})


def is_lossy(transfer_syntax: str) -> bool:
    """True for lossy image compression and for video (MPEG-2/MPEG-4/HEVC)."""
    return transfer_syntax in LOSSY_SYNTAXES or is_video(transfer_syntax)


def is_video(transfer_syntax: str) -> bool:
    """True for MPEG-2/MPEG-4/HEVC transfer syntaxes (frames are not separable)."""
    return COMPRESSED_MEDIA_TYPES.get(transfer_syntax, "").startswith("video/")


def is_known_syntax(transfer_syntax: str) -> bool:
    """True for a transfer syntax UID of the standard (pydicom's registry)."""
    return UID(transfer_syntax).is_transfer_syntax


_PLAYABLE = {"video/mp4": "h264", "video/H265": "hevc"}  # elementary stream formats (PyAV)


def playable_video(stream: BinaryIO, transfer_syntax: str) -> bytes:
    """A stored video instance as an MP4 file a browser plays (the rendered video of PS3.18):
    its bitstream as it is when it is an MP4 file already, else its H.264 or HEVC stream put
    into an MP4 container (not re-encoded). NotAcceptable for MPEG-2, which browsers do not
    play."""
    kind = COMPRESSED_MEDIA_TYPES.get(transfer_syntax, "")
    if kind not in _PLAYABLE:
        raise NotAcceptable("this video (MPEG-2) cannot be played in a browser; retrieve "
                            "the instance")
    ds = dcmread(stream)
    data = video_bitstream(ds.PixelData)
    if data[4:8] == b"ftyp":
        # without the pad byte of an odd-length file
        return data[:_boxes_end(lambda at: data[at:at + 16], len(data))]
    import av

    out = io.BytesIO()
    try:
        with cast(Any, av.open(io.BytesIO(data), format=_PLAYABLE[kind])) as source, av.open(
                out, "w", format="mp4",
                options={"movflags": "frag_keyframe+empty_moov"}) as target:
            video = source.streams.video[0]
            copy = target.add_stream_from_template(video)
            rate = Fraction(video.guessed_rate or video.average_rate or 25)
            copy.time_base = 1 / rate
            number = 0
            for packet in source.demux(video):
                if not packet.size:
                    continue  # the end of the stream
                # A bare stream has no timestamps: one frame per packet at the stream's rate,
                # in the order stored (right for streams without B-frames).
                packet.stream, packet.time_base = copy, copy.time_base
                packet.pts = packet.dts = number
                number += 1
                target.mux(packet)
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise ImageShareError("the video in this instance cannot be read") from exc
    return out.getvalue()


def video_bitstream(pixel_data: bytes) -> bytes:
    """The bitstream of a video instance's encapsulated Pixel Data: its fragments joined,
    without the Basic Offset Table (which PS3.5 A.4 leaves empty for video, but which writers
    such as pydicom's ``encapsulate`` fill)."""
    from pydicom.encaps import generate_fragments

    item = b"\xfe\xff\x00\xe0"
    if len(pixel_data) >= 8 and pixel_data[:4] == item:
        pixel_data = pixel_data[8 + int.from_bytes(pixel_data[4:8], "little"):]
    return b"".join(generate_fragments(pixel_data))


def mp4_span(stream: BinaryIO) -> tuple[int, int] | None:
    """Where, in a stored video instance read from ``stream`` (seekable), its MP4 file lies:
    (offset, length), when the pixel data is one fragment holding an MP4 file (as uploads
    and many devices store it); else None. Only the headers are read."""
    stream.seek(0)
    dcmread(stream, stop_before_pixels=True)
    head = stream.read(12)  # (7FE0,0010) OB, two reserved bytes, undefined length
    if len(head) != 12 or head[:6] != b"\xe0\x7f\x10\x00OB" or head[8:] != b"\xff" * 4:
        return None
    item = stream.read(8)  # the Basic Offset Table item
    if len(item) != 8 or item[:4] != b"\xfe\xff\x00\xe0":
        return None
    stream.seek(int.from_bytes(item[4:], "little"), 1)
    item = stream.read(8)  # the one fragment
    if len(item) != 8 or item[:4] != b"\xfe\xff\x00\xe0":
        return None
    start, length = stream.tell(), int.from_bytes(item[4:], "little")
    if stream.read(8)[4:8] != b"ftyp":
        return None
    stream.seek(start + length)
    if stream.read(4) != b"\xfe\xff\xdd\xe0":  # more than one fragment: not one file
        return None

    def box_at(position: int) -> bytes:
        stream.seek(start + position)
        return stream.read(16)

    return start, _boxes_end(box_at, length)  # without the fragment's pad byte


def _boxes_end(box_at: Callable[[int], bytes], length: int) -> int:
    """Where an MP4 file's last top-level box ends, within ``length`` bytes whose box
    headers ``box_at(position)`` gives (up to 16 bytes from there)."""
    position = 0
    while position + 8 <= length:
        box = box_at(position)
        size = int.from_bytes(box[:4], "big")
        if size == 1 and len(box) >= 16:
            size = int.from_bytes(box[8:16], "big")
        elif size == 0:  # the last box runs to the end
            return length
        if size < 8:
            break
        position += size
    return min(position, length) or length


def can_decode(transfer_syntax: str) -> bool:
    """True when the pixel data of this syntax can be decoded here (codec plugins)."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return uid.is_transfer_syntax
    if is_video(uid):
        return False
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def can_encode(transfer_syntax: str) -> bool:
    """True when a decoded data set can be written in this syntax here."""
    if transfer_syntax not in CONVERSION_TARGETS:
        return False
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(uid).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def can_produce(source: str, target: str) -> bool:
    """Can an instance stored as ``source`` be sent as ``target``? (Checked before anything
    is sent; a conversion that still fails sends the instance as stored.)"""
    if source == target:
        return True
    if not is_known_syntax(target) or not is_known_syntax(source):
        return False
    if UID(source).is_compressed and not can_decode(source):
        return False
    return can_encode(target)


# WADO-RS frames of an uncompressed instance asked for in a compressed media type: the
# lossless transfer syntax each media type means without a transfer-syntax parameter (its
# default, PS3.18 Table 8.7.3-5), for those ImageShare encodes. image/jpeg means JPEG
# Lossless (1.2.840.10008.1.2.4.70), which no codec here writes.
FRAME_ENCODINGS: dict[str, str] = {
    "image/jls": JPEGLSLossless, "image/jp2": JPEG2000Lossless, "image/dicom-rle": RLELossless,
}
_NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


# Lossy JPEG baseline, made only when a client names it (image/jpeg with
# transfer-syntax=1.2.840.10008.1.2.4.50), from 8-bit unsigned greyscale or RGB pixels.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_BASELINE_QUALITY = 90


def fits_jpeg_baseline(header: Dataset) -> bool:
    """Can the pixels ``header`` describes be written as JPEG baseline: 8 bits unsigned,
    greyscale or RGB (for frames decoded here, :func:`encoding_header`'s description)?"""
    photometric = str(header.get("PhotometricInterpretation", ""))
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    return (int(header.get("BitsAllocated", 0) or 0) == 8
            and int(header.get("PixelRepresentation", 0) or 0) == 0
            and ((samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"))
                 or (samples == 3 and photometric == "RGB")))


def can_encode_frames(source: str, target: str, header: Dataset | None = None) -> bool:
    """Can frames stored as ``source`` be sent compressed as ``target``: one of
    :data:`FRAME_ENCODINGS`' lossless syntaxes when its codec is installed, or JPEG baseline
    (lossy, only for pixels ``header`` says fit it)? Frames stored uncompressed little
    endian are compressed; frames stored compressed in another syntax are decoded here
    first (lossless targets add no loss to a lossy source)."""
    if source == target:
        return False
    if target == JPEG_BASELINE:
        if header is None or not fits_jpeg_baseline(header):
            return False
    elif target not in FRAME_ENCODINGS.values() or not can_encode(target):
        return False
    return source in _NATIVE_LITTLE_ENDIAN or (UID(source).is_compressed and not is_video(source)
                                               and can_decode(source))


def _jpeg_baseline(header: Dataset, frame: bytes) -> bytes:
    """One 8-bit frame (greyscale, or RGB colour-by-pixel or colour-by-plane as
    ``header``'s Planar Configuration says) as a JPEG baseline bitstream (Pillow's codec,
    quality :data:`JPEG_BASELINE_QUALITY`, chroma 4:2:2 as YBR_FULL_422)."""
    from PIL import Image

    rows, columns = int(header.Rows), int(header.Columns)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    array = np.frombuffer(frame, dtype=np.uint8)[:rows * columns * samples]
    if samples == 3 and int(header.get("PlanarConfiguration", 0) or 0) == 1:
        pixels = array.reshape((3, rows, columns)).transpose(1, 2, 0)  # RRR..GGG..BBB..
    elif samples == 3:
        pixels = array.reshape((rows, columns, 3))
    else:
        pixels = array.reshape((rows, columns))
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB" if samples == 3 else "L")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_BASELINE_QUALITY, subsampling=1)
    return out.getvalue()


def encoding_header(header: Dataset) -> Dataset:
    """The pixel description that frames decoded from ``header``'s compressed pixel data
    have when they are compressed again: colour decoded from YBR_FULL_422, YBR_ICT or
    YBR_RCT is RGB (the codecs undo their colour transforms), the rest as stored."""
    out = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                    "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration"):
        if keyword in header:
            setattr(out, keyword, header.get(keyword))
    if str(header.get("PhotometricInterpretation", "")) in ("YBR_FULL_422", "YBR_ICT",
                                                            "YBR_RCT"):
        out.PhotometricInterpretation = "RGB"
    out.PlanarConfiguration = 0  # decoded frames are colour-by-pixel
    return out


def encode_frame(header: Dataset, frame: bytes, target: str) -> bytes:
    """One uncompressed little-endian frame of the instance whose header (pixel description
    included) is ``header``, compressed as ``target``: losslessly (the pixels decode to the
    same values in the same colour space, no colour transform), or as JPEG baseline (lossy,
    8-bit pixels only). NotAcceptable when the codec refuses them."""
    from pydicom.pixels import get_encoder

    if target == JPEG_BASELINE:
        if not fits_jpeg_baseline(header):
            raise NotAcceptable("JPEG baseline holds 8-bit pixels only; ask for "
                                "application/octet-stream or a lossless syntax")
        with decoding(header):
            return _jpeg_baseline(header, frame)
    try:
        description: dict[str, Any] = {
            "rows": int(header.Rows), "columns": int(header.Columns),
            "samples_per_pixel": int(header.get("SamplesPerPixel", 1) or 1),
            "bits_allocated": int(header.BitsAllocated),
            "bits_stored": int(header.get("BitsStored") or header.BitsAllocated),
            "pixel_representation": int(header.get("PixelRepresentation", 0) or 0),
            "photometric_interpretation": str(header.PhotometricInterpretation),
            "planar_configuration": int(header.get("PlanarConfiguration", 0) or 0),
            "number_of_frames": 1,
        }
        with decoding(header):  # a slot of the pixel budget while the codec works
            return bytes(get_encoder(UID(target)).encode(frame, use_mct=False, **description))
    except ImageShareError:
        raise
    except Exception as exc:  # noqa: BLE001 - codec plugins raise many kinds
        raise NotAcceptable(f"the frames cannot be compressed as {target}; ask for "
                            "application/octet-stream or with transfer-syntax=*") from exc


def little_endian_value(vr: str, value: bytes, transfer_syntax: str) -> bytes:
    """A binary value (OW, OF, OL, OD, OV) of a data set stored as ``transfer_syntax`` in
    little-endian byte order."""
    unit = _SWAP_UNITS.get(vr)
    if transfer_syntax != ExplicitVRBigEndian or unit is None or len(value) % unit:
        return value
    return _swapped(value, unit)


def _swapped(value: bytes, unit: int) -> bytes:
    return np.frombuffer(value, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


def _swap_byte_order(ds: Dataset) -> None:
    """Swap every binary value of ``ds`` (nested items included) between big and little
    endian: pixel data by its Bits Allocated (as pydicom decodes it), others by their VR."""
    for element in ds:
        value = element.value
        if element.VR == "SQ":
            for item in value or []:
                _swap_byte_order(item)
            continue
        if not isinstance(value, bytes | bytearray) or not value:
            continue
        if element.tag == 0x7FE00010:
            bits = int(ds.get("BitsAllocated", 8) or 8)
            unit = bits // 8 if bits in (16, 32, 64) else (2 if element.VR == "OW" else 1)
        else:
            unit = _SWAP_UNITS.get(element.VR, 1)
        if unit > 1:
            if len(value) % unit:
                raise ValueError(f"{element.tag} has a length that is not a multiple of {unit}")
            element.value = _swapped(bytes(value), unit)


# The Lossy Image Compression Method term of each lossy image syntax (PS3.3 C.7.6.1.1.5.1).
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1", "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


def _mark_lossy(ds: Dataset, source: str) -> None:
    """Say in ``ds`` that its pixels went through lossy compression (``source``): Lossy Image
    Compression "01" and the method, which stay once set (PS3.3 C.7.6.1.1.5), so that an
    instance decoded from lossy JPEG and sent in a lossless or uncompressed syntax is not
    taken for an original."""
    method = _LOSSY_METHODS.get(source)
    if method is None:
        return
    ds.LossyImageCompression = "01"
    if not ds.get("LossyImageCompressionMethod"):  # a method already named stays
        ds.LossyImageCompressionMethod = method


def convert_dataset(ds: Dataset, target: str) -> Dataset:
    """``ds`` (read from a Part 10 file) converted in place to ``target``: decoded,
    byte-swapped and encoded as needed. Raises on any failure (the caller decides)."""
    target_uid = UID(target)
    source = UID(str(ds.file_meta.TransferSyntaxUID))
    if source == target_uid:
        return ds
    if is_video(source) or is_video(target_uid):
        raise ValueError("video is not converted")
    swap = (source == ExplicitVRBigEndian) != (target_uid == ExplicitVRBigEndian)
    pixels = "PixelData" in ds and (source.is_compressed or target_uid.is_compressed or swap)
    # Every frame is decoded at once here: the whole instance must fit the pixel budget.
    with decoding(ds) if pixels else nullcontext():
        if source.is_compressed:
            # to Explicit VR Little Endian, colour as RGB; the instance keeps its identity
            ds.decompress(generate_instance_uid=False)
            _mark_lossy(ds, str(source))
        if swap:
            _swap_byte_order(ds)
        if target_uid.is_compressed and "PixelData" in ds:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(target_uid, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = target_uid
    return ds


def transcode(stream: BinaryIO, target: str) -> bytes:
    """The Part 10 bytes of the instance in ``stream`` re-encoded as ``target``.

    Raises :class:`NotAcceptable` when no codec can decode the source or encode the target,
    or the data set cannot be written in the target syntax.
    """
    if not is_known_syntax(target):
        raise NotAcceptable(f"{target} is not a transfer syntax ImageShare knows")
    try:
        ds = dcmread(stream)
        source = str(ds.file_meta.TransferSyntaxUID)
        convert_dataset(ds, target)
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
    except NotAcceptable:
        raise
    except ImageShareError as exc:  # over the pixel budget, or busy: the caller decides
        raise NotAcceptable(f"the instance cannot be converted to {target}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - codec plugins and writers raise many kinds
        raise NotAcceptable(
            f"the instance cannot be converted to {target}"
            + (f" from {source}" if "source" in locals() else "")
        ) from exc
    return out.getvalue()
