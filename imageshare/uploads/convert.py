"""What an uploaded file is (by its content, never its name), and non-DICOM files made DICOM.

Photos (JPEG, PNG, HEIC) become VL Photographic Image instances (JPEG baseline, the photo
turned upright by its EXIF orientation; EXIF itself, with any GPS position, is not kept),
videos (MP4/MOV with H.264 or HEVC) Video Photographic Image instances whose pixel data is the
file itself under the matching MPEG-4 transfer syntax (not re-encoded), and PDF documents
Encapsulated PDF instances. Each carries the patient's identity as the hospital knows it (the
invitation's), the upload time and who uploaded it (Contributing Equipment). The big values
(video, PDF) are copied from the file into the DICOM file in chunks, never whole in memory.

A photo may grow when it is converted (a PNG kept exactly takes about as many bytes as its
pixels, whatever the PNG took): up to :data:`FREE_GROWTH` times its file is free, and what it
grows beyond that is taken from the upload's allowance (:class:`ByteAllowance`, the one that
zip files expand into); a photo the allowance cannot take is refused, before it is encoded
when its pixels alone tell.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import Dataset, FileMetaDataset, Sequence
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_encoder
from pydicom.uid import UID, JPEGBaseline8Bit, RLELossless, generate_uid

from imageshare import __version__
from imageshare.archive.attachments import MANUFACTURER, MAX_PIXELS
from imageshare.archive.corrections import PatientDetails, apply_details
from imageshare.archive.studies import ENCAPSULATED_PDF
from imageshare.domain.errors import ImageShareError

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
AVC_HP41 = "1.2.840.10008.1.2.4.102"
AVC_HP42 = "1.2.840.10008.1.2.4.104"
HEVC_MAIN = "1.2.840.10008.1.2.4.107"
HEVC_MAIN10 = "1.2.840.10008.1.2.4.108"
_CHUNK = 1 << 20
FREE_GROWTH = 8  # times a photo's file: what its conversion may take without counting
_RLE_BEST = 64  # RLE takes at least 2 bytes per 128 bytes of pixels
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff(head: bytes) -> str:
    """The kind of file from its first bytes: dicom, zip, jpeg, png, heic, video, pdf or
    unknown."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "heic" if head[8:12] in _HEIF_BRANDS else "video"
    return "unknown"


def heic_supported() -> bool:
    """True when HEIC photos can be read here (pillow-heif installed)."""
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Placement:
    """Where a converted file goes: its study, series and number, and the upload's facts."""

    study_uid: str
    series_uid: str
    series_number: int
    instance_number: int
    uploaded_at: datetime
    uploader: str
    reference: str
    description: str
    body_part: str = ""
    sop_uid: str = ""  # given when a re-run must make the same instance again


# Body parts an invitation may name (DICOM Body Part Examined) and their SNOMED CT codes; any
# other (or none) is recorded as the entire body, as the region is not known.
_REGIONS = {
    "HEAD": ("69536005", "Head"), "FACE": ("89545001", "Face"), "NECK": ("45048000", "Neck"),
    "CHEST": ("51185008", "Chest"), "ABDOMEN": ("113345001", "Abdomen"),
    "PELVIS": ("12921003", "Pelvis"), "ARM": ("40983000", "Upper limb"),
    "HAND": ("85562004", "Hand"), "LEG": ("61685007", "Lower limb"),
    "KNEE": ("72696002", "Knee"), "FOOT": ("56459004", "Foot"), "SKIN": ("39937001", "Skin"),
}


def _region(body_part: str) -> Sequence:
    code, meaning = _REGIONS.get(body_part.upper(), ("38266002", "Entire body"))
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
    return Sequence([item])


