"""Hospitals for exchange tests, set up in this process before their servers start (accounts,
tokens, connected sites, studies): no command-line process per step, so two-site tests spend
their time on the exchange, not on start-up."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from imageshare.app import build_archive
from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from imageshare.settings import load_settings
from tests.peers import RunningServer


class Preparing:
    """The index and store of a server's data folder, opened while the server is stopped."""

    def __init__(self, server: RunningServer) -> None:
        server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.archive = build_archive(load_settings(environ=server.env()))

    def user(self, name: str, password: str, role: str, token: bool = False) -> str:
        """Add an account; with ``token``, return a new API token of it."""
        self.archive.users.add(name, password, role)
        return self.archive.users.create_token(name, "exchange tests", origin="cli") \
            if token else ""

    def site(self, ae_title: str, other: RunningServer, name: str, token: str = "",
             inbox: bool = True) -> None:
        """Register ``other`` by name, over DICOM and (with ``token``) its DICOMweb/site API."""
        self.archive.nodes.add(Node(
            ae_title, "127.0.0.1", other.dicom_port, display_name=name, inbox=inbox,
            dicomweb_url=other.dicomweb if token else "",
            dicomweb_auth=f"Bearer {token}" if token else ""))

    def studies(self, files: Iterable[Path]) -> None:
        """Store these files as the hospital's own."""
        for path in files:
            self.archive.ingest.store_copy(path, cli_actor())

    def close(self) -> None:
        """Done: the server may start."""
        self.archive.close()
