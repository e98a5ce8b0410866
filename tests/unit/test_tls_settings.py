"""TLS settings: unusable ones are refused at start with the reason; listening beyond loopback
without TLS is warned about."""

from __future__ import annotations

import pytest

from imageshare.domain.errors import ConfigurationError
from imageshare.settings import load_settings
from imageshare.tls import exposure_warnings
from tests.conftest import make_archive


def test_unusable_tls_settings_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigurationError, match="both tls_certificate and tls_private_key"):
        make_archive(tmp_path, tls_certificate=str(tmp_path / "server.crt"))
    with pytest.raises(ConfigurationError, match="no such file"):
        make_archive(tmp_path, tls_certificate=str(tmp_path / "a.crt"),
                     tls_private_key=str(tmp_path / "a.key"))
    with pytest.raises(ConfigurationError, match="dicom_tls_port needs"):
        make_archive(tmp_path, dicom_tls_port=2762)
    (tmp_path / "a.crt").write_text("not a certificate")
    (tmp_path / "a.key").write_text("not a key")
    with pytest.raises(ConfigurationError, match="cannot be used"):
        make_archive(tmp_path, tls_certificate=str(tmp_path / "a.crt"),
                     tls_private_key=str(tmp_path / "a.key"))


def test_listening_beyond_loopback_without_tls_is_warned_about():
    def warnings(**values):
        return exposure_warnings(load_settings(values, environ={}))

    assert warnings() == []  # the defaults listen on loopback only
    assert warnings(http_host="::1", dicom_host="localhost") == []
    (http, dicom) = warnings(http_host="0.0.0.0")
    assert http.startswith("HTTP listens on 0.0.0.0 without TLS")
    assert dicom.startswith("DICOM listens on 0.0.0.0 port 11112 without TLS")
    (only,) = warnings(dicom_host="::")
    assert only.startswith("DICOM listens on :: port 11112")
    assert warnings(http_host="0.0.0.0", dicom_host="127.0.0.1", dicom_port=0) == [http]


def test_a_mail_password_is_never_sent_in_clear_text_beyond_this_machine(tmp_path):
    with pytest.raises(ConfigurationError, match="smtp_tls none would send the mail password"):
        make_archive(tmp_path, smtp_host="mail.hospital.example", smtp_user="imageshare",
                     smtp_password="secret")
    for host in ("127.0.0.1", "localhost", "::1"):  # a relay on this machine
        load_settings(environ={"IMAGESHARE_SMTP_HOST": host, "IMAGESHARE_SMTP_USER": "u",
                               "IMAGESHARE_DATA_DIR": str(tmp_path)})
    load_settings(environ={"IMAGESHARE_SMTP_HOST": "mail.hospital.example",
                           "IMAGESHARE_SMTP_USER": "u", "IMAGESHARE_SMTP_TLS": "starttls",
                           "IMAGESHARE_DATA_DIR": str(tmp_path)})
