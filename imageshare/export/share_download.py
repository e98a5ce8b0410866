"""What a share's recipient downloads: its instances as a ZIP of DICOM files, or a ZIP of MP4
videos of its clips (file names carry no patient data); the download is audited on the
share. An instance deleted from the archive since it was shared is left out (the rest is
still handed out); DICOM files are streamed into the zip, never read whole into memory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydicom import dcmread

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.export.media import cine_to_mp4
from imageshare.export.writers import Numbering, ZipWriter
from imageshare.sharing.links import Share, ShareService
from imageshare.storage.files import owned_prefix

FORMATS = ("zip", "mp4")


def build_share_download(shares: ShareService, share: Share, actor: Actor, fmt: str,
                         staging_dir: Path) -> Path:
    """A ZIP (in a new folder under ``staging_dir``, which the caller removes) of what the
    recipient may see of ``share``: DICOM files (``zip``) or MP4 videos of the multi-frame
    instances (``mp4``); held-back instances, and instances no longer in the archive, are
    left out."""
    if fmt not in FORMATS:
        raise ImageShareError("format is zip or mp4")
    folder = Path(tempfile.mkdtemp(prefix=owned_prefix("share-"), dir=staging_dir))
    target = folder / "shared.zip"
    writer = ZipWriter(target)
    try:
        count = _write_items(shares, share, fmt, writer)
    except BaseException:
        try:
            writer.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # no partial copy of patient data stays
        raise
    writer.close()
    shares.record(share, actor, "share.download", count=count, format=fmt)
    return target


def _write_items(shares: ShareService, share: Share, fmt: str, writer: ZipWriter) -> int:
    """What the recipient may see of ``share`` into ``writer``; returns how many files."""
    names = Numbering()
    count = 0
    for item in shares.items(share):
        try:
            path = shares.content(share, item) if not item.held_back else None
        except NotFound:  # deleted from the archive since it was shared
            path = None
        if path is None:
            continue
        if fmt == "zip":
            writer.add_path(names.name(dcmread(path, stop_before_pixels=True)), path)
            count += 1
            continue
        ds = dcmread(path)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            writer.add_file(names.name(ds)[:-4] + ".mp4", cine_to_mp4(ds))
            count += 1
    return count