def _base(details: PatientDetails, where: Placement, sop_class: str, modality: str,
          series_description: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = where.sop_uid or generate_uid()
    stamp_date = where.uploaded_at.strftime("%Y%m%d")
    stamp_time = where.uploaded_at.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = stamp_date, stamp_time
    apply_details(ds, details)
    ds.StudyInstanceUID = where.study_uid
    ds.StudyDate, ds.StudyTime = stamp_date, stamp_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = ("Uploaded: " + where.reference if where.reference
                           else "Uploaded images")[:64]
    ds.Modality = modality
    ds.SeriesInstanceUID = where.series_uid
    ds.SeriesNumber = where.series_number
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = stamp_date, stamp_time
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = where.instance_number
    ds.ContentDate, ds.ContentTime = stamp_date, stamp_time
    contributor = Dataset()
    contributor.Manufacturer = MANUFACTURER
    contributor.SoftwareVersions = __version__
    contributor.ContributionDateTime = where.uploaded_at.strftime("%Y%m%d%H%M%S")
    contributor.ContributionDescription = (f"Uploaded by {where.uploader}; "
                                           f"{where.description}")[:1024]
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "109103", "DCM"
    purpose.CodeMeaning = "Modifying Equipment"
    contributor.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.ContributingEquipmentSequence = Sequence([contributor])
    return ds


def _save(ds: Dataset, transfer_syntax: str, out: BinaryIO) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)


def _colour_image(details: PatientDetails, where: Placement, sop_class: str, series: str,
                  image_type: list[str], photometric: str, rows: int, columns: int) -> Dataset:
    """The attributes a VL photographic or video image shares: identity and placement,
    acquisition context, anatomic region, and an 8-bit colour Image Pixel module."""
    ds = _base(details, where, sop_class, "XC", series)
    ds.ImageType = image_type
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionDateTime = where.uploaded_at.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = Sequence()
    ds.AnatomicRegionSequence = _region(where.body_part)
    if where.body_part.upper() in _REGIONS:
        ds.BodyPartExamined = where.body_part.upper()
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    return ds


_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


class ByteAllowance(Protocol):
    """Bytes an upload may still grow by (the walk's allowance, e.g.
    :class:`imageshare.archive.importing.DicomInputs`)."""

    def bytes_left(self) -> int | None:
        """Bytes left (None: no limit)."""
        ...

    def claim_bytes(self, count: int) -> bool:
        """Take ``count`` bytes; False, taking nothing, when they are not left."""
        ...


def _grown_too_far(made: int, sent: int) -> ImageShareError:
    return ImageShareError(
        f"the picture would take {-(-made // (1 << 20))} MB once converted for the hospital, "
        f"far more than the file sent ({-(-sent // 1024)} kB), and more than is left of this "
        "upload's limit; send it as a JPEG photo or as a smaller picture")


