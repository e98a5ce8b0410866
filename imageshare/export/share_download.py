"""What a share's recipient downloads: its instances as a ZIP of DICOM files, or a ZIP of MP4
videos of its clips (file names carry no patient data); the download is audited on the
share."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom import dcmread

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.export.media import cine_to_mp4
from imageshare.export.writers import Numbering, ZipWriter
from imageshare.sharing.links import Share, ShareService
from imageshare.storage.files import owned_prefix

FORMATS = ("zip", "mp4")


def build_share_download(shares: ShareService, share: Share, actor: Actor, fmt: str,
                         staging_dir: Path) -> Path:
    """A ZIP (in a new folder under ``staging_dir``, which the caller removes) of what the
    recipient may see of ``share``: DICOM files (``zip``) or MP4 videos of the multi-frame
    instances (``mp4``); held-back instances are left out."""
    if fmt not in FORMATS:
        raise ImageShareError("format is zip or mp4")
    folder = Path(tempfile.mkdtemp(prefix=owned_prefix("share-"), dir=staging_dir))
    target = folder / "shared.zip"
    writer = ZipWriter(target)
    names = Numbering()
    count = 0
    for item in shares.items(share):
        path = shares.content(share, item) if not item.held_back else None
        if path is None:
            continue
        if fmt == "zip":
            writer.add_file(names.name(dcmread(path, stop_before_pixels=True)),
                            path.read_bytes())
            count += 1
            continue
        ds = dcmread(path)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            writer.add_file(names.name(ds)[:-4] + ".mp4", cine_to_mp4(ds))
            count += 1
    writer.close()
    shares.record(share, actor, "share.download", count=count, format=fmt)
    return target
