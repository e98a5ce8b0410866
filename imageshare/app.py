"""Composition root: builds stores and services from Settings and starts HTTP + DICOM."""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.engine import make_url

from imageshare.access.policy import Policy, arrival_class
from imageshare.access.sessions import SessionStore
from imageshare.access.sign_in import SignIn
from imageshare.access.throttle import SignInThrottle
from imageshare.access.users import UserDirectory
from imageshare.archive import pixel_budget
from imageshare.archive.annotations import AnnotationBook
from imageshare.archive.attachments import AttachmentService
from imageshare.archive.comments import CommentBook
from imageshare.archive.corrections import PatientCorrections
from imageshare.archive.deletion import ArchiveDeletion
from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.ingest import IngestService
from imageshare.archive.pixel_budget import PixelLimits
from imageshare.archive.query import QueryService
from imageshare.archive.retrieve import RetrieveService
from imageshare.archive.search import StudySearchService
from imageshare.archive.studies import StudyCatalogue
from imageshare.archive.tombstones import is_tombstoned, remove_tombstoned, tombstoned_keys
from imageshare.audit.atna import AtnaConfig, AtnaSender
from imageshare.audit.chain import SignedHead, export_head, head_key
from imageshare.audit.reports import AccessReports
from imageshare.audit.trail import AuditTrail
from imageshare.deid.pseudonyms import Pseudonyms, installation_secret
from imageshare.deid.service import Deidentifier
from imageshare.deid.setup import deidentifier_for
from imageshare.dicom.dicomweb_site import DicomwebSites
from imageshare.dicom.scu import DimseSites
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import ConfigurationError
from imageshare.domain.retention import RetentionPeriods
from imageshare.ehr.launch import EhrLaunches
from imageshare.exchange.arrivals import Arrivals
from imageshare.exchange.federated import ExchangeService
from imageshare.exchange.inbox import Inbox
from imageshare.exchange.nodes import NodeRegistry, RefusedCallers
from imageshare.exchange.requests import ImagingRequests
from imageshare.exchange.site_api import SiteApi
from imageshare.exchange.site_status import SiteStatusBoard
from imageshare.exchange.sites import SiteClient
from imageshare.exchange.transfers import Transfers
from imageshare.export.service import ExportService
from imageshare.fhir.imaging_study import ImagingStudies
from imageshare.fhir.page_seal import PageSeal
from imageshare.governance.consent import ConsentBook
from imageshare.governance.key_rotation import KeyRotation, StoreSeal, check_index_key
from imageshare.jobs import DatabaseJobQueue, Job
from imageshare.jobs.periodic import PeriodicTask, PeriodicTasks
from imageshare.notify import Mailer, MailSettings, Notifier
from imageshare.retention.facts import study_on_hold
from imageshare.retention.service import RetentionService
from imageshare.settings import Settings
from imageshare.sharing.cases import CaseBook
from imageshare.sharing.links import ShareService
from imageshare.storage.blobs import (
    BlobStore,
    fsync_file,
    key_prefix_for,
    open_blob_store,
    results_store_url,
    sibling_store_url,
)
from imageshare.storage.encrypted import (
    EncryptedBlobStore,
    blob_master_key,
)
from imageshare.storage.files import make_private, remove_leftovers
from imageshare.storage.index.database import make_engine, migrate
from imageshare.storage.index.schema import instances
from imageshare.storage.secret_box import KEY_FILE as SECRET_KEY_FILE
from imageshare.storage.secret_box import SecretBox, load_secret_key
from imageshare.storage.submissions import FormSubmissions
from imageshare.teaching.library import TeachingLibrary
from imageshare.tls import (
    check_tls_settings,
    client_context,
    dicom_server_context,
    exposure_warnings,
    https_enabled,
)
from imageshare.uploads.intake import UploadIntake, ZipLimits
from imageshare.uploads.invitations import UploadInvitations
from imageshare.uploads.patients import PatientAccounts
from imageshare.uploads.receiving import UploadReceiver
from imageshare.uploads.review import UploadReview
from imageshare.uploads.service import UploadService
from imageshare.workers import Worker, Workers, die_with_server

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
    sessions: SessionStore
    nodes: NodeRegistry
    policy: Policy
    search: StudySearchService
    catalogue: StudyCatalogue
    comments: CommentBook
    attachments: AttachmentService
    corrections: PatientCorrections
    throttle: SignInThrottle
    sign_in: SignIn
    jobs: DatabaseJobQueue
    exports: ExportService
    notifier: Notifier
    shares: ShareService
    cases: CaseBook
    annotations: AnnotationBook
    teaching: TeachingLibrary
    exchange: ExchangeService
    transfers: Transfers
    inbox: Inbox
    retention: RetentionService
    deletion: ArchiveDeletion
    requests: ImagingRequests
    arrivals: Arrivals
    site_status: SiteStatusBoard
    refused_callers: RefusedCallers
    ehr_launches: EhrLaunches
    imaging_studies: ImagingStudies
    uploads: UploadService
    reports: AccessReports
    consents: ConsentBook
    submissions: FormSubmissions
    fhir_pages: PageSeal

    def stop_jobs(self, grace: float) -> None:
        """Stop this process's background work: running transfers stop between instances
        (resumed on the next start, never waiting out a pause between attempts), other jobs
        get ``grace`` seconds and are then handed back to the queue."""
        self.transfers.close()
        self.jobs.close(grace)

    def close(self) -> None:
        """Finish pending index writes and release the database."""
        self.jobs.close()
        self.ingest.close()
        self.writer.close()
        self.writer.engine.dispose()
        self.engine.dispose()


