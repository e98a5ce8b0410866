"""The file meta information of a received Part 10 file, made to name the data set it holds.

PS3.10 7.1: the Media Storage SOP Class and Instance UIDs of the file meta information
identify the SOP instance in the file. Files from faulty anonymisers or converters often
keep the meta information of the original instance after the data set got new UIDs; kept as
received, every retrieval would hand out a file that contradicts itself. Such a file is
stored with its meta information rewritten from the data set; the data set is kept byte
for byte.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from imageshare.storage.blobs import BlobStore
from imageshare.storage.files import owned_prefix

_PREAMBLE = 128
_CHUNK = 1 << 20


def meta_disagrees(ds: Dataset) -> bool:
    """True when the file meta information of ``ds`` (read from a Part 10 file) lacks its
    Media Storage SOP Class/Instance UID or names another class or instance than the data
    set."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return False
    for meta_keyword, keyword in (("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
                                  ("MediaStorageSOPClassUID", "SOPClassUID")):
        if str(meta.get(meta_keyword, "") or "").strip() != str(ds.get(keyword, "")).strip():
            return True
    return False


def copy_with_dataset_meta(blobs: BlobStore, key: str, ds: Dataset, folder: Path) -> Path:
    """A new file in ``folder``: the blob ``key`` (a Part 10 file whose data set is ``ds``)
    with its Media Storage SOP Class/Instance UIDs set from the data set and everything
    else as it was. The caller removes the file."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=owned_prefix(), suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as out, blobs.open(key) as src:
            preamble = src.read(_PREAMBLE + 4)
            old = _read_file_meta_info(src)  # leaves ``src`` at the data set
            meta = FileMetaDataset()
            for element in old:
                if element.tag.element != 0x0000:  # the group length is written anew
                    meta.add(element)
            meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID).strip())
            meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID).strip())
            out.write(preamble)
            write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
            while chunk := src.read(_CHUNK):
                out.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)
