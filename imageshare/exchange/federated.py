"""Federated search and retrieval: ask every searchable site in parallel (each within its own
timeout), show local and remote studies in one list, link remote studies to the patient only
by NHS number (or name and date of birth when the installation allows), flag mismatches, and
bring a remote study here as a temporary copy."""

from __future__ import annotations

import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from imageshare.archive.dicom_json import text_of
from imageshare.archive.search import StudySearch, StudySearchService, StudySummary
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, SiteUnreachable
from imageshare.domain.identifiers import normalise_name
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.sites import RetrieveProgress, SiteClient
from imageshare.jobs import Job, JobRunner
from imageshare.storage.index.schema import (
    inbox_items,
    instances,
    series,
    site_checks,
    studies,
)

TEMPORARY = "temporary"


@dataclass(frozen=True)
class PatientQuery:
    """Who to look for: an NHS number (preferred), a hospital number, or name and birth date
    (YYYYMMDD). The name and birth date, when given, are also what remote studies are checked
    against."""

    nhs_number: str = ""
    hospital_number: str = ""
    name: str = ""
    birth_date: str = ""

    @property
    def key(self) -> str:
        """How the patient's sharing status is filed."""
        if self.nhs_number:
            return f"nhs:{self.nhs_number}"
        if self.hospital_number:
            return f"id:{self.hospital_number}"
        return f"name:{normalise_name(self.name)}|{self.birth_date}"

    def criteria(self) -> dict[str, str]:
        """The search keys sent to sites."""
        if self.nhs_number:
            return {"PatientID": self.nhs_number}
        if self.hospital_number:
            return {"PatientID": self.hospital_number}
        if self.name and self.birth_date:
            return {"PatientName": self.name, "PatientBirthDate": self.birth_date}
        raise ImageShareError("search by NHS number, hospital number, or name and date of "
                              "birth")


@dataclass(frozen=True)
class RemoteStudy:
    """A study found at another site, with how it relates to the patient searched for."""

    site: str
    site_label: str
    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    study_date: str
    description: str
    modalities: str
    instances: int
    link: str  # linked, mismatch, cannot link
    here: bool  # a copy is in the local archive already


@dataclass
class SiteAnswer:
    """What one site answered."""

    site: str
    label: str
    status: str  # answered, unreachable, timeout, error
    seconds: float = 0.0
    detail: str = ""
    studies: list[RemoteStudy] = field(default_factory=list)


@dataclass
class FederatedResult:
    """Local and remote studies for one patient search."""

    local: list[StudySummary]
    sites: list[SiteAnswer]
    linking: str


