"""The one Settings object: embedded defaults, an optional TOML file, ``IMAGESHARE_*`` variables.

Precedence, lowest first: defaults, the file named by ``IMAGESHARE_CONFIG`` (or ``--config``),
environment variables, command-line options.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from imageshare.domain.errors import ConfigurationError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SqliteSynchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
SmtpSecurity = Literal["none", "starttls", "ssl"]
PatientMismatch = Literal["refuse", "hold"]


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best here
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Every option of ImageShare with its default; see :func:`load_settings`."""

    data_dir: Path = _setting(Path("./var"), "Folder for the database, blobs and staging files.")
    http_host: str = _setting("127.0.0.1", "Address the HTTP server listens on.")
    http_port: int = _setting(8000, "Port of the HTTP server (web app, /api, /dicomweb).")
    dicom_port: int = _setting(11112, "Port of the DICOM listener (0 disables it).")
    dicom_host: str = _setting("", "Address the DICOM listener binds to; empty: as http_host.")
    ae_title: str = _setting("IMAGESHARE", "Application Entity title of the DICOM listener.")
    database_url: str = _setting(
        "", "SQLAlchemy URL of the index; empty means SQLite file index.sqlite in the data dir."
    )
    storage_url: str = _setting(
        "", "Blob store URL: empty means the folder blobs/ in the data dir (file:///path also); "
        "s3://BUCKET/PREFIX an S3-compatible object store (credentials and region from "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."
    )
    encrypt_blobs: bool = _setting(
        False, "Encrypt every blob written from now on (AES-256-GCM in 64 KiB chunks, a key per "
        "blob derived from the secret key, which is kept apart from the data: back it up "
        "separately, without it the images cannot be read). Blobs written before stay "
        "readable; keep it on once on."
    )
    encrypted_blobs_only: bool = _setting(
        False, "Serve encrypted blobs only (needs encrypt_blobs): a blob without the "
        "encryption header is refused as planted by someone who can write the store. Run "
        "imageshare storage seal first: it seals the blobs written before encryption."
    )
    retired_secret_keys: str = _setting(
        "", "Earlier values of secret_key, comma-separated, after a key rotation: blobs "
        "sealed under them are still read, and imageshare storage seal seals them again "
        "under the current key; remove them once it reports nothing left (never logged)."
    )
    retired_secret_keys_file: str = _setting(
        "", "File of earlier secret keys, one a line (# starts a comment), readable by the "
        "owner only: e.g. the old secret-key file's content, as retired_secret_keys."
    )
    s3_endpoint_url: str = _setting(
        "", "Endpoint of the S3-compatible object store (e.g. http://127.0.0.1:8333); empty: "
        "AWS S3."
    )
    admin_password: str = _setting(
        "", "Password of the admin account created on first start; generated if empty."
    )
    overwrite_instances: bool = _setting(
        False, "Replace a stored instance when the same SOP Instance UID arrives with new content."
    )
    store_from_any_ae: bool = _setting(
        False, "Accept C-STORE from any calling AE title (not only registered nodes); "
        "refused callers are listed for administrators either way."
    )
    check_called_ae: bool = _setting(
        True, "Refuse an association whose called AE title is not this server's ae_title "
        "(A-ASSOCIATE-RJ 'called AE title not recognised'): a scanner set up for another "
        "archive on this host does not store here by mistake; refusals are listed for "
        "administrators."
    )
    check_calling_host: bool = _setting(
        True, "Serve a registered AE title only from its registered host (a call from "
        "elsewhere is refused and audited as a spoofing attempt)."
    )
    patient_mismatch: PatientMismatch = _setting(
        "refuse", "An instance whose Patient ID is on record with another name or birth date: "
        "'refuse' it with the reason, or 'hold' it in the inbox for reconciliation. The "
        "patient's record is never changed by it."
    )
    min_free_disk_mb: int = _setting(
        500, "Free space (MB) below which stores are refused as out of resources (DIMSE "
        "A700, STOW-RS 507) before the disk is full; 0: no floor."
    )
    shutdown_grace_seconds: float = _setting(
        20.0, "On SIGTERM/SIGINT, seconds to let open associations and HTTP requests finish "
        "before they are ended."
    )
    max_associations: int = _setting(32, "Most DICOM associations served at once.")
    dicom_processes: int = _setting(
        0, "Processes sharing the DICOM port, so that concurrent associations use every "
        "core (0: two per core, at most 8); the first ones serve HTTP too (http_processes), "
        "and an idle one uses about 40 MB."
    )
    http_processes: int = _setting(
        0, "Processes serving HTTP from its one port, so that large uploads and busy APIs use "
        "more than one core (0: one per core, at most 4); connections are spread evenly "
        "over them, and each runs job_workers background jobs too. A process serves the "
        "DICOM port as well where dicom_processes asks for one (about 70 MB each while an "
        "upload arrives: the processes share the modules' memory)."
    )
    dicom_timeout: float = _setting(60.0, "Seconds a DICOM association may stay silent.")
    dicom_strict_hierarchy: bool = _setting(
        False, "Refuse (A900, naming the key) a C-FIND, C-MOVE or C-GET that leaves out the "
        "unique key of a level above its own, or gives it as a wildcard or a list (PS3.4 "
        "C.4.1.2.1 hierarchical rules), unless relational queries or retrieval were "
        "negotiated; off: such a request is answered as a relational one (as Orthanc does), "
        "since findscu and many scripts cannot negotiate the option."
    )
    max_pdu_size: int = _setting(262144, "Largest PDU the DICOM listener accepts (bytes).")
    cors_origins: str = _setting(
        "", "Comma-separated origins allowed to call /dicomweb from a browser (e.g. an OHIF host)."
    )
    qido_max_limit: int = _setting(1000, "Most results one QIDO-RS or C-FIND answer returns.")
    log_level: LogLevel = _setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.")
    sqlite_synchronous: SqliteSynchronous = _setting(
        "NORMAL",
        "SQLite synchronous mode. NORMAL is safe for acknowledged stores because blobs are "
        "fsynced and re-indexed on start; FULL also fsyncs every index commit.",
    )
    deid_secret: str = _setting(
        "", "Secret for consistent pseudonyms, UIDs and date shifts of de-identified data; "
        "empty: a random one kept in the data dir (file deid-secret)."
    )
    deid_profiles_file: str = _setting(
        "", "TOML file adding or redefining named de-identification profiles."
    )
    deid_regions_file: str = _setting(
        "", "TOML file of burned-in text regions per machine; empty: the shipped defaults."
    )
    public_url: str = _setting(
        "", "Address people use to reach ImageShare (e.g. https://images.example.nhs.uk), for "
        "links in e-mails and URLs in DICOMweb and FHIR answers; empty: DICOMweb and FHIR "
        "answers use the request's Host only when it names this server, else "
        "http_host:http_port, and e-mails "
        "with links are refused (they never take their address from a request's Host "
        "header)."
    )
    fhir_hospital_number_system: str = _setting(
        "urn:imageshare:hospital-number", "FHIR identifier system of this hospital's patient "
        "numbers (the DICOM Patient ID) in ImagingStudy.subject and patient.identifier "
        "searches, e.g. https://fhir.example-trust.nhs.uk/Id/hospital-number."
    )
    iid_launch_max_seconds: int = _setting(
        300, "Longest validity of a signed EHR launch URL (/iid): a URL expiring later is "
        "refused."
    )
    share_default_days: int = _setting(30, "Days a share link stays valid unless chosen.")
    share_max_days: int = _setting(90, "Longest validity a share link may be given (days).")
    upload_max_mb: int = _setting(
        4096, "Size limit of one invitation to upload (all its files, in MB) unless staff "
        "choose a smaller one; staff may choose up to 16 times this."
    )
    upload_max_days: int = _setting(
        30, "Longest validity of an invitation to upload (days)."
    )
    upload_chunk_bytes: int = _setting(
        64 << 20, "Largest chunk of a resumable upload (one tus PATCH request body, bytes); "
        "the browser sends 8 MB chunks."
    )
    upload_zip_max_ratio: int = _setting(
        200, "A zip file in an upload is refused as a zip bomb when a member, or the whole "
        "zip, expands more than this many times its compressed size (or all members to "
        "more than 8 GB)."
    )
    exchange_timeout: float = _setting(
        10.0, "Seconds a connected site may take to answer a federated search."
    )
    push_retry_seconds: str = _setting(
        "2,10,30", "Pauses (seconds, comma-separated) before each retry of a failed push."
    )
    exchange_team_email: str = _setting(
        "", "E-mail address of the team that receives studies from other sites (e.g. the "
        "radiology department's shared mailbox): urgent arrivals in the inbox are announced "
        "to it (sender, priority and a link; no patient details); empty: only in the app."
    )
    temporary_days: int = _setting(
        30, "Days copies retrieved from other sites and inbox items are kept unless accepted."
    )
    clinical_retention_years: int = _setting(
        8, "Clinical images are kept at least this many years after the patient's latest "
        "study (and see clinical_retention_until_age); only two administrators delete them."
    )
    clinical_retention_until_age: int = _setting(
        25, "Clinical images of a patient are kept at least until this birthday (children's "
        "records); with the birth date unknown, this many years after the latest study."
    )
    upload_retention_days: int = _setting(
        30, "Days patient and partner uploads are kept after their quality review."
    )
    job_workers: int = _setting(
        2, "Background jobs (exports, retrievals, pushes, share preparation) each instance "
        "runs at once; the jobs themselves are kept in the index and shared by instances."
    )
    job_lease_seconds: float = _setting(
        60.0, "Seconds a running job stays leased to its instance without a heartbeat; after "
        "that (the instance died) another instance runs it again."
    )
    job_retry_seconds: str = _setting(
        "10,60,300", "Pauses (seconds, comma-separated) before each retry of a failed "
        "background job; a job fails for good after the last."
    )
    job_max_run_seconds: float = _setting(
        86400.0, "A background job still running after this many seconds (a backup or export "
        "that hangs) is stopped at its next progress point and fails with the reason."
    )
    retention_every_seconds: float = _setting(
        86400.0, "How often the retention task (deleting what its retention class lets go: "
        "temporary copies, unaccepted inbox items, reviewed uploads, copies no case holds) "
        "runs by itself, once across all instances; 0: only by command."
    )
    share_notices_every_seconds: float = _setting(
        3600.0, "How often owners are told about share links about to expire (and finished "
        "jobs older than a day are removed), once across all instances; 0: never."
    )
    recovery_grace_seconds: float = _setting(
        120.0, "On a shared (non-SQLite) index, blobs younger than this are left to the "
        "instance writing them; start-up recovery looks at them later, in a background job."
    )
    link_by_name_and_birth_date: bool = _setting(
        False, "Attach a remote study to a local patient by name and date of birth when it has "
        "no NHS number (otherwise only by NHS number)."
    )
    smtp_host: str = _setting("", "SMTP server for e-mail notifications; empty: no e-mail.")
    smtp_port: int = _setting(25, "SMTP port.")
    smtp_tls: SmtpSecurity = _setting("none", "SMTP security: none, starttls or ssl.")
    smtp_user: str = _setting("", "SMTP user name (empty: no login); needs smtp_tls starttls "
                              "or ssl unless the server is on this machine.")
    smtp_password: str = _setting("", "SMTP password.")
    mail_sender: str = _setting("imageshare@localhost", "From address of e-mails.")
    max_decoded_frame_bytes: int = _setting(
        256 << 20, "Most bytes one frame may take once decoded (rows × columns × samples × "
        "bytes per sample); larger images are refused at ingest and never decoded."
    )
    max_decoded_instance_bytes: int = _setting(
        2 << 30, "Most bytes all frames of one instance may take once decoded; larger "
        "instances are refused at ingest and never decoded."
    )
    max_concurrent_decodes: int = _setting(
        0, "Images decoded at once per process (rendering, frames, exports, "
        "de-identification); others wait (0: one per core, at least two)."
    )
    stow_max_bytes: int = _setting(
        4 << 30, "Largest STOW-RS request body (bytes); larger ones are answered 413 before "
        "more is read."
    )
    stow_max_parts: int = _setting(10000, "Most parts (instances) in one STOW-RS request.")
    max_upload_bytes: int = _setting(
        1 << 30, "Largest other upload (multipart/form-data, e.g. attached reports) in bytes."
    )
    max_body_bytes: int = _setting(
        1 << 20, "Largest body of any other request (JSON, forms) in bytes."
    )
    tls_certificate: str = _setting(
        "", "PEM file with this server's certificate (and chain), for HTTPS and DICOM TLS."
    )
    tls_private_key: str = _setting("", "PEM file with the private key of tls_certificate.")
    tls_ca_file: str = _setting(
        "", "PEM file of the certificate authorities trusted for peers: DICOM TLS client "
        "certificates, remote DICOM TLS nodes and DICOMweb sites over https (besides the "
        "system's own)."
    )
    tls_crl_file: str = _setting(
        "", "PEM file of the certificate revocation lists of the authorities in tls_ca_file: "
        "a DICOM TLS peer whose client certificate is revoked is refused (each authority that "
        "signs peers needs its current list here; used when client certificates are required). "
        "Read again when the file changes, and checked as at start before it counts."
    )
    dicom_proxy_protocol: bool = _setting(
        False, "The DICOM ports sit behind a TCP load balancer sending the PROXY protocol "
        "(HAProxy send-proxy / send-proxy-v2) from the trusted_proxies addresses: each "
        "association is checked and audited as coming from the balancer's client."
    )
    trusted_proxies: str = _setting(
        "127.0.0.1", "Addresses (comma-separated) of load balancers or proxies whose "
        "X-Forwarded-For / X-Forwarded-Proto (and, with dicom_proxy_protocol, PROXY protocol "
        "headers) name the caller; nobody else's are believed."
    )
    http_tls: bool = _setting(
        True, "Serve HTTPS (only) when tls_certificate and tls_private_key are set; false: "
        "plain HTTP, e.g. behind a TLS-terminating proxy."
    )
    dicom_tls_port: int = _setting(
        0, "Port of the DICOM TLS listener (BCP 195 profile; needs tls_certificate and "
        "tls_private_key); 0: none."
    )
    dicom_tls_require_client_certificate: bool = _setting(
        True, "DICOM TLS peers must present a certificate signed by an authority in "
        "tls_ca_file."
    )
    secret_key: str = _setting(
        "", "Key that encrypts secrets kept in the database (TOTP secrets, site "
        "credentials): a Fernet key (32 url-safe base64 bytes); empty: the key in "
        "secret_key_file. Several instances sharing one database need the same key."
    )
    secret_key_file: str = _setting(
        "", "File holding the key that encrypts secrets in the database (made on first "
        "start, readable by the owner only); empty: secret-key in the data dir."
    )
    audit_head_file: str = _setting(
        "", "File the signed head of the audit hash chain is appended to (HMAC with a key "
        "derived from the installation key); keep it off the data disk, e.g. on write-once "
        "or remote storage; empty: audit-heads.jsonl in the data dir."
    )
    audit_head_interval_seconds: float = _setting(
        3600.0, "How often the server exports the signed audit chain head (0: only on "
        "demand, imageshare audit head)."
    )
    audit_view_window_seconds: float = _setting(
        300.0, "A viewing is one audit event: a study's frames, renderings and thumbnails "
        "fetched again by the same user from the same address within this many seconds are "
        "not recorded again (0: one event per request). Whole instances, metadata, "
        "refusals and failures are recorded every time."
    )
    atna_host: str = _setting(
        "", "Audit repository (IHE ATNA) host: every audit event is also sent there as a "
        "DICOM PS3.15 A.5 audit message in RFC 5424 syslog over TLS (RFC 5425); empty: not "
        "sent. Events wait in the audit trail while it is unreachable."
    )
    atna_port: int = _setting(6514, "Port of the audit repository's syslog-over-TLS listener.")
    atna_ca_file: str = _setting(
        "", "PEM authorities that sign the audit repository's certificate; empty: the "
        "system's."
    )
    atna_client_certificate: str = _setting(
        "", "PEM certificate ImageShare presents to the audit repository (empty: none)."
    )
    atna_client_private_key: str = _setting(
        "", "PEM private key of atna_client_certificate (empty: in the certificate file)."
    )
    atna_audit_source_id: str = _setting(
        "", "AuditSourceID in the audit messages; empty: the AE title."
    )
    atna_enterprise_site_id: str = _setting(
        "", "AuditEnterpriseSiteID in the audit messages (e.g. the trust's ODS code)."
    )
    pg_bin_dir: str = _setting(
        "", "Folder of pg_dump and pg_restore for backups of a PostgreSQL index; empty: the "
        "newest Debian PostgreSQL's, else PATH."
    )

    def __post_init__(self) -> None:
        """Check every value at load: a setting with a list of choices has one of them, a
        number is finite and 0 or more (a retention period 1 or more), the retry schedules
        are parsed (once)."""
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                raise ConfigurationError(
                    f"setting {name} is one of {', '.join(choices)}, not "
                    f"{getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            least = _AT_LEAST.get(f.name, 0)
            if not value >= least or value == float("inf"):
                raise ConfigurationError(
                    f"setting {f.name} is a number of {least} or more, not {value!r}")
        if self.encrypted_blobs_only and not self.encrypt_blobs:
            raise ConfigurationError(
                "encrypted_blobs_only needs encrypt_blobs: a store that does not encrypt "
                "cannot serve encrypted blobs only")
        if self.smtp_user and self.smtp_tls == "none" and not _loopback(self.smtp_host):
            raise ConfigurationError(
                "smtp_user with smtp_tls none would send the mail password in clear text to "
                f"{self.smtp_host}: set smtp_tls to starttls or ssl (or relay through a mail "
                "server on this machine)")
        object.__setattr__(self, "_push_retry",
                           _schedule(self.push_retry_seconds, "push_retry_seconds"))
        object.__setattr__(self, "_job_retry",
                           _schedule(self.job_retry_seconds, "job_retry_seconds"))

    @property
    def push_retry_schedule(self) -> tuple[float, ...]:
        """Seconds to wait before each retry of a failed push (``push_retry_seconds``)."""
        schedule: tuple[float, ...] = getattr(self, "_push_retry")  # noqa: B009 - set above
        return schedule

    @property
    def job_retry_schedule(self) -> tuple[float, ...]:
        """Seconds to wait before each retry of a failed background job
        (``job_retry_seconds``)."""
        schedule: tuple[float, ...] = getattr(self, "_job_retry")  # noqa: B009 - set above
        return schedule

    @property
    def resolved_database_url(self) -> str:
        """The index URL, defaulting to SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def resolved_audit_head_file(self) -> Path:
        """Where signed audit chain heads are appended."""
        return Path(self.audit_head_file) if self.audit_head_file else (
            self.data_dir / "audit-heads.jsonl")

    @property
    def resolved_storage_url(self) -> str:
        """The blob store URL, defaulting to the blobs folder in the data dir."""
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "blobs").resolve().as_uri()

    @property
    def staging_dir(self) -> Path:
        """Local folder where incoming bytes are written before they are stored."""
        return self.data_dir / "staging"

    @property
    def quarantine_dir(self) -> Path:
        """Where start-up recovery puts blobs it could not store again, with the reason."""
        return self.data_dir / "quarantine"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (values are converted like environment values)."""
        return dataclasses.replace(self, **_convert_all(changes))


# Numbers with a floor above 0: a retention period of 0 (or less) would let the retention
# task delete on the day of arrival what the hospital meant to keep.
_AT_LEAST = {"temporary_days": 1, "upload_retention_days": 1, "job_max_run_seconds": 60}


def _choices() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a list of values (typed as a Literal), with the list."""
    hints = get_type_hints(Settings)
    return {name: get_args(hint) for name, hint in hints.items()
            if get_origin(hint) is Literal}


def _loopback(host: str) -> bool:
    """Whether ``host`` names this machine (a name or address of the loopback interface)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _schedule(text: str, name: str) -> tuple[float, ...]:
    try:
        pauses = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigurationError(
            f"setting {name} is a comma-separated list of seconds") from exc
    if any(p < 0 or p != p for p in pauses):
        raise ConfigurationError(f"setting {name} lists seconds of 0 or more")
    return pauses


def setting_docs() -> list[tuple[str, str, Any, str]]:
    """(name, environment variable, default, help) for every setting, for docs and --help."""
    return [
        (f.name, env_name(f.name), f.default, f.metadata["help"]) for f in fields(Settings)
    ]


def env_name(name: str) -> str:
    """The environment variable that sets the setting ``name``."""
    return "IMAGESHARE_" + name.upper()


def _convert(name: str, value: Any) -> Any:
    kind = {f.name: f for f in fields(Settings)}.get(name)
    if kind is None:
        raise ConfigurationError(f"unknown setting {name!r}")
    default = kind.default
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, Path):
            return Path(value)
        choices = _choices().get(name)
        if choices is not None:  # the choice as declared, whatever its case
            text = str(value).strip()
            return next((c for c in choices if c.lower() == text.lower()), text)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"setting {name} has an invalid value {value!r}") from exc


def _convert_all(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _convert(k, v) for k, v in values.items()}


def load_settings(
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build Settings from defaults, the config file, IMAGESHARE_* variables and overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env["IMAGESHARE_CONFIG"]) if env.get("IMAGESHARE_CONFIG") else None)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read configuration file {path}: {exc}") from exc
        values.update(data.get("imageshare", data))
    for f in fields(Settings):
        if env_name(f.name) in env:
            values[f.name] = env[env_name(f.name)]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings(**_convert_all(values))
