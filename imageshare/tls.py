"""TLS for every connection ImageShare makes or accepts: HTTPS, DICOM TLS (listener and SCU)
and DICOMweb sites, with the BCP 195 profile of DICOM PS3.15 Annex B.9 (TLS 1.2 or newer,
the AEAD cipher suites RFC 9325 recommends; TLS 1.3 suites are all AEAD).

The server's certificate and key (``tls_certificate``, ``tls_private_key``) serve HTTPS and
the DICOM TLS port and are shown as client certificate to remote DICOM TLS nodes; the
authorities in ``tls_ca_file`` are trusted for peers (DICOM TLS client certificates, remote
nodes, DICOMweb sites over https, besides the system's own).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from imageshare.domain.errors import ConfigurationError
from imageshare.settings import Settings

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
    for name in ("tls_certificate", "tls_private_key", "tls_ca_file"):
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
    ``require_client_certificate`` peers must show a certificate signed by ``tls_ca_file``."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key,
                            password=_no_pass_phrase)
    if settings.tls_ca_file:
        context.load_verify_locations(cafile=settings.tls_ca_file)
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


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
    """What listens beyond this machine without TLS, a private key others can read, and a
    certificate that expires within :data:`EXPIRY_WARNING_DAYS` (said at start)."""
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
