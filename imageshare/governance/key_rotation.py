"""The end of a key rotation, and the move to a store that serves encrypted blobs only
(``imageshare storage seal``): every blob that is plaintext (written before encryption) or
sealed under a retired secret key is sealed again under the current key, each first checked
against the digest the index recorded for it, and so is every secret in the index (second
factors, site credentials, EHR secrets, queued jobs' secret parameters). Audited as
``storage.seal`` (counts only: no patient data, no secret)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConfigurationError
from imageshare.storage.encrypted import EncryptedBlobStore, SealReport, seal_plaintext_blobs
from imageshare.storage.index import schema
from imageshare.storage.index.schema import instances, upload_results
from imageshare.storage.secret_box import SecretBox

# The name of the index's secrets among the stores a seal reports on.
INDEX_SECRETS = "index secrets"
# The secrets sealed in the index (second factors, site credentials, EHR secrets, queued jobs'
# secret parameters).
_SEALED_COLUMNS = ((schema.users, schema.users.c.totp_secret),
                   (schema.nodes, schema.nodes.c.dicomweb_auth),
                   (schema.ehr_systems, schema.ehr_systems.c.secret),
                   (schema.background_jobs, schema.background_jobs.c.sealed_params))


@dataclass
class StoreSeal:
    """What a seal did in one store."""

    store: str  # "blobs", the store beside it (upload originals), or INDEX_SECRETS
    report: SealReport
    unchecked: list[str]  # sealed with no digest recorded in the index to check them against


class KeyRotation:
    """Seals what is not yet under the current secret key (``current_key``), opening what is
    under the retired keys (``retired_keys``)."""

    def __init__(self, engine: Engine, audit: AuditTrail, current_key: bytes,
                 retired_keys: Sequence[bytes]) -> None:
        self._engine = engine
        self._audit = audit
        self._current = current_key
        self._retired = tuple(retired_keys)

    def seal(self, actor: Actor, blobs: EncryptedBlobStore | None,
             originals: tuple[str, EncryptedBlobStore] | None, encrypted_only: bool,
             progress: Callable[[int], None] | None = None) -> list[StoreSeal]:
        """Seal under the current key every blob of ``blobs`` and of the store of upload
        originals (``originals``: its name and store) that is plaintext or under a retired
        key, each checked first against the digest the index recorded for it (one that
        differs is left as it is and reported refused), then the index's secrets sealed under
        a retired key (:data:`INDEX_SECRETS`, last in the list); without blob stores (blobs
        not encrypted) the index's secrets only. Audited (``storage.seal``, failure when it
        stopped, warning when something was refused)."""
        stores: list[tuple[str, EncryptedBlobStore, Callable[[str], str | None]]] = []
        if blobs is not None and originals is not None:
            name, original_store = originals
            stores = [("blobs", blobs, self._instance_digest),
                      (name, original_store, self._original_digests().get)]
        done: list[StoreSeal] = []
        try:
            for store_name, store, recorded in stores:
                unrecorded: set[str] = set()
                report = seal_plaintext_blobs(store, _noting(recorded, unrecorded), progress)
                done.append(StoreSeal(store_name, report,
                                      [k for k in report.sealed if k in unrecorded]))
            done.append(StoreSeal(INDEX_SECRETS, self._reseal_index_secrets(), []))
        except BaseException:
            self._audit_seal(actor, done, encrypted_only, failed=True)
            raise
        self._audit_seal(actor, done, encrypted_only, failed=False)
        return done

    def _instance_digest(self, key: str) -> str | None:
        """The SHA-256 the index recorded for an instance's blob key (None: none recorded, or
        not an instance's blob: a teaching case's attachment, content kept for a hold)."""
        with self._engine.connect() as conn:
            digest = conn.execute(select(instances.c.sha256)
                                  .where(instances.c.blob_key == key)).scalar()
        return str(digest) if digest else None

    def _original_digests(self) -> dict[str, str]:
        """The SHA-256 the index recorded for each kept original of an upload, by blob key."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(upload_results.c.original_key,
                                       upload_results.c.original_sha256)
                                .where(upload_results.c.original_key != "")).all()
        return {key: digest for key, digest in rows if digest}

    def _reseal_index_secrets(self) -> SealReport:
        """Seal again under the current key each secret in the index sealed under a retired
        one (each row changed only if it still holds the value read: one changed meanwhile
        is left to its writer). Refused: sealed under no configured key. Labels name table,
        column and row, never the secret."""
        current = SecretBox(self._current)
        retired = [SecretBox(k) for k in self._retired]
        report = SealReport()
        for table, column in _SEALED_COLUMNS:
            with self._engine.connect() as conn:
                rows = conn.execute(select(table.c.pk, column).where(column.is_not(None))
                                    .order_by(table.c.pk)).all()
            for pk, value in rows:
                if not SecretBox.is_sealed(value):
                    continue
                label = f"{table.name}.{column.name} row {pk}"
                report.checked += 1
                if _opened(current, value) is not None:
                    report.already += 1
                    continue
                plain = next((p for box in retired if (p := _opened(box, value)) is not None),
                             None)
                if plain is None:
                    report.refused.append((label, "sealed under none of the configured keys"))
                    continue
                with self._engine.begin() as conn:
                    changed = conn.execute(
                        update(table).where(table.c.pk == pk, column == value)
                        .values({column.name: current.seal(plain)})).rowcount
                if changed:
                    report.rekeyed.append(label)
        return report

    def _audit_seal(self, actor: Actor, done: list[StoreSeal], encrypted_only: bool,
                failed: bool) -> None:
        reports = [d.report for d in done if d.store != INDEX_SECRETS]
        secrets = next((d.report for d in done if d.store == INDEX_SECRETS), SealReport())
        complete = not failed and all(d.report.complete for d in done)
        self._audit.record(AuditEvent(
            actor=actor, action="storage.seal",
            outcome="failure" if failed else "success" if complete else "warning",
            detail={"checked": sum(r.checked for r in reports),
                    "already": sum(r.already for r in reports),
                    "sealed": sum(len(r.sealed) for r in reports),
                    "rekeyed": sum(len(r.rekeyed) for r in reports),
                    "refused": sum(len(r.refused) for r in reports),
                    "unchecked": sum(len(d.unchecked) for d in done),
                    "secrets_rekeyed": len(secrets.rekeyed),
                    "secrets_refused": len(secrets.refused),
                    "encrypted_only": encrypted_only}))


