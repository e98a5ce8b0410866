"""The counts and modalities kept on each study and series (what QIDO-RS, C-FIND and the
study list answer from) always equal what the record holds, however arrivals, acceptances and
rejections interleave: on SQLite and on PostgreSQL."""

from __future__ import annotations

import random

from sqlalchemy import and_, func, select

from imageshare.access.policy import INBOX
from imageshare.archive.record import instance_in_record
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ConflictingInstance
from imageshare.storage.index.schema import instances, series, studies
from tests.factory import ct_series

MODALITY = Actor("node", "CT_ROOM", "node", "CT_ROOM@10.0.0.5",
                 grants=frozenset({"dicom.store"}))
HOSPITALS = [Actor("node", name, "node", f"{name}@10.1.0.{n}",
                   grants=frozenset({"dicom.store", INBOX}))
             for n, name in enumerate(("DISTRICT", "COUNTY"), start=1)]
STAFF = cli_actor()


def _kept_and_held(archive) -> tuple[dict, dict]:
    """Per study: what its row says, and what its record instances say."""
    with archive.engine.connect() as conn:
        kept = {r.study_uid: (r.num_series, r.num_instances, r.modalities)
                for r in conn.execute(select(studies))}
        series_kept = {r.pk: r.num_instances for r in conn.execute(select(series))}
        rows = conn.execute(
            select(studies.c.study_uid, series.c.pk, series.c.modality,
                   func.count(instances.c.pk))
            .select_from(studies.join(series, series.c.study_pk == studies.c.pk)
                         .outerjoin(instances, and_(instances.c.series_pk == series.c.pk,
                                                    instance_in_record())))
            .group_by(studies.c.study_uid, series.c.pk, series.c.modality)).all()
    held: dict[str, tuple[int, int, str]] = {uid: (0, 0, "") for uid in kept}
    series_held = {}
    for uid, series_pk, modality, count in rows:
        series_held[series_pk] = count
        n_series, n_instances, modalities = held[uid]
        if count:
            listed = {m for m in modalities.split("\\") if m} | ({modality} - {""})
            held[uid] = (n_series + 1, n_instances + count, "\\".join(sorted(listed)))
    assert series_kept == series_held
    return kept, held


def test_summaries_equal_the_record_through_any_interleaving(any_archive, tmp_path):
    archive = any_archive
    rng = random.Random(20261202)
    study_uids = [f"1.2.826.0.1.3680043.10.99.{n}" for n in range(3)]
    series_of: dict[tuple[str, str], str] = {}
    for step in range(60):
        study = rng.choice(study_uids)
        modality = rng.choice(["CT", "MR", "US"])
        sender = rng.choice([MODALITY, *HOSPITALS])
        action = rng.random()
        if action < 0.7:
            extra = {"Modality": modality}
            if (study, modality) in series_of and rng.random() < 0.7:
                extra["SeriesInstanceUID"] = series_of[(study, modality)]
            path = ct_series(tmp_path / str(step), 1, patient_id="SUM1",
                             study_uid=study, **extra)[0]
            try:
                stored = archive.ingest.store_copy(path, sender)
            except ConflictingInstance as refused:  # ours, into a study waiting for review
                assert "waits for review" in str(refused) and sender is MODALITY
                continue
            series_of.setdefault((study, modality), stored.series_uid)
        else:
            pending = [i for i in archive.inbox.items() if i.status == "pending"]
            if not pending:
                continue
            item = rng.choice(pending)
            if action < 0.88:
                archive.inbox.accept(item.pk, STAFF, reconcile=False)
            else:
                archive.inbox.reject(item.pk, STAFF)
        kept, held = _kept_and_held(archive)
        assert kept == held, f"step {step}"