def photo(source: Path, details: PatientDetails, where: Placement, out: BinaryIO,
          allowance: ByteAllowance | None = None) -> None:
    """Write ``source`` (JPEG, PNG or HEIC) as a VL Photographic Image to ``out``: a PNG
    (a screenshot, a scan) losslessly, a photo as JPEG. Pixel data of more than
    :data:`FREE_GROWTH` times ``source``'s size takes the rest from ``allowance`` (None: no
    limit), else the photo is refused (ImageShareError, saying so)."""
    sent = os.path.getsize(source)
    free = FREE_GROWTH * sent
    left = allowance.bytes_left() if allowance is not None else None

    def take(made: int) -> None:
        """Pixel data of ``made`` bytes: its growth beyond what is free, from ``allowance``."""
        if made > free and allowance is not None and not allowance.claim_bytes(made - free):
            raise _grown_too_far(made, sent)

    heic_supported()
    try:
        with Image.open(source) as img:
            if img.format not in ("JPEG", "PNG", "HEIF", "MPO"):
                raise ImageShareError("not a photo the hospital can take (JPEG, PNG or HEIC)")
            if img.width * img.height > MAX_PIXELS:
                raise ImageShareError("the photo has too many pixels (at most 60 million)")
            # 8-bit PNGs (screenshots, scans) are kept exactly; a 16-bit one is scaled to
            # 8 bits, which loses detail, so it is stored (and marked) as lossy JPEG
            lossless = img.format == "PNG" and img.mode in _EIGHT_BIT_MODES
            upright = ImageOps.exif_transpose(img)
            if upright.mode not in _EIGHT_BIT_MODES:
                values = np.asarray(upright, dtype=np.float64)
                top = float(values.max()) or 1.0
                upright = Image.fromarray(np.clip(values * 255.0 / top, 0, 255).astype(
                    np.uint8))
            rgb = upright.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageShareError("the photo cannot be read (damaged or not a photo)") from exc
    if lossless:  # a screenshot or scan: its text and lines stay exact (RLE Lossless)
        least = rgb.width * rgb.height * 3 // _RLE_BEST
        if left is not None and least > free + left:  # too large however well it encodes
            raise _grown_too_far(least, sent)
        encoded_rle = get_encoder(RLELossless).encode(
            np.asarray(rgb), encoding_plugin="pylibjpeg", rows=rgb.height,
            columns=rgb.width, samples_per_pixel=3, bits_allocated=8, bits_stored=8,
            photometric_interpretation="RGB", pixel_representation=0, number_of_frames=1,
            planar_configuration=0)
        take(len(encoded_rle))
        ds = _colour_image(details, where, VL_PHOTOGRAPHIC, "Photos", ["DERIVED", "PRIMARY"],
                           "RGB", rgb.height, rgb.width)
        ds.LossyImageCompression = "00"
        ds.PixelData = encapsulate([encoded_rle])
        ds["PixelData"].VR = "OB"
        _save(ds, RLELossless, out)
        return
    encoded = io.BytesIO()
    rgb.save(encoded, format="JPEG", quality=92, subsampling=1)  # 4:2:2, as YBR_FULL_422
    jpeg = encoded.getvalue()
    take(len(jpeg))
    ds = _colour_image(details, where, VL_PHOTOGRAPHIC, "Photos", ["DERIVED", "PRIMARY"],
                       "YBR_FULL_422", rgb.height, rgb.width)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{(rgb.width * rgb.height * 3) / len(jpeg):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    _save(ds, JPEGBaseline8Bit, out)


@dataclass(frozen=True)
class VideoFacts:
    """What PyAV reads of a video: codec, profile, size, frames and rate."""

    codec: str
    profile: str
    width: int
    height: int
    frames: int
    frame_time_ms: float
    bit_depth: int


def probe_video(source: Path) -> VideoFacts:
    """The facts of the first video stream of ``source``; ImageShareError when unreadable."""
    import av

    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise ImageShareError("the file has no video in it")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = float(stream.average_rate or stream.guessed_rate or 30)
            frames = stream.frames or int(float(stream.duration * stream.time_base) * rate
                                          if stream.duration and stream.time_base else 0)
            pix = str(ctx.format.name if ctx.format else "")
            return VideoFacts(str(ctx.name), str(ctx.profile or ""), int(ctx.width),
                              int(ctx.height), max(int(frames), 1), 1000.0 / rate,
                              10 if "10" in pix else 8)
    except av.error.FFmpegError as exc:
        raise ImageShareError("the video cannot be read (damaged or not a video)") from exc


def video_syntax(facts: VideoFacts) -> str:
    """The MPEG-4 transfer syntax that holds this stream as it is; ImageShareError, saying
    why, when none does."""
    area = facts.width * facts.height
    fps = 1000.0 / facts.frame_time_ms if facts.frame_time_ms else 0
    if facts.codec == "h264":
        if "4:4:4" in facts.profile or "10" in facts.profile or "4:2:2" in facts.profile:
            raise ImageShareError(f"the video is H.264 {facts.profile}, which DICOM cannot "
                                  "hold as it is; record it in the phone's usual format")
        if area > 1920 * 1088:
            raise ImageShareError(
                f"the video is H.264 at {facts.width}x{facts.height}, larger than DICOM's "
                "H.264 formats allow (1920x1080); record at 1080p (HD) or use HEVC")
        return AVC_HP41 if fps <= 30.5 else AVC_HP42
    if facts.codec == "hevc":
        if area > 4096 * 2176:
            raise ImageShareError("the video is larger than DICOM's HEVC format allows (4K)")
        return HEVC_MAIN10 if facts.bit_depth > 8 else HEVC_MAIN
    raise ImageShareError(f"the video is not H.264 (MPEG-4 AVC) or HEVC but {facts.codec}; "
                          "DICOM holds only those as they are: send it as MP4 with H.264")


def _element_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", length)


def _copy(source: BinaryIO, out: BinaryIO, length: int) -> None:
    left = length
    while left:
        chunk = source.read(min(_CHUNK, left))
        if not chunk:
            raise ImageShareError("the file changed while it was converted")
        out.write(chunk)
        left -= len(chunk)


def _write_around(ds: Dataset, tag: int, out: BinaryIO, bulk: Callable[[BinaryIO], None],
                  transfer_syntax: str) -> None:
    """``ds`` in Explicit VR Little Endian with the element ``tag`` written by ``bulk``."""
    before = Dataset()
    after = Dataset()
    for element in ds:
        (before if element.tag < tag else after).add(element)
    before.file_meta = FileMetaDataset()
    before.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    before.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    before.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    bulk(out)
    if len(after):
        from pydicom.filebase import DicomFileLike

        fp = DicomFileLike(out)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, after)


