"""Federated search and retrieval: ask every searchable site in parallel (each within its own
timeout), show local and remote studies in one list, link remote studies to the patient only
by NHS number (or name and date of birth when the installation allows), flag mismatches, and
bring a remote study here as a temporary copy."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from imageshare.archive.dicom_json import text_of
from imageshare.archive.indexing import file_under_record, summarise_studies
from imageshare.archive.search import StudySearch, StudySearchService, StudySummary
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, InvalidQuery, SiteUnreachable
from imageshare.domain.identifiers import normalise_name
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.sites import RetrieveProgress, SiteClient
from imageshare.jobs import Job, JobQueue, actor_from, actor_params
from imageshare.storage.index.schema import (
    background_jobs,
    inbox_items,
    instances,
    retrieved_copies,
    series,
    site_checks,
    studies,
)

TEMPORARY = "temporary"
# A key inside Other Patient IDs Sequence (where many sites keep the NHS number).
OTHER_IDS = "OtherPatientIDsSequence.PatientID"
BY_PATIENT_ID, BY_OTHER_IDS, BY_NAME = ("Patient ID", "Other Patient IDs",
                                        "name and date of birth")


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

    def layouts(self) -> list[tuple[str, dict[str, str]]]:
        """Each way of asking a site, in order. An NHS number is looked for as the Patient ID,
        inside Other Patient IDs (a hospital number in Patient ID), and by name and date of
        birth when they are known (the NHS number then checked in the answers)."""
        if not self.nhs_number:
            return [("", self.criteria())]
        ways = [(BY_PATIENT_ID, {"PatientID": self.nhs_number}),
                (BY_OTHER_IDS, {OTHER_IDS: self.nhs_number})]
        if self.name and self.birth_date:
            ways.append((BY_NAME, {"PatientName": self.name,
                                   "PatientBirthDate": self.birth_date, OTHER_IDS: ""}))
        return ways

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
    other_ids: tuple[str, ...] = ()  # Other Patient IDs the site answered with


@dataclass
class SiteAnswer:
    """What one site answered."""

    site: str
    label: str
    status: str  # answered, unreachable, timeout, error
    seconds: float = 0.0
    detail: str = ""
    studies: list[RemoteStudy] = field(default_factory=list)


@dataclass(frozen=True)
class ConnectionCheck:
    """Whether a site answered one way of reaching it, and what it said."""

    protocol: str
    ok: bool
    detail: str


@dataclass
class FederatedResult:
    """Local and remote studies for one patient search."""

    local: list[StudySummary]
    sites: list[SiteAnswer]
    linking: str


class ExchangeService:
    """Searches connected sites and retrieves studies from them."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, clients: dict[str, SiteClient],
                 search: StudySearchService, audit: AuditTrail, jobs: JobQueue,
                 timeout: float, link_by_name_and_birth_date: bool,
                 temporary_days: int = 30) -> None:
        self._engine = engine
        self._temporary_days = temporary_days
        self._nodes = nodes
        self._clients = clients
        self._search = search
        self._audit = audit
        self._jobs = jobs
        self._timeout = timeout
        self._by_name = link_by_name_and_birth_date
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="site")
        jobs.register("retrieve", self._handle_retrieve)
        jobs.register("site-check", self._handle_check)

    def _client(self, node: Node) -> tuple[str, SiteClient]:
        if node.dicomweb_url and "dicomweb" in self._clients:
            return "dicomweb", self._clients["dicomweb"]
        return "dimse", self._clients["dimse"]

    def search(self, query: PatientQuery, actor: Actor,
               allowed_studies: Collection[str] | None) -> FederatedResult:
        """Local studies and those of every searchable site; a site that does not answer
        within the timeout is reported by name and does not hold the answer up longer."""
        query.criteria()  # refuses a search with too little to go on
        local_search = StudySearch(nhs_number=query.nhs_number,
                                   hospital_number=query.hospital_number,
                                   name=query.name if not (query.nhs_number or
                                                           query.hospital_number) else "",
                                   birth_date=query.birth_date if query.name else "")
        sites = [n for n in self._nodes.all() if n.searchable]
        started = time.monotonic()
        local = self._search.search(local_search, actor, allowed_studies).studies
        if query.nhs_number and not (query.name and query.birth_date) and local:
            # Known here: the name and birth date let sites that cannot match inside Other
            # Patient IDs be asked too (the NHS number is still checked in their answers).
            query = replace(query, name=local[0].patient_name,
                            birth_date=local[0].birth_date)
        futures = {self._pool.submit(self._ask, node, query): node for node in sites}
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
        self._audit_search(actor, query, answers)
        return FederatedResult(local, answers, linking)

    def _audit_search(self, actor: Actor, query: PatientQuery,
                      answers: list[SiteAnswer]) -> None:
        """One ``exchange.search`` event per site asked (one saying none when none was)."""
        by = "nhs" if query.nhs_number else "id" if query.hospital_number else "name+dob"
        self._audit.record([AuditEvent(
            actor=actor, action="exchange.search", outcome="success" if a.status == "answered"
            else "failure", instance_count=len(a.studies),
            detail={"site": a.site, "status": a.status, "by": by}) for a in answers] or [
            AuditEvent(actor=actor, action="exchange.search", outcome="success",
                       detail={"sites": 0})])

    def test_connection(self, ae_title: str, actor: Actor) -> list[ConnectionCheck]:
        """Ask the site whether it answers us each way it is registered for (C-ECHO on its
        DICOM port; an authenticated QIDO-RS when it has a DICOMweb URL). Audited."""
        node = self._nodes.get(ae_title)
        ways = [("DICOM", self._clients["dimse"])]
        if node.dicomweb_url and "dicomweb" in self._clients:
            ways.append(("DICOMweb", self._clients["dicomweb"]))
        checks = []
        for label, client in ways:
            try:
                checks.append(ConnectionCheck(label, True, client.check(node, self._timeout)))
            except SiteUnreachable as exc:
                checks.append(ConnectionCheck(label, False, str(exc)))
            except Exception as exc:  # noqa: BLE001 - a broken site must not break the page
                checks.append(ConnectionCheck(label, False, f"failed ({type(exc).__name__})"))
        self._audit.record(AuditEvent(
            actor=actor, action="node.test",
            outcome="success" if all(c.ok for c in checks) else "failure",
            detail={"ae_title": node.ae_title,
                    "checks": {c.protocol: c.detail for c in checks}}))
        return checks

    def _remember(self, key: str, answers: list[SiteAnswer]) -> None:
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(delete(site_checks).where(site_checks.c.patient_key == key[:128]))
            if answers:
                conn.execute(insert(site_checks), [_check_row(key, a, now) for a in answers])

    def _remember_site(self, key: str, answer: SiteAnswer) -> None:
        """Record one site's answer as soon as it came (the others may still be checking)."""
        with self._engine.begin() as conn:
            conn.execute(delete(site_checks).where(site_checks.c.patient_key == key[:128],
                                                   site_checks.c.site == answer.site[:16]))
            conn.execute(insert(site_checks).values(
                **_check_row(key, answer, datetime.now(UTC))))

    # -- checking in the background (the live status per site) -------------------------------

    def check(self, query: PatientQuery, actor: Actor) -> Job:
        """Ask every searchable site about the patient in the background: each site shows
        ``checking`` until it answers (the study page follows it live)."""
        query.criteria()
        now = datetime.now(UTC)
        sites = [n for n in self._nodes.all() if n.searchable]
        with self._engine.begin() as conn:
            for node in sites:
                updated = conn.execute(update(site_checks).where(
                    site_checks.c.patient_key == query.key[:128],
                    site_checks.c.site == node.ae_title).values(
                    status="checking")).rowcount
                if not updated:
                    conn.execute(insert(site_checks).values(
                        patient_key=query.key[:128], site=node.ae_title, status="checking",
                        detail="", found=0, checked_at=now, studies="[]"))
        return self._jobs.submit(actor.name, "site-check", "Check other sites",
                                 {"actor": actor_params(actor), "key": query.key[:128]},
                                 secret_params={"query": asdict(query)}, notify=False)

    def _handle_check(self, job: Job, params: dict[str, Any]) -> None:
        """Run a queued check: each site's answer is recorded as soon as it comes."""
        query = PatientQuery(**params["query"])
        actor = actor_from(params["actor"])
        key = params.get("key") or query.key
        if query.nhs_number and not (query.name and query.birth_date):
            known = self._search.search(StudySearch(nhs_number=query.nhs_number), actor,
                                        None).studies
            if known:
                query = replace(query, name=known[0].patient_name,
                                birth_date=known[0].birth_date)
        sites = [n for n in self._nodes.all() if n.searchable]
        job.total = len(sites)
        started = time.monotonic()
        futures = {self._pool.submit(self._ask, node, query): node for node in sites}
        answers: list[SiteAnswer] = []
        try:
            for future in as_completed(futures, timeout=self._timeout + 1):
                answers.append(self._judged(future.result(), query))
                self._remember_site(key, answers[-1])
                job.done = len(answers)
        except FuturesTimeout:
            pass
        for future, node in futures.items():
            if not future.done():
                answer = SiteAnswer(node.ae_title, node.label, "timeout",
                                    round(time.monotonic() - started, 2),
                                    f"no answer within {self._timeout:g} s")
                answers.append(answer)
                self._remember_site(key, answer)
        self._audit_search(actor, query, answers)
        job.summary = f"{len(answers)} site(s) checked"

    def _judged(self, answer: SiteAnswer, query: PatientQuery) -> SiteAnswer:
        here = self._local_study_uids([s.study_uid for s in answer.studies])
        answer.studies = [self._judge(s, query, s.study_uid in here) for s in answer.studies]
        return answer

    def _ask(self, node: Node, query: PatientQuery) -> SiteAnswer:
        started = time.monotonic()
        kind, client = self._client(node)
        found: dict[str, RemoteStudy] = {}
        answered: list[str] = []  # the ways this site could be asked
        for way, criteria in query.layouts():
            try:
                items = client.find_studies(node, criteria, self._timeout)
            except SiteUnreachable as exc:
                if answered:  # it answered before: this way of asking is what failed
                    continue
                return SiteAnswer(node.ae_title, node.label, "unreachable",
                                  round(time.monotonic() - started, 2), str(exc))
            except Exception as exc:  # noqa: BLE001 - a broken site must not break the search
                if way and (answered or way != BY_PATIENT_ID):
                    continue
                return SiteAnswer(node.ae_title, node.label, "error",
                                  round(time.monotonic() - started, 2), type(exc).__name__)
            studies = [_remote(node, item) for item in items]
            kept = [st for st in studies if st.study_uid and _belongs(st, way, query)]
            if way == BY_OTHER_IDS and studies and not any(st.other_ids for st in studies):
                continue  # the site ignored the key inside the sequence: no answer that way
            answered.append(way)
            for study in kept:
                found.setdefault(study.study_uid, study)
        seconds = round(time.monotonic() - started, 2)
        if query.nhs_number and BY_OTHER_IDS not in answered and not found:
            # The site could not be asked inside Other Patient IDs: it may well keep the
            # patient under a hospital number. Never "up to date, 0 studies".
            return SiteAnswer(node.ae_title, node.label, "incomplete", seconds,
                              f"via {kind}: nothing by {' or '.join(answered)}, but this "
                              "site does not match inside Other Patient IDs, where a hospital "
                              "number layout keeps the NHS number"
                              + ("" if BY_NAME in answered else
                                 "; add the name and date of birth to search it that way too"))
        ways = ", ".join(w for w in answered if w)
        detail = f"via {kind}" + (f", by {ways}" if ways else "")
        return SiteAnswer(node.ae_title, node.label, "answered", seconds, detail,
                          list(found.values()))

    def _judge(self, study: RemoteStudy, query: PatientQuery, here: bool) -> RemoteStudy:
        link = "cannot link"
        if query.nhs_number and query.nhs_number in (study.patient_id, *study.other_ids):
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
        """Bring a remote study here in the background (a temporary copy). A Study Instance
        UID that is not one (digits and dots, at most 64: leading zeros, which some devices
        write, are let through) is refused here, before anything is asked of the site."""
        if not (0 < len(study_uid) <= 64 and set(study_uid) <= set("0123456789.")
                and "" not in study_uid.split(".")):
            raise InvalidQuery("the Study Instance UID is not a valid UID")
        node = self._nodes.get(site)
        if not node.retrieve_from:
            raise ImageShareError(f"retrieving from {node.label} is not allowed")
        return self._jobs.submit(actor.name, "retrieve", f"Retrieve from {node.label}",
                                 {"site": node.ae_title, "study_uid": study_uid,
                                  "actor": actor_params(actor)})

    def retrieving_from(self, site: str) -> frozenset[str]:
        """The Study Instance UIDs this archive is retrieving from the site with AE title
        ``site`` now (on any instance): what the site may send us under our C-MOVE."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(background_jobs.c.params).where(
                background_jobs.c.kind == "retrieve",
                background_jobs.c.state.in_(("queued", "running")))).scalars().all()
        return frozenset(str(p.get("study_uid", "")) for p in rows
                         if isinstance(p, dict) and p.get("site") == site)

    def _handle_retrieve(self, job: Job, params: dict[str, Any]) -> None:
        """Run a queued retrieval (on whichever instance leased it)."""
        node = self._nodes.get(params["site"])
        if not node.retrieve_from:
            raise ImageShareError(f"retrieving from {node.label} is not allowed")
        _kind, client = self._client(node)
        self._run_retrieve(job, node, client, params["study_uid"], actor_from(params["actor"]))

    def _run_retrieve(self, job: Job, node: Node, client: SiteClient, study_uid: str,
                      actor: Actor) -> None:
        # Since the job was queued: what an earlier attempt received is marked too.
        started = datetime.fromtimestamp(job.created, UTC)

        def progress(p: RetrieveProgress) -> None:
            job.done, job.total = p.received, max(p.expected, p.received)

        # The record's own instances of the study before anything arrives: a version the
        # site sends of one of them (replacing it where overwrite is on) stays the record's,
        # never a temporary copy that expires.
        in_record = self._record_instances(study_uid)
        kind, _client = self._client(node)
        source = "dicomweb" if kind == "dicomweb" else ""
        try:
            result = client.retrieve_study(node, study_uid, progress)
        except Exception as exc:
            # What arrived before the site stopped (or the retrieval broke) is a temporary
            # copy too, never part of the record: a person accepts nothing by a failure.
            marked = self._mark_temporary(study_uid, node.ae_title, started, source,
                                          in_record)
            if marked:
                self._record_copy(study_uid, node.ae_title, job.id, actor.name, marked)
            reason = str(exc) if isinstance(exc, ImageShareError) else type(exc).__name__
            self._audit.record(AuditEvent(actor=actor, action="exchange.retrieve",
                                          outcome="failure", study_uid=study_uid,
                                          instance_count=marked,
                                          detail={"site": node.ae_title, "error": reason,
                                                  "temporary": marked}))
            raise
        marked = self._mark_temporary(study_uid, node.ae_title, started, source, in_record)
        if marked:
            self._record_copy(study_uid, node.ae_title, job.id, actor.name, marked)
        job.summary = (f"{result.received} instance(s) received from {node.label}"
                       + (f", {result.failed} failed" if result.failed else "")
                       + (f" ({'; '.join(result.problems)})" if result.problems else ""))[:500]
        self._audit.record(AuditEvent(
            actor=actor, action="exchange.retrieve",
            outcome="success" if not result.failed else "warning", study_uid=study_uid,
            instance_count=result.received,
            detail={"site": node.ae_title, "failed": result.failed, "temporary": marked,
                    **({"problems": list(result.problems)} if result.problems else {})}))

    def _record_copy(self, study_uid: str, site: str, job_id: str, by: str, count: int
                     ) -> None:
        """Where the temporary copy came from and until when it is kept."""
        now = datetime.now(UTC)
        values = {"site": site[:16], "job_id": job_id[:64], "retrieved_by": by[:128],
                  "retrieved_at": now,
                  "expires_at": now + timedelta(days=self._temporary_days),
                  "instances": count}
        with self._engine.begin() as conn:
            if not conn.execute(update(retrieved_copies).where(
                    retrieved_copies.c.study_uid == study_uid).values(**values)).rowcount:
                conn.execute(insert(retrieved_copies).values(study_uid=study_uid, **values))

    def _record_instances(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the study that are part of the record (clinical)."""
        with self._engine.connect() as conn:
            return set(conn.execute(select(instances.c.sop_uid).join(
                series, series.c.pk == instances.c.series_pk).join(
                studies, studies.c.pk == series.c.study_pk).where(
                studies.c.study_uid == study_uid,
                instances.c.retention_class == "clinical")).scalars())

    def _mark_temporary(self, study_uid: str, site: str, since: datetime,
                        source: str = "", in_record: Collection[str] = ()) -> int:
        """Instances of the study that arrived from the site during the retrieval are a
        temporary copy (not an inbox item: we asked for them). Only those the site sent
        (``source``: what our DICOMweb client records, else the site's AE title calling):
        instances others stored into the study meanwhile (our modality, another hospital)
        keep their class, and so do those that were part of the record before it began
        (``in_record``), whatever the site sent of them."""
        sent_by_site = (instances.c.received_from == source if source
                        else instances.c.received_from.startswith(f"{site}@", autoescape=True))
        with self._engine.begin() as conn:
            series_pks = select(series.c.pk).join(studies, studies.c.pk == series.c.study_pk) \
                .where(studies.c.study_uid == study_uid).scalar_subquery()
            arrived = [pk for pk, sop_uid in conn.execute(select(
                instances.c.pk, instances.c.sop_uid).where(
                instances.c.series_pk.in_(series_pks), instances.c.received_at >= since,
                sent_by_site, instances.c.retention_class.in_(["clinical", "inbox"])))
                if sop_uid not in in_record]
            marked = 0
            for start in range(0, len(arrived), 500):
                marked += conn.execute(update(instances).where(
                    instances.c.pk.in_(arrived[start:start + 500])).values(
                    retention_class=TEMPORARY)).rowcount
            if marked:  # what waited in the inbox is part of the record now
                study_pks = list(conn.execute(select(studies.c.pk).where(
                    studies.c.study_uid == study_uid)).scalars())
                for study_pk in study_pks:
                    file_under_record(conn, study_pk)
                summarise_studies(conn, study_pks, datetime.now(UTC))
            conn.execute(delete(inbox_items).where(
                inbox_items.c.study_uid == study_uid, inbox_items.c.site == site,
                inbox_items.c.first_received >= since, inbox_items.c.status == "pending"))
            return marked