def configure_process(settings: Settings) -> None:
    """What the settings fix for the whole process: the pixel budget and decode slots."""
    pixel_budget.configure(PixelLimits(
        max_frame_bytes=settings.max_decoded_frame_bytes,
        max_instance_bytes=settings.max_decoded_instance_bytes,
        max_concurrent_decodes=settings.max_concurrent_decodes,
    ))


def _private_data_dir(settings: Settings) -> None:
    """The data folder and everything in it private to this user (0700/0600), the SQLite
    index made 0600 before SQLite creates it (its -wal and -shm files take its mode). The
    folders that can hold many files are walked the first time only: since then everything
    in them was made private by this process's umask."""
    make_private(settings.data_dir, skip_after_first=(
        "blobs", "exports", "share-cache", "uploads", "quarantine", "staging"))
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            side = path.with_name(path.name + suffix)
            if side.exists() and side.stat().st_mode & 0o077:
                side.chmod(0o600)


def installation_key_file(settings: Settings) -> Path:
    """Where the installation key is kept when ``secret_key`` does not give it."""
    return (Path(settings.secret_key_file) if settings.secret_key_file
            else settings.data_dir / SECRET_KEY_FILE)


def installation_key(settings: Settings) -> bytes:
    """The per-installation key (``secret_key`` or ``secret_key_file``), kept apart from the
    database: it seals secrets at rest and signs the audit chain's heads and backups."""
    return load_secret_key(settings.secret_key, installation_key_file(settings))


# The store beside the blob store that keeps the files of uploads as they came.
ORIGINALS = "upload-originals"


def retired_installation_keys(settings: Settings) -> list[bytes]:
    """The installation keys of earlier secret keys (``retired_secret_keys`` and the lines of
    ``retired_secret_keys_file``), for a key rotation. ConfigurationError naming the entry's
    place, never its value, when one is not a key; and when the file cannot be read or is
    readable by anyone but its owner."""
    listed = (v for v in settings.retired_secret_keys.split(",") if v.strip())
    entries = [(f"retired_secret_keys entry {n}", value)
               for n, value in enumerate(listed, 1)]
    if settings.retired_secret_keys_file:
        path = Path(settings.retired_secret_keys_file)
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigurationError(
                    f"the retired secret keys file {path} is readable by others: make it "
                    "readable by its owner only (chmod 600)")
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the retired secret keys file {path}") from exc
        entries += [(f"line {n} of {path}", line) for n, line in enumerate(lines, 1)
                    if line.strip() and not line.strip().startswith("#")]
    keys = []
    for place, value in entries:
        try:
            keys.append(load_secret_key(value, Path(os.devnull)))
        except ConfigurationError:
            raise ConfigurationError(
                f"a retired secret key ({place}) is not a key: a Fernet key or at least 32 "
                "random characters, as IMAGESHARE_SECRET_KEY") from None
    return keys


def blob_store(settings: Settings, beside: str = "") -> BlobStore:
    """The blob store of ``settings`` (or the store ``beside`` it, e.g. the kept originals
    of uploads): sealed (AES-256-GCM) when ``encrypt_blobs`` is on; then it also reads blobs
    sealed under retired secret keys, and with ``encrypted_blobs_only`` refuses a blob
    without the encryption header. Refused (ConfigurationError) when the secret key opens
    none of the sealed blobs it samples."""
    url = settings.resolved_storage_url
    store = open_blob_store(sibling_store_url(url, beside) if beside else url,
                            settings.s3_endpoint_url)
    if not settings.encrypt_blobs:
        return store
    return EncryptedBlobStore(
        store, blob_master_key(installation_key(settings)),
        plaintext=not settings.encrypted_blobs_only,
        retired_keys=[blob_master_key(k) for k in retired_installation_keys(settings)])


def seal_blob_stores(archive: Archive, actor: Actor,
                     progress: Callable[[int], None] | None = None) -> list[StoreSeal]:
    """Seal under the current secret key what ``imageshare storage seal`` seals (see
    :meth:`KeyRotation.seal`): the blob store, the store of upload originals beside it and
    the index's secrets; the index's secrets only when blobs are not encrypted (a key
    rotation must still move them to the new key)."""
    settings = archive.settings
    rotation = KeyRotation(archive.engine, archive.audit, installation_key(settings),
                           retired_installation_keys(settings))
    if not settings.encrypt_blobs or not isinstance(archive.blobs, EncryptedBlobStore):
        return rotation.seal(actor, None, None, False, progress)
    originals = blob_store(settings, beside=ORIGINALS)
    assert isinstance(originals, EncryptedBlobStore)  # encrypt_blobs is on
    return rotation.seal(actor, archive.blobs, (ORIGINALS, originals),
                         settings.encrypted_blobs_only, progress)


def _secret_box(settings: Settings) -> SecretBox:
    return SecretBox(installation_key(settings), retired_installation_keys(settings))


