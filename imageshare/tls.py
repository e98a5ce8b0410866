"""TLS for every connection ImageShare makes or accepts: HTTPS, DICOM TLS (listener and SCU)
and DICOMweb sites, with the BCP 195 profile of DICOM PS3.15 Annex B.9 (TLS 1.2 or newer,
the AEAD cipher suites RFC 9325 recommends; TLS 1.3 suites are all AEAD).

The server's certificate and key (``tls_certificate``, ``tls_private_key``) serve HTTPS and
the DICOM TLS port and are shown as client certificate to remote DICOM TLS nodes; the
authorities in ``tls_ca_file`` are trusted for peers (DICOM TLS client certificates, remote
nodes, DICOMweb sites over https, besides the system's own). The revocation lists in
``tls_crl_file`` are checked for the client certificates of DICOM TLS peers, and read again
at the next handshake after the file changed (checked as at start; a file that fails the
check is not used and the lists before stay in force).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from imageshare.domain.errors import ConfigurationError
from imageshare.settings import Settings

log = logging.getLogger(__name__)

BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                        | ssl.OP_CIPHER_SERVER_PREFERENCE)
    return context


_ENCRYPTED_KEY = ("tls_private_key is encrypted with a pass phrase, which ImageShare cannot "
                  "be given: store the key unencrypted, readable by this service only")


def _no_pass_phrase() -> bytes:
    """The pass phrase given to OpenSSL for an encrypted key: none (never a prompt on the
    terminal, where a service would wait forever)."""
    raise ConfigurationError(_ENCRYPTED_KEY)


def _certificate_files(settings: Settings) -> None:
    """Refuse a certificate that is not (or no longer) valid now, and an encrypted key."""
    try:
        pem = Path(settings.tls_certificate).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"the TLS certificate cannot be used: tls_certificate cannot "
                                 f"be read ({exc.__class__.__name__})") from exc
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigurationError(
            "the TLS certificate cannot be used: tls_certificate is not a PEM certificate"
        ) from exc
    now = datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        raise ConfigurationError(
            f"tls_certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "peers would refuse it; install a renewed certificate")
    if certificate.not_valid_before_utc > now:
        raise ConfigurationError(
            f"tls_certificate is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    try:
        load_pem_private_key(Path(settings.tls_private_key).read_bytes(), password=None)
    except TypeError as exc:  # cryptography: a password was not given, the key is encrypted
        raise ConfigurationError(_ENCRYPTED_KEY) from exc
    except (ValueError, OSError):
        pass  # not PEM, or a key type cryptography does not read: load_cert_chain says why


def has_certificate(settings: Settings) -> bool:
    """True when this server has a certificate and key to offer."""
    return bool(settings.tls_certificate and settings.tls_private_key)


def https_enabled(settings: Settings) -> bool:
    """True when the HTTP server speaks HTTPS."""
    return settings.http_tls and has_certificate(settings)


def check_tls_settings(settings: Settings) -> None:
    """Refuse (:class:`ConfigurationError`) TLS settings that cannot work, before anything
    listens: half a certificate, unreadable files, a certificate expired or not yet valid, an
    encrypted key, a TLS port without a certificate, client certificates required without
    authorities to check them, a ``tls_ca_file`` without authorities."""
    if bool(settings.tls_certificate) != bool(settings.tls_private_key):
        raise ConfigurationError("set both tls_certificate and tls_private_key, or neither")
    for name in ("tls_certificate", "tls_private_key", "tls_ca_file", "tls_crl_file"):
        value = getattr(settings, name)
        if value and not Path(value).is_file():
            raise ConfigurationError(f"{name}: no such file {value}")
    if settings.dicom_tls_port and not has_certificate(settings):
        raise ConfigurationError("dicom_tls_port needs tls_certificate and tls_private_key")
    if (settings.dicom_tls_port and settings.dicom_tls_require_client_certificate
            and not settings.tls_ca_file):
        raise ConfigurationError(
            "dicom_tls_require_client_certificate needs tls_ca_file (the authorities that sign "
            "the peers' certificates); or set it to false")
    if settings.tls_crl_file:
        if not settings.tls_ca_file:
            raise ConfigurationError(
                "tls_crl_file needs tls_ca_file (the authorities whose revocation lists it "
                "holds)")
        _check_revocation_lists(Path(settings.tls_crl_file), Path(settings.tls_ca_file))
    if settings.tls_ca_file:
        try:
            ssl.create_default_context(cafile=settings.tls_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"tls_ca_file: no usable certificate authorities ({exc.__class__.__name__})"
            ) from exc
    if has_certificate(settings):
        _certificate_files(settings)
        try:
            server_context(settings, require_client_certificate=False)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"the TLS certificate or key cannot be used: {exc.__class__.__name__}") from exc


def server_context(settings: Settings, require_client_certificate: bool) -> ssl.SSLContext:
    """A BCP 195 server context with this server's certificate; with
    ``require_client_certificate`` peers must show a certificate signed by ``tls_ca_file``
    (and not revoked by a list in ``tls_crl_file``, when set)."""
    context = _plain_server_context(settings, require_client_certificate)
    if require_client_certificate and settings.tls_crl_file:
        _RevocationLists(settings).check_with(context)
    return context


def _plain_server_context(settings: Settings, require_client_certificate: bool
                          ) -> ssl.SSLContext:
    """:func:`server_context` without revocation lists."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key,
                            password=_no_pass_phrase)
    if settings.tls_ca_file:
        context.load_verify_locations(cafile=settings.tls_ca_file)
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        # No session tickets: a resumed session skips the client certificate's check, and
        # with it a revocation list renewed since the session began.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