def _check_row(key: str, answer: SiteAnswer, now: datetime) -> dict[str, Any]:
    studies_found = [{"study_uid": s.study_uid, "study_date": s.study_date,
                      "description": s.description[:64], "modalities": s.modalities,
                      "instances": s.instances, "link": s.link} for s in answer.studies[:50]]
    return {"patient_key": key[:128], "site": answer.site[:16], "status": answer.status,
            "detail": (answer.detail or "")[:256], "found": len(answer.studies),
            "checked_at": now, "studies": json.dumps(studies_found)}


def _belongs(study: RemoteStudy, way: str, query: PatientQuery) -> bool:
    """Whether an answer to one way of asking is the patient searched for (sites that do not
    support a key answer too much, so every answer is checked)."""
    if way == BY_PATIENT_ID:
        return study.patient_id == query.nhs_number
    if way == BY_OTHER_IDS:
        return query.nhs_number in study.other_ids
    if way == BY_NAME:
        return (normalise_name(study.patient_name) == normalise_name(query.name)
                and study.birth_date == query.birth_date)
    return True


def _other_ids(item: dict[str, Any]) -> tuple[str, ...]:
    entries = (item.get("00101002") or {}).get("Value") or []
    return tuple(text_of(entry.get("00100020")) for entry in entries
                 if isinstance(entry, dict) and text_of(entry.get("00100020")))


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
        link="cannot link", here=False, other_ids=_other_ids(item))