def copy_streams(src: Any, dst: Any) -> None:
    """Copy the video and sound streams of the open PyAV container ``src`` into ``dst``
    packet by packet (not re-encoded), without the streams' metadata."""
    kept = [s for s in src.streams if s.type in ("video", "audio")]
    copies = {s.index: dst.add_stream_from_template(s) for s in kept}
    for copy in copies.values():
        copy.metadata.clear()
    for packet in src.demux(kept):
        if packet.dts is None:
            continue  # the demuxer's end-of-stream marker
        packet.stream = copies[packet.stream.index]
        dst.mux(packet)


def without_metadata(source: Path, target: Path) -> None:
    """``source``'s video and sound streams, as they are (not re-encoded), in a new MP4 file
    at ``target`` without the container's metadata: a phone's video carries where it was
    filmed (GPS), the device and the owner's details there."""
    import av

    try:
        with cast(Any, av.open(str(source))) as src, av.open(
                str(target), "w", format="mp4") as dst:
            copy_streams(src, dst)
    except av.error.FFmpegError as exc:
        raise ImageShareError("the video cannot be read (damaged or not a video)") from exc


def video(source: Path, details: PatientDetails, where: Placement, out: BinaryIO) -> str:
    """Write ``source`` (MP4/MOV) as a Video Photographic Image to ``out``: its streams as they
    are, in an MP4 file without the phone's metadata (GPS), in one fragment of the pixel
    data; returns the transfer syntax."""
    facts = probe_video(source)
    syntax = video_syntax(facts)
    clean = source.with_name(source.name + ".clean.mp4")
    try:
        without_metadata(source, clean)
        _video_instance(clean, facts, syntax, details, where, out)
    finally:
        clean.unlink(missing_ok=True)
    return syntax


def _video_instance(source: Path, facts: VideoFacts, syntax: str, details: PatientDetails,
                    where: Placement, out: BinaryIO) -> None:
    size = os.path.getsize(source)
    if size >= 0xFFFFFFF0:
        raise ImageShareError("the video is larger than 4 GB, which DICOM cannot hold")
    ds = _colour_image(details, where, VIDEO_PHOTOGRAPHIC, "Videos", ["ORIGINAL", "PRIMARY"],
                       "YBR_PARTIAL_420", facts.height, facts.width)
    ds.NumberOfFrames = facts.frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = f"{facts.frame_time_ms:.4f}"[:16]
    ds.CineRate = max(1, round(1000.0 / facts.frame_time_ms))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = ("ISO_14496_10" if facts.codec == "h264"
                                      else "ISO_23008_2")

    def pixel_data(fh: BinaryIO) -> None:
        padded = size + (size & 1)
        fh.write(_element_header(0x7FE0, 0x0010, b"OB", 0xFFFFFFFF))
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, padded))
        with open(source, "rb") as src:
            _copy(src, fh, size)
        if size & 1:
            fh.write(b"\0")
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))

    _write_around(ds, 0x7FE00010, out, pixel_data, syntax)