def export_audit_head(archive: Archive) -> SignedHead:
    """Append the audit chain's current head, signed, to the heads file."""
    settings = archive.settings
    return export_head(archive.engine, head_key(installation_key(settings)),
                       settings.resolved_audit_head_file)


def atna_sender(archive: Archive) -> AtnaSender | None:
    """The sender of audit messages to the configured audit repository (None: none set)."""
    s = archive.settings
    if not s.atna_host:
        return None
    return AtnaSender(archive.engine, AtnaConfig(
        host=s.atna_host, port=s.atna_port, ca_file=s.atna_ca_file,
        client_certificate=s.atna_client_certificate,
        client_private_key=s.atna_client_private_key,
        audit_source_id=s.atna_audit_source_id or s.ae_title,
        enterprise_site_id=s.atna_enterprise_site_id, ae_title=s.ae_title))


def _start_head_export(archive: Archive) -> threading.Event:
    """Export the signed audit chain head now and every ``audit_head_interval_seconds``."""
    stop = threading.Event()
    every = archive.settings.audit_head_interval_seconds

    def run() -> None:
        while True:
            try:
                export_audit_head(archive)
            except Exception as exc:  # noqa: BLE001 - tried again next time; logged
                log.warning("exporting the audit chain head failed: %s", type(exc).__name__)
            if stop.wait(every):
                return

    if every > 0:
        threading.Thread(target=run, name="audit-head", daemon=True).start()
    return stop


