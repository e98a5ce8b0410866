"""Changing an instance's transfer syntax when a receiver cannot take it as stored.

Conversion decodes the data set and encodes it again: compressed pixel data is decompressed
with pydicom's codec plugins (and compressed again for a lossless target), and big-endian
values are swapped to little endian (or back), so that any stored syntax can reach any
receiver that takes an uncompressed one.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from typing import BinaryIO

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


def is_video(transfer_syntax: str) -> bool:
    """True for MPEG-2/MPEG-4/HEVC transfer syntaxes (frames are not separable)."""
    return COMPRESSED_MEDIA_TYPES.get(transfer_syntax, "").startswith("video/")


def is_known_syntax(transfer_syntax: str) -> bool:
    """True for a transfer syntax UID of the standard (pydicom's registry)."""
    return UID(transfer_syntax).is_transfer_syntax


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
            ds.decompress()  # to Explicit VR Little Endian, colour as RGB
        if swap:
            _swap_byte_order(ds)
        if target_uid.is_compressed and "PixelData" in ds:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(target_uid)
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
