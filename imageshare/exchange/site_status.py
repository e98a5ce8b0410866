"""The live status per site of a patient's imaging, as the clinician sees it on the study page
and in search: for each connected site, not yet checked, checking, or what it answered (up to
date, with the time) with its studies and how each links to the patient; for each study,
whether it is only at the other site, downloading (with progress), stored here as a temporary
copy (from which site, until when) or stored here permanently."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from imageshare.exchange.nodes import NodeRegistry
from imageshare.storage.index.schema import (
    background_jobs,
    instances,
    retrieved_copies,
    series,
    site_checks,
    studies,
)

RECENT_FAILURE = timedelta(hours=1)  # a failed retrieval is shown this long


@dataclass(frozen=True)
class LocalCopy:
    """Whether a study is here, and how: ``absent`` (only at the other site),
    ``downloading`` (``done`` of ``total``), ``temporary`` (from ``site_label`` until
    ``expires_at``), ``permanent``, or ``failed`` (the last retrieval, with ``error``)."""

    state: str
    done: int = 0
    total: int = 0
    site: str = ""
    site_label: str = ""
    expires_at: datetime | None = None
    retrieved_at: datetime | None = None
    job_id: str = ""
    error: str = ""

    @property
    def percent(self) -> int:
        """Download progress in percent."""
        return min(100, int(100 * self.done / self.total)) if self.total else 0

    @property
    def busy(self) -> bool:
        """Still changing by itself (the page keeps following it)."""
        return self.state == "downloading"


@dataclass
class SiteStatus:
    """What one site last said about the patient, with each study's local state."""

    site: str
    label: str
    state: str  # not checked, checking, answered, incomplete, unreachable, timeout, error
    checked_at: datetime | None = None
    detail: str = ""
    studies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        """Still changing by itself."""
        return self.state == "checking" or any(s["local"].busy for s in self.studies)


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class SiteStatusBoard:
    """Reads the site checks, temporary copies and running retrievals of the index."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, temporary_days: int = 30) -> None:
        self._engine = engine
        self._nodes = nodes
        self._days = temporary_days

    def sites(self, key: str) -> list[SiteStatus]:
        """Every searchable site (and any that answered before) for the patient filed under
        ``key`` (``nhs:...`` or ``id:...``)."""
        labels = {n.ae_title: n.label for n in self._nodes.all()}
        with self._engine.connect() as conn:
            rows = {r["site"]: r for r in conn.execute(select(site_checks).where(
                site_checks.c.patient_key == key[:128])).mappings()}
        listed = [n.ae_title for n in self._nodes.all() if n.searchable]
        listed += [site for site in rows if site not in listed]
        found: list[SiteStatus] = []
        for site in listed:
            row = rows.get(site)
            if row is None:
                found.append(SiteStatus(site, labels.get(site, site), "not checked"))
                continue
            try:
                answered = json.loads(row["studies"] or "[]")
            except ValueError:
                answered = []
            found.append(SiteStatus(site, labels.get(site, site), row["status"],
                                    _utc(row["checked_at"]), row["detail"],
                                    [a for a in answered if isinstance(a, dict)]))
        copies = self.copies(s["study_uid"] for f in found for s in f.studies)
        for status in found:
            for study in status.studies:
                study["local"] = copies.get(study["study_uid"], LocalCopy("absent"))
        return found

    def copies(self, study_uids: Iterable[str]) -> dict[str, LocalCopy]:
        """The local state of each study (absent ones are left out)."""
        uids = sorted({u for u in study_uids if u})
        if not uids:
            return {}
        labels = {n.ae_title: n.label for n in self._nodes.all()}
        with self._engine.connect() as conn:
            classes = conn.execute(
                select(studies.c.study_uid, instances.c.retention_class,
                       func.min(instances.c.received_at))
                .join(series, series.c.study_pk == studies.c.pk)
                .join(instances, instances.c.series_pk == series.c.pk)
                .where(studies.c.study_uid.in_(uids))
                .group_by(studies.c.study_uid, instances.c.retention_class)).all()
            copied = {r["study_uid"]: r for r in conn.execute(select(retrieved_copies).where(
                retrieved_copies.c.study_uid.in_(uids))).mappings()}
            jobs = conn.execute(select(
                background_jobs.c.public_id, background_jobs.c.params,
                background_jobs.c.state, background_jobs.c.done, background_jobs.c.total,
                background_jobs.c.error, background_jobs.c.finished_at).where(
                background_jobs.c.kind == "retrieve",
                (background_jobs.c.state.in_(("queued", "running")))
                | (background_jobs.c.finished_at
                   >= datetime.now(UTC) - RECENT_FAILURE))
                .order_by(background_jobs.c.pk)).mappings().all()
        kinds: dict[str, dict[str, datetime]] = {}
        for uid, kind, first in classes:
            kinds.setdefault(uid, {})[kind] = _utc(first) or datetime.now(UTC)
        found: dict[str, LocalCopy] = {}
        for uid, held in kinds.items():
            if "clinical" in held:
                found[uid] = LocalCopy("permanent")
            elif "temporary" in held:
                row = copied.get(uid)
                site = row["site"] if row is not None else ""
                found[uid] = LocalCopy(
                    "temporary", site=site, site_label=labels.get(site, site),
                    expires_at=_utc(row["expires_at"]) if row is not None
                    else held["temporary"] + timedelta(days=self._days),
                    retrieved_at=_utc(row["retrieved_at"]) if row is not None else None,
                    job_id=row["job_id"] if row is not None else "")
        for job in jobs:  # oldest first: the latest retrieval of a study wins
            uid = (job["params"] or {}).get("study_uid", "")
            if uid not in uids:
                continue
            site = (job["params"] or {}).get("site", "")
            if job["state"] in ("queued", "running"):
                found[uid] = LocalCopy("downloading", job["done"], job["total"], site,
                                       labels.get(site, site), job_id=job["public_id"])
            elif job["state"] == "failed" and uid not in kinds:
                found[uid] = LocalCopy("failed", site=site, site_label=labels.get(site, site),
                                       job_id=job["public_id"], error=job["error"])
        return found

    def retrieved_by_job(self, job_id: str) -> dict[str, Any] | None:
        """The study a retrieval job brought (or is bringing) here and its local state: a
        finished retrieval's page links to the study."""
        with self._engine.connect() as conn:
            params = conn.execute(select(background_jobs.c.params).where(
                background_jobs.c.public_id == job_id,
                background_jobs.c.kind == "retrieve")).scalar()
        uid = (params or {}).get("study_uid", "")
        if not uid:
            return None
        copy = self.copies([uid]).get(uid, LocalCopy("absent"))
        return {"study_uid": uid, "copy": copy}