def _start_staging_sweep(archive: Archive, every: float = 600.0) -> threading.Event:
    """Every ``every`` seconds, remove from staging what processes of this machine that have
    ended (a DICOM worker that died mid-receive, an import that was killed) left there."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            try:
                removed = remove_leftovers(archive.settings.staging_dir)
            except OSError as exc:  # tried again next time; logged
                log.warning("clearing staging failed: %s", exc.strerror or type(exc).__name__)
                continue
            if removed:
                log.info("removed %d leftover staging file(s)", removed)

    threading.Thread(target=run, name="staging-sweep", daemon=True).start()
    return stop


def _checkpoint(engine: Engine) -> None:
    """On SQLite, move what start-up wrote (migrations, recovery) from the write-ahead log
    into the index and empty the log: it then grows only with new work (on a nearly full
    disk that is room for the writes that matter)."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def _forget_plaintext(engine: Engine) -> None:
    """Rewrite a SQLite index so that no old page (free space, the write-ahead log) still
    holds a value just encrypted."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.exec_driver_sql("VACUUM")
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def build_archive(settings: Settings, upgrade: bool = True) -> Archive:
    """Create (and migrate) the index and blob store and wire the services together."""
    configure_process(settings)
    check_tls_settings(settings)
    _private_data_dir(settings)
    box = _secret_box(settings)
    engine = make_engine(settings.resolved_database_url, settings.sqlite_synchronous)
    migrate(engine, upgrade=upgrade)
    try:
        check_index_key(engine, box)
    except ConfigurationError as exc:
        # Said at every start, but not refused: with a lost key the archive must still
        # receive, serve and restore; what needs a secret fails alone (an administrator
        # clears the second factors, site credentials are entered again).
        log.error("%s", exc)
    blobs = blob_store(settings)
    audit = AuditTrail(engine, settings.audit_view_window_seconds)
    writer_engine = (
        make_engine(settings.resolved_database_url, settings.sqlite_synchronous, for_writer=True)
        if engine.dialect.name == "sqlite" else engine
    )
    writer = IndexWriter(writer_engine)
    ingest = IngestService(
        blobs, writer, audit, settings.staging_dir, overwrite=settings.overwrite_instances,
        min_free_mb=settings.min_free_disk_mb, quarantine_dir=settings.quarantine_dir,
        patient_mismatch=settings.patient_mismatch, arrival_class=arrival_class,
    )
    retrieve = RetrieveService(engine, blobs, audit, settings.staging_dir)
    query = QueryService(
        engine, settings.ae_title, retrieve.header_json, audit, settings.qido_max_limit
    )
    catalogue = StudyCatalogue(engine, audit)
    jobs = DatabaseJobQueue(
        engine, box=box, workers=settings.job_workers,
        lease_seconds=settings.job_lease_seconds,
        retry_delays=settings.job_retry_schedule,
        max_run_seconds=settings.job_max_run_seconds)
    deidentifiers: dict[str, Deidentifier] = {}

    def deidentifier(profile: str) -> Deidentifier:
        if profile not in deidentifiers:
            deidentifiers[profile] = deidentifier_for(settings, profile)
        return deidentifiers[profile]

    corrections = PatientCorrections(engine, writer, blobs, audit, catalogue,
                                     settings.staging_dir, ingest.parents_changed)
    deletion = ArchiveDeletion(writer, blobs, audit, ingest.parents_changed, RetentionPeriods(
        clinical_years=settings.clinical_retention_years,
        clinical_until_age=settings.clinical_retention_until_age,
        temporary_days=settings.temporary_days, upload_days=settings.upload_retention_days))
    tls = client_context(settings)  # for nodes reached over DICOM TLS and https sites
    clients: dict[str, SiteClient] = {
        "dimse": DimseSites(settings.ae_title, settings.dicom_timeout, tls),
        "dicomweb": DicomwebSites(lambda stream: ingest.store_stream(
            stream, Actor("system", "exchange", "system", "dicomweb")), tls=tls),
    }
    users_directory = UserDirectory(engine, box, audit)
    nodes = NodeRegistry(engine, box, audit)
    if upgrade:  # secrets an older version stored in plaintext are encrypted now
        sealed = users_directory.seal_stored_secrets() + nodes.seal_stored_credentials()
        if sealed:
            log.warning("encrypted %d secret(s) stored in plaintext by an older version", sealed)
            _forget_plaintext(engine)
    search = StudySearchService(query)
    sessions = SessionStore(engine)
    mailer = Mailer(MailSettings(settings.smtp_host, settings.smtp_port, settings.smtp_tls,
                                 settings.smtp_user, settings.smtp_password,
                                 settings.mail_sender))
    # Mail only to a confirmed address: one typed by mistake is nobody's inbox to fill.
    notifier = Notifier(engine, mailer, users_directory.verified_email_of, settings.public_url)
    jobs.set_notify(notifier.notify)
    shares = ShareService(
        engine, retrieve, audit, notifier, deidentifier,
        lambda: Pseudonyms(installation_secret(settings.data_dir, settings.deid_secret)),
        settings.data_dir / "share-cache", settings.share_default_days,
        settings.share_max_days, ingest, users=users_directory, public_url=settings.public_url,
        jobs=jobs)
    exports = ExportService(
        retrieve, audit, jobs, settings.data_dir / "exports", deidentifier,
        open_blob_store(results_store_url(settings.resolved_storage_url),
                        settings.s3_endpoint_url), min_free_mb=settings.min_free_disk_mb)
    jobs.set_on_forget(exports.forget)
    retention = RetentionService(
        engine, deletion, audit,
        lambda name: any(a.username == name and a.role == "admin" and not a.disabled
                         for a in users_directory.accounts()))
    ingest.classify = retention.arrival_class
    ingest.on_hold = corrections.on_hold = study_on_hold
    consents = ConsentBook(engine, audit)
    shares.consent_check = consents.require
    corrections.on_refiled = shares.end_patients_shares
    teaching = TeachingLibrary(engine, retrieve, ingest, deidentifier, blobs, audit,
                               settings.max_upload_bytes)
    teaching.teaching_refused = consents.refusal_of_teaching

    def withdrawn(patient_id: str, issuer: str, purpose: str, actor: Actor) -> int:
        """What was shared under a consent the patient withdrew or refused ends: their
        identifiable shares for that purpose and, for teaching, the shares of the teaching
        cases made from their studies."""
        ended = shares.end_for_withdrawn_consent(patient_id, issuer, purpose, actor)
        if purpose == "teaching":
            copies = teaching.copies_from(shares.patient_studies(patient_id, issuer))
            ended += shares.end_shares_of(
                copies, "the patient's consent to teaching use was withdrawn", actor)
        return ended

    consents.on_withdrawn = withdrawn
    throttle = SignInThrottle(engine)
    _register_housekeeping(jobs, shares, retention, throttle)
    site_api = SiteApi(nodes, jobs, tls, settings.push_retry_schedule)
    transfers = Transfers(engine, nodes, clients, retrieve, jobs, notifier, audit,
                          settings.push_retry_schedule, site_api, settings.ae_title)
    inbox = Inbox(engine, catalogue, corrections, deletion, audit)
    arrivals = Arrivals(engine, nodes, site_api, mailer, audit, settings.ae_title,
                        settings.exchange_team_email, settings.public_url)
    inbox.on_decided(arrivals.send_receipt)
    uploads = _uploads(settings, engine, audit, ingest, inbox, catalogue, corrections, mailer,
                       users_directory, jobs, deletion)
    archive = Archive(
        settings=settings, engine=engine, blobs=blobs, audit=audit, writer=writer,
        ingest=ingest, query=query, retrieve=retrieve, users=users_directory,
        sessions=sessions,
        nodes=nodes,
        policy=Policy(store_from_any_ae=settings.store_from_any_ae,
                      shared_with=lambda actor: (*shares.grants_for(actor),
                                                 *uploads.patients.grants_for(actor))),
        search=search, catalogue=catalogue,
        comments=CommentBook(engine, audit), attachments=AttachmentService(catalogue, ingest),
        corrections=corrections,
        throttle=throttle, sign_in=SignIn(users_directory, sessions, throttle, audit),
        jobs=jobs, exports=exports,
        notifier=notifier, shares=shares, cases=CaseBook(engine, retrieve, audit),
        annotations=AnnotationBook(engine, retrieve, ingest, audit),
        teaching=teaching,
        exchange=ExchangeService(engine, nodes, clients, search, audit, jobs,
                                 settings.exchange_timeout,
                                 settings.link_by_name_and_birth_date,
                                 settings.temporary_days),
        site_status=SiteStatusBoard(engine, nodes, settings.temporary_days),
        transfers=transfers, inbox=inbox, arrivals=arrivals,
        retention=retention, deletion=deletion,
        requests=ImagingRequests(engine, nodes, notifier, audit, settings.ae_title, tls,
                                 site_api, transfers),
        refused_callers=RefusedCallers(engine, nodes, audit),
        ehr_launches=EhrLaunches(engine, box, users_directory, audit,
                                 settings.iid_launch_max_seconds),
        imaging_studies=ImagingStudies(query, settings.fhir_hospital_number_system),
        uploads=uploads,
        reports=AccessReports(engine, audit),
        consents=consents,
        submissions=FormSubmissions(engine),
        fhir_pages=PageSeal(installation_key(settings)),
    )
    jobs.register("recover", lambda job, params: _recover_job(archive, job, params))
    return archive


def _uploads(settings: Settings, engine: Engine, audit: AuditTrail, ingest: IngestService,
             inbox: Inbox, catalogue: StudyCatalogue, corrections: PatientCorrections,
             mailer: Mailer, users: UserDirectory, jobs: DatabaseJobQueue,
             deletion: ArchiveDeletion) -> UploadService:
    """The uploads capability: files being received live in the data folder (``uploads/``),
    the kept originals beside the blob store (``upload-originals``: a folder next to it, or
    a prefix in its bucket; sealed like the blobs when they are)."""
    invitations = UploadInvitations(engine, audit, mailer, settings.public_url,
                                    settings.upload_max_mb << 20, settings.upload_max_days)
    originals = blob_store(settings, beside=ORIGINALS)
    return UploadService(
        invitations=invitations,
        receiver=UploadReceiver(engine, audit, settings.data_dir / "uploads"),
        intake=UploadIntake(engine, ingest, originals, audit, settings.staging_dir,
                            ZipLimits(max_ratio=settings.upload_zip_max_ratio)),
        review=UploadReview(engine, invitations, inbox, catalogue, corrections, originals,
                            audit),
        patients=PatientAccounts(engine, users, audit, mailer,
                                 settings.public_url),
        jobs=jobs,
        deletion=deletion,
    )


def _register_housekeeping(jobs: DatabaseJobQueue, shares: ShareService,
                           retention: RetentionService, throttle: SignInThrottle) -> None:
    """The jobs that keep the installation tidy (queued by :func:`periodic_tasks` and the
    share pages)."""

    def prepare_share(_job: Job, params: dict[str, Any]) -> None:
        shares.prepare(shares.by_public_id(params["share"], _job.owner))

    def run_retention(job: Job, _params: dict[str, Any]) -> None:
        removed = retention.run(SYSTEM)
        job.summary = (f"{removed.instances} instance(s) of {len(removed.studies)} study(ies) "
                       f"removed; {removed.kept} kept (hold or class)")

    def share_notices(job: Job, _params: dict[str, Any]) -> None:
        told = shares.notify_expiring()
        forgotten = jobs.forget_finished()
        throttle.forget_old()
        job.summary = f"{told} owner(s) told; {forgotten} old job(s) removed"

    jobs.register("share", prepare_share)
    jobs.register("retention", run_retention)
    jobs.register("share-notices", share_notices)


def shared_index_warnings(archive: Archive) -> list[str]:
    """What an instance on a shared (PostgreSQL) index lacks to agree with the others."""
    settings = archive.settings
    if archive.engine.dialect.name == "sqlite":
        return []
    warnings_ = []
    if not settings.secret_key and not settings.secret_key_file:
        warnings_.append("the index may be shared by several instances, but the secret key "
                         "is this data dir's own: set IMAGESHARE_SECRET_KEY on every instance")
    if not settings.deid_secret:
        warnings_.append("the index may be shared by several instances, but the "
                         "de-identification secret is this data dir's own: set "
                         "IMAGESHARE_DEID_SECRET on every instance")
    return warnings_


def periodic_tasks(archive: Archive) -> PeriodicTasks:
    """The tasks every instance offers to queue, each once per period across instances."""
    settings = archive.settings
    return PeriodicTasks(archive.jobs, [
        PeriodicTask("retention", settings.retention_every_seconds,
                     "Retention: deleting what its class lets go"),
        PeriodicTask("share-notices", settings.share_notices_every_seconds,
                     "Notices of share links about to expire"),
        PeriodicTask("upload-cleanup", settings.retention_every_seconds,
                     "Uploads: removing files of invitations that ended unsent"),
    ])


_RECOVERY_LOCK = 0x1A6E5A4E  # the PostgreSQL advisory lock held while recovery runs


@contextmanager
def _recovery_lock(engine: Engine) -> Iterator[None]:
    """One instance at a time recovers (on PostgreSQL; a SQLite index has one process)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _RECOVERY_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _RECOVERY_LOCK})
            conn.commit()


