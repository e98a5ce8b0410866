"""An in-process DICOM listener on a free port, for tests that talk DIMSE to an archive."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from imageshare.dicom.scp import DicomListener
from imageshare.exchange.nodes import Node


@contextlib.contextmanager
def listening(archive, calling_ae: str) -> Iterator[DicomListener]:
    """The archive's listener, started with ``calling_ae`` registered as a node; stopped and
    the temporary folder (which the listener points at its staging folder) given back after."""
    archive.nodes.add(Node(calling_ae, "127.0.0.1", 104))
    temporary_folder = tempfile.tempdir
    served = DicomListener("IMAGESHARE", 0, "127.0.0.1", archive.ingest, archive.query,
                           archive.retrieve, archive.nodes, archive.policy)
    served.start()
    try:
        yield served
    finally:
        with contextlib.suppress(ValueError):
            served.stop()
        tempfile.tempdir = temporary_folder
