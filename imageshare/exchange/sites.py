"""How ImageShare talks to other sites, whatever the protocol: the interface the exchange
services use (adapters, side by side: DIMSE in :mod:`imageshare.dicom.scu`, DICOMweb in
:mod:`imageshare.dicom.dicomweb_site`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imageshare.exchange.nodes import Node


@dataclass(frozen=True)
class RetrieveProgress:
    """How far a retrieval got."""

    received: int
    expected: int
    failed: int = 0
    problems: tuple[str, ...] = ()  # why instances failed, for people ("2 not asked for")


Progress = Callable[[RetrieveProgress], None]
Delivered = Callable[[Path], None]
# study keyword -> value, e.g. {"PatientID": "9434765919"}; results are DICOM JSON.
Criteria = dict[str, str]


class SiteClient(Protocol):
    """One protocol's way to search, retrieve from and send to a site."""

    def find_studies(self, node: Node, criteria: Criteria, timeout: float
                     ) -> list[dict[str, Any]]:
        """Studies matching ``criteria`` at the site, as DICOM JSON."""
        ...

    def retrieve_study(self, node: Node, study_uid: str, progress: Progress) -> RetrieveProgress:
        """Bring the study here (into the archive's ingest pipeline)."""
        ...

    def check(self, node: Node, timeout: float) -> str:
        """Whether the site answers us this way (C-ECHO; an authenticated QIDO-RS): what it
        said, for people. Raises :class:`SiteUnreachable` with the reason when it does not."""
        ...

    def send(self, node: Node, files: Iterable[Path], progress: Progress,
             delivered: Delivered | None = None) -> RetrieveProgress:
        """Send stored instances to the site; counts delivered and failed. ``delivered`` is
        called with each file the site acknowledged, as soon as it did. Raises
        :class:`SiteUnreachable` when the site cannot be reached or the connection is lost."""
        ...