def _recover_range(archive: Archive, since: str, until: str = "") -> int:
    """Index the blobs with keys from ``since`` (before ``until``) that the index lost; the
    blobs of deleted instances (tombstoned) are removed instead, never indexed again."""
    referenced_key = select(instances.c.pk).where(instances.c.blob_key == bindparam("key"))

    def referenced(key: str) -> bool:
        with archive.engine.connect() as conn:
            return (conn.execute(referenced_key, {"key": key}).first() is not None
                    or is_tombstoned(conn, key))

    with _recovery_lock(archive.engine):
        remove_tombstoned(archive.blobs, archive.writer)
        with archive.engine.connect() as conn:
            known = set(
                conn.execute(select(instances.c.blob_key).where(instances.c.blob_key >= since))
                .scalars()
            ) | tombstoned_keys(conn)
        recovered = archive.ingest.recover_unindexed(known, SYSTEM, since, until, referenced)
    if recovered:
        log.warning("re-indexed %d stored instance(s) missing from the index", recovered)
    return recovered


def _recovery_grace(archive: Archive) -> float:
    """How old a blob must be before recovery judges it (0 on SQLite: one process writes)."""
    if archive.engine.dialect.name == "sqlite":
        return 0.0
    return archive.settings.recovery_grace_seconds