ACTIVE_PDF = "the PDF holds "  # how a warning about a PDF's active content begins
_PDF_CHECKED_BYTES = 64 << 20  # larger PDFs are not parsed (memory); the warning says so
_RUNNING_ACTIONS = {"/JavaScript": "JavaScript", "/Launch": "an action that starts a program",
                    "/SubmitForm": "a form that sends data elsewhere",
                    "/ImportData": "an action that imports data", "/URI": ""}


def pdf_warning(source: Path) -> str:
    """What a reviewer should know before a PDF enters the record: "" for a plain document,
    else a sentence beginning with :data:`ACTIVE_PDF` naming what runs or hides in it when
    it is opened (JavaScript, actions that start programs or send data, embedded files,
    XFA forms), which other systems' viewers may run. ImageShareError when it is not a PDF
    that can be read (damaged, or locked with a password)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if os.path.getsize(source) > _PDF_CHECKED_BYTES:
        return (ACTIVE_PDF + f"more than {_PDF_CHECKED_BYTES >> 20} MB and was not checked "
                "for scripts; open it with care")
    found: list[str] = []
    try:
        reader = PdfReader(source, strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ImageShareError("the PDF is protected by a password; send it without one")
        root: Any = reader.trailer["/Root"].get_object()

        def action(value: Any, depth: int = 0) -> None:
            value = value.get_object() if value is not None else None
            if not hasattr(value, "get") or depth > 8:
                return
            what = _RUNNING_ACTIONS.get(str(value.get("/S", "")), "")
            if what:
                found.append(what)
            following = value.get("/Next")
            for item in (following if isinstance(following, list) else [following]):
                action(item, depth + 1)

        def triggers(holder: Any) -> None:
            found_aa = holder.get("/AA")
            additional: Any = found_aa.get_object() if found_aa is not None else None
            if additional is not None and hasattr(additional, "values"):
                for value in additional.values():
                    action(value)
            action(holder.get("/A"))

        action(root.get("/OpenAction"))
        triggers(root)
        names = root.get("/Names")
        names = names.get_object() if names is not None else {}
        if "/JavaScript" in names:
            found.append("JavaScript")
        if "/EmbeddedFiles" in names:
            found.append("embedded files")
        form = root.get("/AcroForm")
        if form is not None and "/XFA" in form.get_object():
            found.append("an XFA form")
        for page in reader.pages:
            triggers(page)
            for annotation in page.get("/Annots") or []:
                annotation = annotation.get_object()
                triggers(annotation)
                if annotation.get("/Subtype") == "/FileAttachment":
                    found.append("embedded files")
    except ImageShareError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError,
            RecursionError) as exc:
        raise ImageShareError("the PDF cannot be read (damaged or not a PDF)") from exc
    if not found:
        return ""
    kinds = list(dict.fromkeys(found))
    return (ACTIVE_PDF + ", ".join(kinds) + " (not run here; other viewers may run it when "
            "it is opened: check it before accepting)")


def pdf(source: Path, details: PatientDetails, where: Placement, title: str,
        out: BinaryIO) -> None:
    """Write ``source`` as an Encapsulated PDF instance to ``out``."""
    size = os.path.getsize(source)
    if size >= 0xFFFFFFF0:
        raise ImageShareError("the document is too large")
    ds = _base(details, where, ENCAPSULATED_PDF, "DOC", "Documents")
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = Sequence()
    ds.DocumentTitle = title[:64] or "Document"
    ds.AcquisitionDateTime = where.uploaded_at.strftime("%Y%m%d%H%M%S")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = size

    def document(fh: BinaryIO) -> None:
        fh.write(_element_header(0x0042, 0x0011, b"OB", size + (size & 1)))
        with open(source, "rb") as src:
            _copy(src, fh, size)
        if size & 1:
            fh.write(b"\0")

    _write_around(ds, 0x00420011, out, document, EXPLICIT_LE)
