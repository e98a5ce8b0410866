"""`imageshare backup` signs its manifest with the installation key; `imageshare restore`
checks it, says what to do without the key, and restores an unsigned backup only when told
to (audited)."""

from __future__ import annotations

import json

from imageshare.domain.actors import cli_actor
from tests.conftest import make_archive
from tests.factory import ct_series

KEY = "k" * 40


def _backed_up(tmp_path, imageshare) -> None:
    source = make_archive(tmp_path / "src", secret_key=KEY)
    try:
        for path in ct_series(tmp_path / "ct", 2, patient_id="SIG1"):
            source.ingest.store_copy(path, cli_actor())
    finally:
        source.close()
    made = imageshare(tmp_path / "src" / "data", "backup", str(tmp_path / "backup"),
                      "--quiet", IMAGESHARE_SECRET_KEY=KEY)
    assert made.returncode == 0, made.stderr


def _manifest(tmp_path):
    [manifest] = (tmp_path / "backup" / "snapshots").glob("*/manifest.json")
    return manifest


def test_restore_checks_the_installation_signature(tmp_path, imageshare, monkeypatch):
    _backed_up(tmp_path, imageshare)
    assert "signature" in json.loads(_manifest(tmp_path).read_text())
    other = imageshare(tmp_path / "other" / "data", "restore", str(tmp_path / "backup"),
                       "--quiet", IMAGESHARE_SECRET_KEY="z" * 40)
    assert other.returncode != 0 and "signature" in other.stderr
    assert not (tmp_path / "other" / "data" / "index.sqlite").exists()
    # Without any key the restore says how to give it, and makes none of its own.
    monkeypatch.delenv("IMAGESHARE_SECRET_KEY")
    keyless = imageshare(tmp_path / "keyless" / "data", "restore", str(tmp_path / "backup"),
                         "--quiet")
    assert keyless.returncode != 0 and "IMAGESHARE_SECRET_KEY" in keyless.stderr
    assert not (tmp_path / "keyless" / "data").exists()
    restored = imageshare(tmp_path / "copy" / "data", "restore", str(tmp_path / "backup"),
                          "--quiet", IMAGESHARE_SECRET_KEY=KEY)
    assert restored.returncode == 0, restored.stderr


def test_an_unsigned_backup_is_restored_only_when_accepted_and_that_is_audited(
        tmp_path, imageshare):
    _backed_up(tmp_path, imageshare)
    manifest = _manifest(tmp_path)
    unsigned = json.loads(manifest.read_text())
    del unsigned["signature"]
    manifest.write_text(json.dumps(unsigned))
    refused = imageshare(tmp_path / "copy" / "data", "restore", str(tmp_path / "backup"),
                         "--quiet", IMAGESHARE_SECRET_KEY=KEY)
    assert refused.returncode != 0 and "not signed" in refused.stderr
    accepted = imageshare(tmp_path / "copy" / "data", "restore", str(tmp_path / "backup"),
                          "--quiet", "--accept-unsigned", IMAGESHARE_SECRET_KEY=KEY)
    assert accepted.returncode == 0, accepted.stderr
    copy = make_archive(tmp_path / "copy", secret_key=KEY)
    try:
        [event] = copy.audit.events("archive.restore")
        assert event["detail"]["signature_checked"] is False
    finally:
        copy.close()
