"""An in-process DICOM listener on a free port, for tests that talk DIMSE to an archive."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

from imageshare.dicom.scp import DicomListener
from imageshare.exchange.nodes import Node


@contextlib.contextmanager
def listening(archive, calling_ae: str | None, **options: Any) -> Iterator[DicomListener]:
    """The archive's listener (with ``options`` of :class:`DicomListener`: a TLS port, the
    refused callers), started with ``calling_ae`` registered as a node (None: the test
    registers its own); stopped and the temporary folder (which the listener points at its
    staging folder) given back after."""
    if calling_ae is not None:
        archive.nodes.add(Node(calling_ae, "127.0.0.1", 104))
    temporary_folder = tempfile.tempdir
    served = DicomListener("IMAGESHARE", 0, "127.0.0.1", archive.ingest, archive.query,
                           archive.retrieve, archive.nodes, archive.policy, **options)
    served.start()
    try:
        yield served
    finally:
        with contextlib.suppress(ValueError):
            served.stop()
        tempfile.tempdir = temporary_folder
