"""Changing an instance's transfer syntax when a client cannot take it as stored."""

from __future__ import annotations

import io
from contextlib import nullcontext
from typing import BinaryIO

from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imageshare.archive.pixel_budget import decoding
from imageshare.domain.errors import ImageShareError, NotAcceptable

UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}

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
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}


def is_video(transfer_syntax: str) -> bool:
    """True for MPEG-2/MPEG-4/HEVC transfer syntaxes (frames are not separable)."""
    return COMPRESSED_MEDIA_TYPES.get(transfer_syntax, "").startswith("video/")


def transcode(stream: BinaryIO, target: str) -> bytes:
    """The Part 10 bytes of the instance in ``stream`` re-encoded as ``target``.

    Raises :class:`NotAcceptable` when no codec can decode the source or encode the target.
    """
    target_uid = UID(target)
    ds = dcmread(stream)
    source = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        if source != target_uid:
            # Every frame is decoded at once here: the whole instance must fit the budget.
            pixels = source.is_compressed or target_uid.is_compressed
            with decoding(ds) if pixels else nullcontext():
                if source.is_compressed:
                    ds.decompress()
                if target_uid.is_compressed:
                    ds.compress(target_uid)
                else:
                    ds.file_meta.TransferSyntaxUID = target_uid
    except ImageShareError as exc:  # over the pixel budget, or busy: the caller decides
        raise NotAcceptable(
            f"the instance cannot be converted from {source} to {target_uid}: {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - codec plugins raise many kinds
        raise NotAcceptable(
            f"the instance cannot be converted from {source} to {target_uid}"
        ) from exc
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
