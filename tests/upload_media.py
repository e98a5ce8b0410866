"""What patients bring: a CD folder with a DICOMDIR, phone photos, a video and a PDF letter,
written for the upload tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from fpdf import FPDF
from PIL import Image
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests.factory import ct_series


def cd_folder(folder: Path, patient_id: str = "OTHER-77", name: str = "Lovelace^Ada",
              nhs: str = "", count: int = 3) -> Path:
    """A CD's contents: DICOMDIR and its referenced files (another hospital's patient ID)."""
    made = ct_series(folder.parent / (folder.name + "-src"), count, patient_id=patient_id,
                     patient_name=name, PatientBirthDate="19151210")
    fileset = FileSet()
    for path in made:
        ds = dcmread(path)
        if nhs:
            from pydicom import Dataset, Sequence

            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = nhs, "NHS"
            ds.OtherPatientIDsSequence = Sequence([item])
        fileset.add(ds)
    fileset.write(folder)
    return folder


def photo(path: Path, width: int = 640, height: int = 480) -> Path:
    """A phone photo (JPEG) with an EXIF orientation."""
    rng = np.random.default_rng(width)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the photo is turned upright on the way in
    image.save(path, format="JPEG", exif=exif)
    return path


def png(path: Path) -> Path:
    """A screenshot (PNG)."""
    Image.fromarray(np.full((200, 300, 3), 90, dtype=np.uint8)).save(path, format="PNG")
    return path


def mp4(path: Path, frames: int = 40, width: int = 320, height: int = 240,
        codec: str = "libx264", metadata: dict[str, str] | None = None) -> Path:
    """A phone video (H.264 in MP4), noisy so that it is not tiny; ``metadata`` as a phone
    writes it into the container (its own keys kept, e.g. the place it was filmed)."""
    rng = np.random.default_rng(frames)
    options = {"movflags": "use_metadata_tags"} if metadata else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pdf(path: Path) -> Path:
    """A referral letter."""
    document = FPDF()
    document.add_page()
    document.set_font("helvetica", size=12)
    document.cell(text="Referral letter")
    document.output(str(path))
    return path