# -- revocation lists ---------------------------------------------------------------------------

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
_CRL_END = b"-----END X509 CRL-----"


@dataclass(frozen=True)
class RevocationList:
    """One authority's list as read from ``tls_crl_file``."""

    issuer: str
    next_update: datetime.datetime | None
    crl: x509.CertificateRevocationList


def _issuer_name(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common[0].value) if common else name.rfc4514_string()


def read_revocation_lists(path: Path) -> list[RevocationList]:
    """The revocation lists in the PEM file ``path``; ConfigurationError if it cannot be read
    or holds none, or one of them is damaged."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"tls_crl_file cannot be read ({exc.__class__.__name__})"
                                 ) from exc
    return _parse_revocation_lists(data)


def _parse_revocation_lists(data: bytes) -> list[RevocationList]:
    """The revocation lists in PEM ``data`` (anything else there is passed over)."""
    lists: list[RevocationList] = []
    start = data.find(_CRL_BEGIN)
    while start >= 0:
        end = data.find(_CRL_END, start)
        if end < 0:
            raise ConfigurationError("tls_crl_file: a revocation list is cut short")
        try:
            crl = x509.load_pem_x509_crl(data[start:end + len(_CRL_END)])
        except ValueError as exc:
            raise ConfigurationError(
                f"tls_crl_file: revocation list {len(lists) + 1} is damaged") from exc
        lists.append(RevocationList(_issuer_name(crl.issuer), crl.next_update_utc, crl))
        start = data.find(_CRL_BEGIN, end)
    if not lists:
        raise ConfigurationError("tls_crl_file holds no revocation list (PEM, "
                                 "-----BEGIN X509 CRL-----)")
    return lists


def _in_time(entry: RevocationList, now: datetime.datetime) -> bool:
    return entry.next_update is None or entry.next_update >= now


def lists_in_force(lists: list[RevocationList]) -> list[RevocationList]:
    """The list of each authority that OpenSSL checks against: the newest one whose time is
    not over, else the newest one (an older list next to its renewal counts for nothing)."""
    now = datetime.datetime.now(datetime.UTC)
    chosen: dict[x509.Name, RevocationList] = {}
    for entry in lists:
        known = chosen.get(entry.crl.issuer)
        if (known is None or (_in_time(entry, now), entry.crl.last_update_utc)
                > (_in_time(known, now), known.crl.last_update_utc)):
            chosen[entry.crl.issuer] = entry
    return list(chosen.values())


def _authorities(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []  # refused with its own reason by check_tls_settings


def _check_revocation_lists(path: Path, authorities_file: Path) -> None:
    """Refuse a revocation list that no authority in ``tls_ca_file`` signed, or an authority
    whose lists' time is all over: with it, every peer of that authority would be refused."""
    _judge_revocation_lists(read_revocation_lists(path), _authorities(authorities_file))