def _recover_job(archive: Archive, job: Job, params: dict[str, Any]) -> None:
    """The delayed part of start-up recovery (blobs too young to judge at the start); never
    blobs younger than the grace period now, whatever the job was given."""
    until = params.get("until", "")
    younger = key_prefix_for(time.time() - _recovery_grace(archive))
    if not until or younger < until:
        until = younger
    recovered = _recover_range(archive, params["since"], until)
    job.summary = f"{recovered} instance(s) re-indexed"


def recover(archive: Archive) -> int:
    """Clean partial writes and index blobs the index lost; returns how many were re-indexed.

    Only blobs made since the previous start are looked at (keys sort by the minute they were
    made; the index can only lose commits made after that start), so start-up stays quick on
    a large archive. The first start looks at everything.

    On a shared index (PostgreSQL, several instances) one instance recovers at a time (an
    advisory lock), and a blob younger than ``recovery_grace_seconds`` may still be on its way
    into the index from another instance: those are looked at by a job that runs once the
    grace period is over (on whichever instance takes it).
    """
    remove_leftovers(archive.settings.staging_dir, starting=True)
    clear = getattr(archive.blobs, "clear_partial_writes", None)
    if clear is not None:
        clear()
    mark_file = archive.settings.data_dir / "recovered-until"
    since = mark_file.read_text().strip() if mark_file.exists() else ""
    started = time.time()
    grace = _recovery_grace(archive)
    until = key_prefix_for(started - grace) if grace > 0 else ""
    if until and since and until < since:
        until = since
    recovered = _recover_range(archive, since, until)
    archive.inbox.release_unfinished()
    if until:
        archive.jobs.submit_once(
            f"recover:{until}:{archive.jobs.instance}", "recover",
            "Recovery of blobs written just before a start",
            # Every key made before this start (up to the end of its minute), once the
            # youngest of them is older than the grace period.
            {"since": until, "until": key_prefix_for(started + 60)}, delay=grace + 60)
    # One minute of margin: keys made during this start are looked at again next time.
    temporary = mark_file.with_suffix(".tmp")
    temporary.write_text(key_prefix_for(started - 60))
    fsync_file(temporary)
    os.replace(temporary, mark_file)
    return recovered


def configure_logging(settings: Settings, tag: str = "") -> None:
    """The one logging set-up (level from settings; libraries' chatter kept to warnings).
    A worker's lines carry its ``tag`` (replacing the set-up it inherited when forked)."""
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s", force=bool(tag),
    )
    for noisy in ("pynetdicom", "alembic", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom quotes the offending value when one does not fit its VR: that value may be a
    # name or an identifier, so the record keeps only that something did not fit.
    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, _ValuesNotLogged) for f in pydicom_log.filters):
        pydicom_log.addFilter(_ValuesNotLogged())
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


class _ValuesNotLogged(logging.Filter):
    """Replaces a pydicom record's text, which may quote a stored value, with a fixed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "a stored value does not fit its VR or encoding (value not logged)"
        record.args = ()
        return True


ADMIN_PASSWORD_FILE = "admin-password.txt"


def create_admin(archive: Archive, out: TextIO, interactive: bool) -> Path | None:
    """On first start, create the account ``admin`` (password IMAGESHARE_ADMIN_PASSWORD, else
    generated). A generated password is written to ``admin-password.txt`` in the data folder,
    readable only by the service's user (0600), whose path is printed; the password itself is
    printed only on a terminal (a console sent to a log would keep it). Returns the file."""
    generated = archive.users.ensure_admin(archive.settings.admin_password)
    if not generated:
        return None
    path = archive.settings.data_dir / ADMIN_PASSWORD_FILE
    path.unlink(missing_ok=True)  # a new file of our own, never one someone left there
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(generated + "\n")
    if interactive:
        print(f"Created user 'admin' with password: {generated}", file=out)
    else:
        print("Created user 'admin'.", file=out)
    print(f"The password is in {path.resolve()} (readable only by this user); sign in, change "
          "it, then delete the file.", file=out, flush=True)
    return path


def dicom_processes(settings: Settings) -> int:
    """How many processes share the DICOM port."""
    if settings.dicom_processes > 0:
        return settings.dicom_processes
    return max(1, min(2 * (os.cpu_count() or 1), 8))


def _make_listener(archive: Archive, shared_port: bool) -> Any:
    from imageshare.dicom.scp import DicomListener

    settings = archive.settings
    return DicomListener(
        settings.ae_title, settings.dicom_port or None,
        settings.dicom_host or settings.http_host,
        archive.ingest, archive.query, archive.retrieve, archive.nodes, archive.policy,
        max_associations=settings.max_associations, timeout=settings.dicom_timeout,
        max_pdu=settings.max_pdu_size, check_calling_host=settings.check_calling_host,
        check_called_ae=settings.check_called_ae,
        shared_port=shared_port, refusals=archive.refused_callers, arrivals=archive.arrivals,
        tls_port=settings.dicom_tls_port, ssl_context=dicom_server_context(settings),
        client_ssl_context=client_context(settings),
        proxy_protocol_from=settings.trusted_proxies if settings.dicom_proxy_protocol else "",
        retrievals=archive.exchange.retrieving_from,
        strict_hierarchy=settings.dicom_strict_hierarchy,
    )


def _port_in_use(host: str, port: int, what: str, exc: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"cannot listen for {what} on {host or '*'}:{port}: {exc.strerror or exc} (is another "
        "server running on this port?)")


def refuse_taken_port(host: str, port: int, what: str) -> None:
    """ConfigurationError when something else listens on ``port``: the processes of one
    server bind a shared port with SO_REUSEPORT, which would otherwise share it silently with
    another server run by the same user."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _port_in_use(host, port, what, exc) from exc


