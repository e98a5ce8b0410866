"""Composition root: builds stores and services from Settings and starts HTTP + DICOM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from imageshare.access.policy import Policy
from imageshare.access.users import UserDirectory
from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.ingest import IngestService
from imageshare.archive.query import QueryService
from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditTrail
from imageshare.domain.actors import SYSTEM
from imageshare.exchange.nodes import NodeRegistry
from imageshare.settings import Settings
from imageshare.storage.blobs import BlobStore, open_blob_store
from imageshare.storage.index.database import make_engine, migrate
from imageshare.storage.index.schema import instances

log = logging.getLogger("imageshare")


@dataclass
class Archive:
    """Every service of one ImageShare installation, built once."""

    settings: Settings
    engine: Engine
    blobs: BlobStore
    audit: AuditTrail
    writer: IndexWriter
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    users: UserDirectory
    nodes: NodeRegistry
    policy: Policy

    def close(self) -> None:
        """Finish pending index writes and release the database."""
        self.ingest.close()
        self.writer.close()
        self.engine.dispose()


def build_archive(settings: Settings, upgrade: bool = True) -> Archive:
    """Create (and migrate) the index and blob store and wire the services together."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url, settings.sqlite_synchronous)
    migrate(engine, upgrade=upgrade)
    blobs = open_blob_store(settings.resolved_storage_url)
    audit = AuditTrail(engine)
    writer = IndexWriter(engine)
    ingest = IngestService(
        blobs, writer, audit, settings.staging_dir, overwrite=settings.overwrite_instances
    )
    retrieve = RetrieveService(engine, blobs, audit)
    query = QueryService(
        engine, settings.ae_title, retrieve.header_json, audit, settings.qido_max_limit
    )
    return Archive(
        settings=settings, engine=engine, blobs=blobs, audit=audit, writer=writer,
        ingest=ingest, query=query, retrieve=retrieve, users=UserDirectory(engine),
        nodes=NodeRegistry(engine), policy=Policy(store_from_any_ae=settings.store_from_any_ae),
    )


def recover(archive: Archive) -> int:
    """Clean partial writes and index blobs the index lost; returns how many were re-indexed."""
    for leftover in archive.settings.staging_dir.glob("*"):
        leftover.unlink(missing_ok=True)
    clear = getattr(archive.blobs, "clear_partial_writes", None)
    if clear is not None:
        clear()
    with archive.engine.connect() as conn:
        known = set(conn.execute(select(instances.c.blob_key)).scalars())
    recovered = archive.ingest.recover_unindexed(known, SYSTEM)
    if recovered:
        log.warning("re-indexed %d stored instance(s) missing from the index", recovered)
    return recovered


def serve(settings: Settings) -> None:
    """Run HTTP and the DICOM listener in this process until SIGINT/SIGTERM."""
    import uvicorn

    from imageshare.dicom.scp import DicomListener
    from imageshare.web.server import create_app

    archive = build_archive(settings)
    generated = archive.users.ensure_admin(settings.admin_password)
    if generated:
        print(
            f"Created user 'admin' with password: {generated}\n"
            "This password is shown only once; store it safely.",
            flush=True,
        )
    recover(archive)
    listener = None
    if settings.dicom_port:
        listener = DicomListener(
            settings.ae_title, settings.dicom_port, settings.dicom_host or settings.http_host,
            archive.ingest, archive.query,
            archive.retrieve, archive.nodes, archive.policy,
            max_associations=settings.max_associations, timeout=settings.dicom_timeout,
            max_pdu=settings.max_pdu_size, check_calling_host=settings.check_calling_host,
        )
        listener.start()
        log.info("DICOM listener %s on port %d", settings.ae_title, listener.port)
    app = create_app(archive)
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning",
        access_log=False, timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    stopped = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        server.should_exit = True
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    print(
        f"ImageShare listening: http://{settings.http_host}:{settings.http_port}/ "
        f"and DICOM {settings.ae_title}@{settings.dicom_port}",
        file=sys.stderr, flush=True,
    )
    try:
        server.run()
    finally:
        if listener is not None:
            listener.stop()
        archive.close()