def check_index_key(engine: Engine, box: SecretBox, sample: int = 3) -> None:
    """:class:`ConfigurationError` when the secret key (with the retired ones) opens none of
    the first ``sample`` secrets sealed in the index: every second factor, site credential
    and EHR secret would then fail one by one (the administrators' code prompt among them),
    and the start says why."""
    tried = 0
    for table, column in _SEALED_COLUMNS:
        with engine.connect() as conn:
            values = conn.execute(select(column).where(column.like("fernet1:%"))
                                  .order_by(table.c.pk).limit(sample)).scalars().all()
        for value in values:
            if _opened(box, value) is not None:
                return
            tried += 1
            if tried >= sample:
                break
        if tried >= sample:
            break
    if tried:
        raise ConfigurationError(
            "the secrets in the database (second factors, site credentials, EHR secrets) do "
            "not open with this secret key: set IMAGESHARE_SECRET_KEY / the secret key file of "
            "the installation that sealed them, or, during a key rotation, name the old key in "
            "IMAGESHARE_RETIRED_SECRET_KEYS_FILE (or IMAGESHARE_RETIRED_SECRET_KEYS) until "
            "`imageshare storage seal` has sealed them again")


def _opened(box: SecretBox, value: str) -> str | None:
    try:
        return box.open(value)
    except ConfigurationError:
        return None


def _noting(recorded: Callable[[str], str | None], unrecorded: set[str]
            ) -> Callable[[str], str | None]:
    """``recorded``, adding to ``unrecorded`` each key it knows no digest of."""
    def looked_up(key: str) -> str | None:
        digest = recorded(key)
        if digest is None:
            unrecorded.add(key)
        return digest
    return looked_up