def http_socket(settings: Settings) -> socket.socket:
    """The listening socket on the HTTP address, bound as uvicorn binds it, from which every
    process of this server accepts (a new connection goes to the process that takes it
    first). Bound once, by the server's own process, as it starts: a port another server
    holds is refused ("address in use")."""
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.http_host, settings.http_port))
        sock.listen(2048)  # at once: another server binding the port now is refused
    except OSError as exc:
        sock.close()
        raise _port_in_use(settings.http_host, settings.http_port, "HTTP", exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def run_worker(settings: Settings, dicom: bool, sock: socket.socket | None, counts: Any,
               slot: int, ready: Any) -> None:
    """A further process of the server, until SIGTERM: it accepts DICOM associations on the
    shared port (``dicom``) and serves HTTP from the server's listening socket ``sock`` (if
    given; ``counts`` and ``slot``: its place in the table of connections each process
    holds), running background jobs too (queued by any process, so that a job started here
    begins at once). ``ready`` (an Event) is set once it serves. On SIGTERM, DICOM and HTTP
    drain at once, then the jobs, each within the grace."""
    import uvicorn

    from imageshare.web.balance import ConnectionShares
    from imageshare.web.server import create_app, http_server_config

    stop = threading.Event()  # a signal before uvicorn runs (or re-raised by it) ends here
    serving: list[uvicorn.Server] = []  # the HTTP server, once made

    def _stop(signum: int, frame: Any) -> None:
        stop.set()
        if serving:  # made, and perhaps about to run: it stops (at once if not started)
            serving[0].handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _stop)
    die_with_server()
    configure_logging(settings, "[worker]")
    grace = settings.shutdown_grace_seconds
    archive = build_archive(settings, upgrade=False)
    listener = _make_listener(archive, shared_port=True) if dicom else None
    draining = threading.Thread(target=listener.stop, args=(grace,), name="dicom-drain",
                                daemon=True) if listener is not None else None

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if draining is not None and draining.ident is None:
                draining.start()  # DICOM drains while HTTP does
            super().handle_exit(sig, frame)

    try:
        if listener is not None:
            listener.start()
        if sock is None:
            ready.set()
            # Woken now and then: a signal taken by another thread (an association's) only
            # flags its handler, which this thread runs once it wakes; a wait without a
            # timeout could then sleep through SIGTERM.
            while not stop.wait(0.5):
                pass
            return
        archive.jobs.start()
        if not stop.is_set():
            server = _Server(http_server_config(
                create_app(archive), settings, ConnectionShares(counts, slot)))
            serving.append(server)  # a signal from now on stops it, before or while it runs
            ready.set()
            if not stop.is_set():
                server.run(sockets=[sock])
    finally:
        if draining is not None:
            if draining.ident is None:
                draining.start()
            draining.join()
        if sock is not None:
            archive.stop_jobs(grace)
        archive.close()


# What the workers run, imported once by the process they are forked from
# (and then kept from its garbage collector, so that the pages stay shared).
WORKER_MODULES = ("imageshare.app", "imageshare.dicom.scp", "imageshare.web.server", "uvicorn",
                  "imageshare.worker_preload")


def http_processes(settings: Settings) -> int:
    """How many processes serve HTTP."""
    if settings.http_processes > 0:
        return settings.http_processes
    return max(1, min(os.cpu_count() or 1, 4))


def _workers(settings: Settings, dicom: int, sock: socket.socket | None,
             counts: Any) -> list[Worker]:
    """The server's further processes: ``dicom`` of them accept DICOM associations and, with
    ``sock``, ``http_processes - 1`` of them serve HTTP (``counts``: the table of connections
    each process holds; slot 0 is this process's); the first ones do both, so that a process
    is not started for each alone."""
    from imageshare.web.balance import GONE

    http = http_processes(settings) - 1 if sock is not None else 0
    found = []
    for number in range(max(dicom, http)):
        slot = number + 1
        serves_http = number < http
        serves = [kind for kind, on in (("DICOM", number < dicom), ("HTTP", serves_http)) if on]

        def forget(slot: int = slot) -> None:
            counts[slot] = 0  # the connections of a process that died closed with it

        def leave(slot: int = slot) -> None:
            counts[slot] = GONE  # the others share its part

        found.append(Worker(
            f"worker-{slot}", "+".join(serves), run_worker,
            (settings, number < dicom, sock if serves_http else None, counts, slot),
            on_restart=forget if serves_http else None,
            on_give_up=leave if serves_http else None))
    return found