def _judge_revocation_lists(lists: list[RevocationList],
                            authorities: list[x509.Certificate]) -> None:
    """:func:`_check_revocation_lists` for lists already read."""
    for entry in lists:
        signers = [a for a in authorities if a.subject == entry.crl.issuer]
        if not any(_signed_by(entry.crl, a) for a in signers):
            raise ConfigurationError(
                f"tls_crl_file: the revocation list of {entry.issuer!r} is not signed by an "
                "authority in tls_ca_file")
    now = datetime.datetime.now(datetime.UTC)
    for entry in lists_in_force(lists):
        if not _in_time(entry, now):
            raise ConfigurationError(
                f"tls_crl_file: the revocation list of {entry.issuer!r} was due to be renewed "
                f"on {entry.next_update:%Y-%m-%d %H:%M} UTC; DICOM TLS peers of that "
                "authority would all be refused: install its current list")


def _signed_by(crl: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(authority.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


class _RevocationLists:
    """The revocation lists client certificates are checked against, kept current: at the
    first handshake after ``tls_crl_file`` changed, its lists are checked as at start (signed
    by an authority in ``tls_ca_file``, time not over) and, if fine, a new server context with
    only them is built and shakes hands from then on (the lists read before are gone with the
    old one); if not, that is said in the log and the lists read before stay in force. A list
    whose time runs out while in force makes OpenSSL refuse that authority's peers; that is
    said in the log, once per list."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.tls_crl_file)
        self._stamp: tuple[int, int, int] | None = None
        self._context: ssl.SSLContext | None = None
        self._due: list[RevocationList] = []
        self._said_over: set[tuple[str, datetime.datetime]] = set()
        self._lock = threading.Lock()

    def check_with(self, context: ssl.SSLContext) -> None:
        """Check the client certificates of handshakes begun with ``context`` against the
        lists (ConfigurationError if they cannot be used now)."""
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        stamp = _file_stamp(self.path)
        lists = read_revocation_lists(self.path)
        _judge_revocation_lists(lists, _authorities(Path(self.settings.tls_ca_file)))
        _load_revocation_lists(context, lists)
        self._stamp, self._context, self._due = stamp, context, lists_in_force(lists)
        log.info("tls_crl_file: revocation lists of %d authorities in force", len(self._due))
        context.sni_callback = self._at_handshake

    def _at_handshake(self, ssl_socket: ssl.SSLSocket | ssl.SSLObject,
                      _server_name: str | None,
                      _context: ssl.SSLContext) -> None:
        current = self._current()
        if ssl_socket.context is not current:
            ssl_socket.context = current
        now = datetime.datetime.now(datetime.UTC)
        for entry in self._due:
            if entry.next_update is not None and entry.next_update < now:
                said = (entry.issuer, entry.next_update)
                if said not in self._said_over:
                    self._said_over.add(said)
                    log.error("tls_crl_file: the revocation list of %r was due to be renewed "
                              "on %s UTC; DICOM TLS peers of that authority are refused "
                              "until its current list is in tls_crl_file", entry.issuer,
                              f"{entry.next_update:%Y-%m-%d %H:%M}")

    def _current(self) -> ssl.SSLContext:
        """The context with the lists in force, after reading the file again if it changed."""
        stamp = _file_stamp(self.path)
        with self._lock:
            assert self._context is not None  # set by check_with
            if stamp is None or stamp == self._stamp:
                return self._context
            self._stamp = stamp
            try:
                lists = read_revocation_lists(self.path)
                _judge_revocation_lists(lists, _authorities(Path(self.settings.tls_ca_file)))
                context = _plain_server_context(self.settings, require_client_certificate=True)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
                _load_revocation_lists(context, lists)
            except (ConfigurationError, ssl.SSLError, OSError) as exc:
                log.warning("tls_crl_file changed but is not used (%s); the revocation lists "
                            "read before stay in force", exc)
                return self._context
            self._context, self._due = context, lists_in_force(lists)
            log.info("tls_crl_file changed: revocation lists of %d authorities in force",
                     len(self._due))
            return context


def _load_revocation_lists(context: ssl.SSLContext, lists: list[RevocationList]) -> None:
    """Load ``lists`` into ``context``, and nothing else: a certificate that is in
    ``tls_crl_file`` too does not become a trusted authority."""
    with tempfile.NamedTemporaryFile(suffix=".pem") as only_lists:
        for entry in lists:
            only_lists.write(entry.crl.public_bytes(serialization.Encoding.PEM))
        only_lists.flush()
        context.load_verify_locations(cafile=only_lists.name)


def dicom_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the DICOM TLS listener, or None when there is none."""
    if not settings.dicom_tls_port:
        return None
    return server_context(settings, settings.dicom_tls_require_client_certificate)


def client_context(settings: Settings) -> ssl.SSLContext:
    """A BCP 195 client context: the peer's certificate is checked against the system's
    authorities and ``tls_ca_file`` (and its name against the address used); this server's
    certificate is shown when the peer asks for one."""
    context = _bcp195(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if settings.tls_ca_file:
        context.load_verify_locations(cafile=settings.tls_ca_file)
    if has_certificate(settings):
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key,
                                password=_no_pass_phrase)
    return context


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


EXPIRY_WARNING_DAYS = 14


def exposure_warnings(settings: Settings) -> list[str]:
    """What listens beyond this machine without TLS, a private key others can read, a
    certificate that expires within :data:`EXPIRY_WARNING_DAYS` and a revocation list due
    within a day (said at start)."""
    warnings = []
    if not _loopback(settings.http_host) and not https_enabled(settings):
        warnings.append(
            f"HTTP listens on {settings.http_host or 'every address'} without TLS: passwords "
            "and patient data cross the network in clear. Set tls_certificate and "
            "tls_private_key, or listen on 127.0.0.1 behind a TLS proxy.")
    dicom_host = settings.dicom_host or settings.http_host
    if settings.dicom_port and not _loopback(dicom_host):
        warnings.append(
            f"DICOM listens on {dicom_host or 'every address'} port {settings.dicom_port} "
            "without TLS: patient data cross the network in clear. Use dicom_tls_port (DICOM "
            "TLS) for peers outside a trusted network.")
    if settings.tls_private_key:
        try:
            mode = Path(settings.tls_private_key).stat().st_mode
        except OSError:
            mode = 0
        if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
            warnings.append(
                "tls_private_key can be read or changed by other users of this machine: "
                "make it readable by this service only (chmod 600).")
    if settings.tls_crl_file:
        warnings.extend(_revocation_warnings(settings))
    if settings.tls_certificate:
        try:
            ends = x509.load_pem_x509_certificate(
                Path(settings.tls_certificate).read_bytes()).not_valid_after_utc
        except (ValueError, OSError):  # refused by check_tls_settings
            return warnings
        left = ends - datetime.datetime.now(datetime.UTC)
        if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            warnings.append(
                f"tls_certificate expires on {ends:%Y-%m-%d %H:%M} UTC: renew it before "
                "then, or HTTPS and DICOM TLS peers will refuse this server.")
    return warnings


def _revocation_warnings(settings: Settings) -> list[str]:
    """A list in force due within a day; an authority in ``tls_ca_file`` with no list in
    ``tls_crl_file`` (when client certificates are checked against it)."""
    try:
        lists = lists_in_force(read_revocation_lists(Path(settings.tls_crl_file)))
    except ConfigurationError:  # refused by check_tls_settings
        return []
    warnings = []
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    for entry in lists:
        if entry.next_update is not None and entry.next_update < soon:
            warnings.append(
                f"tls_crl_file: the revocation list of {entry.issuer!r} is due to be "
                f"renewed on {entry.next_update:%Y-%m-%d %H:%M} UTC; DICOM TLS peers of "
                "that authority are refused from then until its current list is there.")
    if settings.dicom_tls_port and settings.dicom_tls_require_client_certificate:
        listed = {entry.crl.issuer for entry in lists}
        for authority in _authorities(Path(settings.tls_ca_file)):
            if authority.subject not in listed:
                warnings.append(
                    f"tls_crl_file holds no revocation list of the authority "
                    f"{authority.subject.rfc4514_string()!r} in tls_ca_file: DICOM TLS peers "
                    "whose certificates it signs are all refused. Add its list to "
                    "tls_crl_file, or take it out of tls_ca_file if it signs no DICOM peer.")
    return warnings


def certificate_file_fingerprint(path: Path) -> str:
    """SHA-256 (lowercase hex) of the certificate in ``path`` (PEM or DER): what a node's
    pinned certificate is registered as. ConfigurationError if it holds no certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        certificate = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                       else x509.load_der_x509_certificate(data))
    except ValueError as exc:
        raise ConfigurationError(f"{path} holds no certificate (PEM or DER)") from exc
    return certificate.fingerprint(hashes.SHA256()).hex()
