"""After a secret-key rotation (session 36) what was signed with the old key still checks while
that key is retired: a backup made before the rotation restores, saying a retired key signed
it, and the audit chain heads exported before it verify beside the new ones, in one walk of
the chain. A manifest or a head signed by no configured key is refused or reported as before.
Through the real command line, as an operator would run it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select

from imageshare.app import installation_key
from imageshare.audit.chain import head_key, verify_chain
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import cli_actor
from imageshare.settings import load_settings
from imageshare.storage.index.schema import instances
from tests.conftest import make_archive
from tests.factory import ct_series

OLD_KEY = "old-secret-key-of-the-installation-0123456789"
NEW_KEY = "new-secret-key-after-the-rotation-9876543210"
UNSIGNED = "does not carry this installation's signature"


def _backed_up(tmp_path: Path, imageshare, key: str, name: str = "backup") -> Path:
    """A backup (``tmp_path/name``) of an archive of two CT slices, made under ``key``."""
    source = make_archive(tmp_path / "src", secret_key=key)
    try:
        for path in ct_series(tmp_path / f"ct-{name}", 2, patient_id="ROT1"):
            source.ingest.store_copy(path, cli_actor())
    finally:
        source.close()
    made = imageshare(tmp_path / "src" / "data", "backup", str(tmp_path / name), "--quiet",
                      IMAGESHARE_SECRET_KEY=key, IMAGESHARE_RETIRED_SECRET_KEYS="")
    assert made.returncode == 0, made.stderr
    return tmp_path / name


def _restore(tmp_path: Path, imageshare, backup: Path, target: str, key: str, retired: str):
    return imageshare(tmp_path / target / "data", "restore", str(backup), "--quiet",
                      IMAGESHARE_SECRET_KEY=key, IMAGESHARE_RETIRED_SECRET_KEYS=retired)


def test_a_backup_made_before_the_rotation_restores_with_the_old_key_retired(
        tmp_path, imageshare):
    backup = _backed_up(tmp_path, imageshare, OLD_KEY)
    restored = _restore(tmp_path, imageshare, backup, "copy", NEW_KEY, OLD_KEY)
    assert restored.returncode == 0, restored.stderr
    assert "signed with a retired secret key" in restored.stdout
    assert "restored snapshot" in restored.stdout
    assert OLD_KEY not in restored.stdout + restored.stderr
    copy = make_archive(tmp_path / "copy", secret_key=NEW_KEY, retired_secret_keys=OLD_KEY)
    try:
        with copy.engine.connect() as conn:  # the two images are back
            assert conn.execute(select(func.count()).select_from(instances)).scalar() == 2
        [event] = copy.audit.events("archive.restore")
        assert event["detail"]["signature_checked"] is True
        assert event["detail"]["signed_by"] == "retired"
    finally:
        copy.close()
    # A backup made after the rotation says the current key signed it.
    after = _backed_up(tmp_path / "later", imageshare, NEW_KEY)
    current = _restore(tmp_path, imageshare, after, "copy2", NEW_KEY, OLD_KEY)
    assert current.returncode == 0, current.stderr
    assert "signed with the current secret key" in current.stdout


def test_a_backup_of_an_old_key_not_retired_is_refused_as_before(tmp_path, imageshare):
    backup = _backed_up(tmp_path, imageshare, OLD_KEY)
    refused = _restore(tmp_path, imageshare, backup, "copy", NEW_KEY, "")
    assert refused.returncode == 1 and UNSIGNED in refused.stderr, refused.stderr
    assert not (tmp_path / "copy" / "data" / "index.sqlite").exists()
    # Another retired key does not help either.
    other = _restore(tmp_path, imageshare, backup, "copy", NEW_KEY, "x" * 40)
    assert other.returncode == 1 and UNSIGNED in other.stderr, other.stderr
    assert not (tmp_path / "copy" / "data" / "index.sqlite").exists()
    # With the old key retired the same backup restores (the refusals left nothing behind).
    restored = _restore(tmp_path, imageshare, backup, "copy", NEW_KEY, OLD_KEY)
    assert restored.returncode == 0, restored.stderr
    assert "signed with a retired secret key" in restored.stdout


def test_a_tampered_manifest_is_refused_under_either_key(tmp_path, imageshare):
    backup = _backed_up(tmp_path, imageshare, OLD_KEY)
    # Untouched, it restores with the old key retired: the edit alone is what is refused.
    untouched = _restore(tmp_path, imageshare, backup, "before", NEW_KEY, OLD_KEY)
    assert untouched.returncode == 0, untouched.stderr
    [manifest] = (backup / "snapshots").glob("*/manifest.json")
    edited = json.loads(manifest.read_text())
    edited["revision"] = "0001"  # the signature no longer covers what is there
    manifest.write_text(json.dumps(edited))
    for key, retired in ((NEW_KEY, OLD_KEY), (OLD_KEY, NEW_KEY), (OLD_KEY, "")):
        refused = _restore(tmp_path, imageshare, backup, "copy", key, retired)
        assert refused.returncode == 1 and UNSIGNED in refused.stderr, (key, refused.stderr)
        assert not (tmp_path / "copy" / "data" / "index.sqlite").exists()


# -- audit chain heads ---------------------------------------------------------------------------

def _record(archive, count: int) -> None:
    archive.audit.record([AuditEvent(cli_actor(), "audit.read", "success",
                                     study_uid=f"1.2.{i}") for i in range(count)])


def _heads_under_both_keys(tmp_path: Path, imageshare) -> Path:
    """An audit trail with a head exported under the old key, then (after the rotation) one
    under the new key; the data folder."""
    data = tmp_path / "data"
    archive = make_archive(tmp_path, secret_key=OLD_KEY)
    try:
        _record(archive, 5)
    finally:
        archive.close()
    old = imageshare(data, "audit", "head", IMAGESHARE_SECRET_KEY=OLD_KEY,
                     IMAGESHARE_RETIRED_SECRET_KEYS="")
    assert old.returncode == 0, old.stderr
    archive = make_archive(tmp_path, secret_key=NEW_KEY, retired_secret_keys=OLD_KEY)
    try:
        _record(archive, 3)
    finally:
        archive.close()
    new = imageshare(data, "audit", "head", IMAGESHARE_SECRET_KEY=NEW_KEY,
                     IMAGESHARE_RETIRED_SECRET_KEYS=OLD_KEY)
    assert new.returncode == 0, new.stderr
    return data


def _head_keys(data: Path, key: str) -> bytes:
    return head_key(installation_key(load_settings({"data_dir": data, "secret_key": key},
                                                   environ={})))


def _verified(data: Path, retired: list[str]):
    """verify_chain of the trail in ``data`` with the new key current and ``retired``."""
    archive = make_archive(data.parent, secret_key=NEW_KEY)
    try:
        return verify_chain(archive.engine, _head_keys(data, NEW_KEY),
                            data / "audit-heads.jsonl",
                            [_head_keys(data, key) for key in retired])
    finally:
        archive.close()


def test_heads_signed_before_and_after_the_rotation_verify_with_the_old_key_retired(
        tmp_path, imageshare):
    data = _heads_under_both_keys(tmp_path, imageshare)
    report = _verified(data, [OLD_KEY])
    assert report.intact, [str(p) for p in report.problems]
    assert report.heads_checked == 2
    trail = imageshare(data, "audit", "verify", IMAGESHARE_SECRET_KEY=NEW_KEY,
                       IMAGESHARE_RETIRED_SECRET_KEYS=OLD_KEY)
    assert trail.returncode == 0, trail.stdout + trail.stderr
    assert "audit trail intact" in trail.stdout and "2 signed head(s) checked" in trail.stdout


def test_a_forged_head_is_still_reported_once_per_head_with_the_old_key_retired(
        tmp_path, imageshare):
    data = _heads_under_both_keys(tmp_path, imageshare)
    heads = data / "audit-heads.jsonl"
    lines = heads.read_text().splitlines()
    # A copy of each genuine head with its signature altered: two forged heads.
    forged = [line.replace('"hmac": "', '"hmac": "0') for line in lines]
    heads.write_text("\n".join(lines + forged) + "\n")
    report = _verified(data, [OLD_KEY])
    assert [p.kind for p in report.problems] == ["signature", "signature"]
    assert all("wrong signature" in str(p) for p in report.problems)
    trail = imageshare(data, "audit", "verify", IMAGESHARE_SECRET_KEY=NEW_KEY,
                       IMAGESHARE_RETIRED_SECRET_KEYS=OLD_KEY)
    assert trail.returncode == 1 and trail.stdout.count("wrong signature") == 2, trail.stdout


def test_heads_of_an_old_key_not_retired_are_reported_unsigned_as_before(tmp_path, imageshare):
    data = _heads_under_both_keys(tmp_path, imageshare)
    report = _verified(data, [])
    assert len(report.problems) == 1 and report.problems[0].kind == "signature"
    assert report.heads_checked == 2
    trail = imageshare(data, "audit", "verify", IMAGESHARE_SECRET_KEY=NEW_KEY,
                       IMAGESHARE_RETIRED_SECRET_KEYS="")
    assert trail.returncode == 1 and trail.stdout.count("wrong signature") == 1, trail.stdout