def serve(settings: Settings) -> None:
    """Run HTTP and the DICOM listener until SIGINT/SIGTERM; further processes share the
    DICOM port (``dicom_processes``) so that concurrent associations use every core.

    On SIGTERM, SIGINT or SIGHUP no new association or request is taken; open ones get
    ``shutdown_grace_seconds`` to finish (then they are ended), running transfers stop between
    instances (resumed on the next start), the index is closed, and the process exits 0.
    """
    import uvicorn

    from imageshare.web.balance import ConnectionShares
    from imageshare.web.server import create_app, http_server_config

    stopping = threading.Event()
    serving: list[uvicorn.Server] = []  # the HTTP server, once made

    def _early_stop(signum: int, frame: Any) -> None:
        stopping.set()
        if serving:  # uvicorn takes SIGTERM and SIGINT while it runs, never SIGHUP: pass on
            serving[0].handle_exit(signum, frame)

    # From here on a signal asks for a clean stop (also while starting); SIGUSR1 writes
    # every thread's stack to the log (for an operator asking what a busy server is doing).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, _early_stop)
    signal.signal(signal.SIGINT, _early_stop)
    # A closed terminal (SIGHUP to the process group): drained, not cut off. The helper
    # process multiprocessing keeps (its resource tracker) is started now, with SIGHUP
    # ignored, which it keeps: else it dies, is started again and complains.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    resource_tracker.ensure_running()
    signal.signal(signal.SIGHUP, _early_stop)
    grace = settings.shutdown_grace_seconds
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    several = http_processes(settings) > 1 and bool(settings.http_port)
    dicom = bool(settings.dicom_port or settings.dicom_tls_port)
    workers = Workers(preload=WORKER_MODULES)
    if several or (dicom and dicom_processes(settings) > 1):
        # The process the workers are forked from starts first, while this one has a single
        # thread and holds no socket or database: as a fork of it, once what the workers run
        # is imported, they all share those modules' memory.
        for module in WORKER_MODULES:
            importlib.import_module(module)
        workers.prepare()
    # The shared HTTP socket is bound next: a port already taken stops the start here.
    sockets = [http_socket(settings)] if several else None  # every process accepts from it
    archive = build_archive(settings)
    create_admin(archive, sys.stdout, interactive=sys.stdout.isatty())
    for warning in shared_index_warnings(archive):
        log.warning("%s", warning)
    recover(archive)
    archive.transfers.resume_interrupted()
    _checkpoint(archive.engine)
    listener = None
    if dicom and not stopping.is_set():
        processes = dicom_processes(settings)
        if processes > 1:
            for port in (settings.dicom_port, settings.dicom_tls_port):
                if port:
                    refuse_taken_port(settings.dicom_host or settings.http_host, port, "DICOM")
        listener = _make_listener(archive, shared_port=processes > 1)
        listener.start()
        log.info("DICOM listener %s on port %s, TLS port %s (%d processes)",
                 settings.ae_title, listener.port, listener.tls_port or "none", processes)
    counts = workers.context.Array(
        "i", http_processes(settings), lock=False) if sockets else None
    if not stopping.is_set():
        workers.start(_workers(settings, dicom_processes(settings) - 1 if listener else 0,
                               sockets[0] if sockets else None, counts))
    archive.jobs.start()  # this instance runs jobs queued by any instance
    periodic = periodic_tasks(archive)
    periodic.start()
    head_export = _start_head_export(archive)
    staging_sweep = _start_staging_sweep(archive)
    atna = atna_sender(archive)
    if atna is not None:
        atna.start()

    def stop_dicom() -> None:
        """Drain DICOM and HTTP in every process at once: the workers on their SIGTERM, this
        one here."""
        workers.terminate()
        if listener is not None:
            listener.stop(grace)
        workers.join(grace)

    draining = threading.Thread(target=stop_dicom, name="dicom-drain")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not draining.is_alive() and draining.ident is None:
                draining.start()  # DICOM drains while HTTP does
            archive.transfers.close()
            super().handle_exit(sig, frame)

    app = create_app(archive)
    server = _Server(http_server_config(
        app, settings, ConnectionShares(counts, 0) if counts is not None else None))
    serving.append(server)  # a signal from now on also stops it, before or while it runs
    scheme = "https" if https_enabled(settings) else "http"
    tls = f", DICOM TLS port {settings.dicom_tls_port}" if settings.dicom_tls_port else ""
    print(
        f"ImageShare listening: {scheme}://{settings.http_host}:{settings.http_port}/ "
        f"and DICOM {settings.ae_title}@{settings.dicom_port}{tls}",
        file=sys.stderr, flush=True,
    )
    try:
        # Report healthy (this process's HTTP starts after) only once every worker is ready
        # to serve (an HTTP worker's connections wait in the shared socket meanwhile).
        workers.wait_ready(stopping)
        if not stopping.is_set():
            workers.supervise()
        if not stopping.is_set():
            server.run(sockets=sockets)
    finally:
        periodic.stop()
        head_export.set()
        staging_sweep.set()
        if atna is not None:
            atna.stop()
        if draining.ident is None:
            draining.start()
        archive.stop_jobs(grace)
        draining.join()
        archive.close()
        log.info("ImageShare stopped")
        print("ImageShare stopped", file=sys.stderr, flush=True)