class ExchangeService:
    """Searches connected sites and retrieves studies from them."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, clients: dict[str, SiteClient],
                 search: StudySearchService, audit: AuditTrail, jobs: JobRunner,
                 timeout: float, link_by_name_and_birth_date: bool) -> None:
        self._engine = engine
        self._nodes = nodes
        self._clients = clients
        self._search = search
        self._audit = audit
        self._jobs = jobs
        self._timeout = timeout
        self._by_name = link_by_name_and_birth_date
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="site")

    def _client(self, node: Node) -> tuple[str, SiteClient]:
        if node.dicomweb_url and "dicomweb" in self._clients:
            return "dicomweb", self._clients["dicomweb"]
        return "dimse", self._clients["dimse"]

    def search(self, query: PatientQuery, actor: Actor,
               allowed_studies: Collection[str] | None) -> FederatedResult:
        """Local studies and those of every searchable site; a site that does not answer
        within the timeout is reported by name and does not hold the answer up longer."""
        criteria = query.criteria()
        local_search = StudySearch(nhs_number=query.nhs_number,
                                   hospital_number=query.hospital_number,
                                   name=query.name if not (query.nhs_number or
                                                           query.hospital_number) else "",
                                   birth_date=query.birth_date if query.name else "")
        sites = [n for n in self._nodes.all() if n.searchable]
        started = time.monotonic()
        futures = {self._pool.submit(self._ask, node, criteria): node for node in sites}
        local = self._search.search(local_search, actor, allowed_studies).studies
        done, _pending = wait(futures, timeout=self._timeout)
        answers = []
        for future, node in futures.items():
            if future in done:
                answer = future.result()
            else:
                answer = SiteAnswer(node.ae_title, node.label, "timeout",
                                    round(time.monotonic() - started, 2),
                                    f"no answer within {self._timeout:g} s")
            answers.append(answer)
        here = self._local_study_uids([s.study_uid for a in answers for s in a.studies])
        for answer in answers:
            answer.studies = [self._judge(s, query, s.study_uid in here)
                              for s in answer.studies]
        self._remember(query.key, answers)
        linking = ("linked by NHS number" if query.nhs_number else
                   "linked by name and date of birth" if self._by_name and query.name else
                   "cannot link: no NHS number (studies are shown, not attached)")
        self._audit.record([AuditEvent(
            actor=actor, action="exchange.search", outcome="success" if a.status == "answered"
            else "failure", instance_count=len(a.studies),
            detail={"site": a.site, "status": a.status,
                    "by": "nhs" if query.nhs_number else "id" if query.hospital_number
                    else "name+dob"}) for a in answers] or [AuditEvent(
                actor=actor, action="exchange.search", outcome="success",
                detail={"sites": 0})])
        return FederatedResult(local, answers, linking)

    def _remember(self, key: str, answers: list[SiteAnswer]) -> None:
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(delete(site_checks).where(site_checks.c.patient_key == key[:128]))
            if answers:
                conn.execute(insert(site_checks), [
                    {"patient_key": key[:128], "site": a.site[:16], "status": a.status,
                     "detail": (a.detail or "")[:256], "found": len(a.studies),
                     "checked_at": now} for a in answers])

    def status(self, key: str) -> list[dict[str, Any]]:
        """What each site last answered about the patient filed under ``key`` (empty: not
        yet checked)."""
        labels = {n.ae_title: n.label for n in self._nodes.all()}
        with self._engine.connect() as conn:
            rows = conn.execute(select(site_checks).where(site_checks.c.patient_key == key)
                                .order_by(site_checks.c.site)).mappings().all()
        return [{**dict(r), "label": labels.get(r["site"], r["site"])} for r in rows]

    def _ask(self, node: Node, criteria: dict[str, str]) -> SiteAnswer:
        started = time.monotonic()
        kind, client = self._client(node)
        try:
            found = client.find_studies(node, criteria, self._timeout)
        except SiteUnreachable as exc:
            return SiteAnswer(node.ae_title, node.label, "unreachable",
                              round(time.monotonic() - started, 2), str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken site must not break the search
            return SiteAnswer(node.ae_title, node.label, "error",
                              round(time.monotonic() - started, 2), type(exc).__name__)
        studies = [_remote(node, item) for item in found]
        return SiteAnswer(node.ae_title, node.label, "answered",
                          round(time.monotonic() - started, 2), f"via {kind}",
                          [s for s in studies if s.study_uid])

    def _judge(self, study: RemoteStudy, query: PatientQuery, here: bool) -> RemoteStudy:
        link = "cannot link"
        if query.nhs_number and study.patient_id == query.nhs_number:
            link = "linked"
            if (query.name and normalise_name(query.name) != normalise_name(study.patient_name)
                    ) or (query.birth_date and study.birth_date
                          and study.birth_date != query.birth_date):
                link = "mismatch"
        elif self._by_name and query.name and query.birth_date:
            same = (normalise_name(query.name) == normalise_name(study.patient_name)
                    and query.birth_date == study.birth_date)
            link = "linked" if same else "mismatch"
        return RemoteStudy(**{**study.__dict__, "link": link, "here": here})

    def _local_study_uids(self, uids: list[str]) -> set[str]:
        if not uids:
            return set()
        with self._engine.connect() as conn:
            return set(conn.execute(select(studies.c.study_uid)
                                    .where(studies.c.study_uid.in_(uids))).scalars())

    # -- retrieval ------------------------------------------------------------------------------

    def retrieve(self, site: str, study_uid: str, actor: Actor) -> Job:
        """Bring a remote study here in the background (a temporary copy)."""
        node = self._nodes.get(site)
        if not node.retrieve_from:
            raise ImageShareError(f"retrieving from {node.label} is not allowed")
        kind, client = self._client(node)
        job = self._jobs.submit(actor.name, "retrieve", f"Retrieve from {node.label}",
                                lambda job: self._run_retrieve(job, node, client, study_uid,
                                                               actor))
        return job

    def _run_retrieve(self, job: Job, node: Node, client: SiteClient, study_uid: str,
                      actor: Actor) -> None:
        started = datetime.now(UTC)

        def progress(p: RetrieveProgress) -> None:
            job.done, job.total = p.received, max(p.expected, p.received)

        try:
            result = client.retrieve_study(node, study_uid, progress)
        except SiteUnreachable as exc:
            self._audit.record(AuditEvent(actor=actor, action="exchange.retrieve",
                                          outcome="failure", study_uid=study_uid,
                                          detail={"site": node.ae_title, "error": str(exc)}))
            raise
        marked = self._mark_temporary(study_uid, node.ae_title, started)
        job.summary = (f"{result.received} instance(s) received from {node.label}"
                       + (f", {result.failed} failed" if result.failed else ""))
        self._audit.record(AuditEvent(
            actor=actor, action="exchange.retrieve",
            outcome="success" if not result.failed else "warning", study_uid=study_uid,
            instance_count=result.received,
            detail={"site": node.ae_title, "failed": result.failed, "temporary": marked}))

    def _mark_temporary(self, study_uid: str, site: str, since: datetime) -> int:
        """Instances of the study that arrived during the retrieval are a temporary copy (not
        an inbox item: we asked for them)."""
        with self._engine.begin() as conn:
            series_pks = select(series.c.pk).join(studies, studies.c.pk == series.c.study_pk) \
                .where(studies.c.study_uid == study_uid).scalar_subquery()
            marked = conn.execute(update(instances).where(
                instances.c.series_pk.in_(series_pks), instances.c.received_at >= since,
                instances.c.retention_class.in_(["clinical", "inbox"])).values(
                retention_class=TEMPORARY)).rowcount
            conn.execute(delete(inbox_items).where(
                inbox_items.c.study_uid == study_uid, inbox_items.c.site == site,
                inbox_items.c.first_received >= since, inbox_items.c.status == "pending"))
            return marked


def _remote(node: Node, item: dict[str, Any]) -> RemoteStudy:
    modalities = "/".join((item.get("00080061") or {}).get("Value") or [])
    try:
        count = int(text_of(item.get("00201208")) or 0)
    except ValueError:
        count = 0
    return RemoteStudy(
        site=node.ae_title, site_label=node.label, study_uid=text_of(item.get("0020000D")),
        patient_name=text_of(item.get("00100010")), patient_id=text_of(item.get("00100020")),
        birth_date=text_of(item.get("00100030")), study_date=text_of(item.get("00080020")),
        description=text_of(item.get("00081030")), modalities=modalities, instances=count,
        link="cannot link", here=False)
