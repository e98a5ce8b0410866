"""A study's and a series' counts and a study's modalities describe the patient record only:
instances waiting for a person's decision (retention classes ``inbox``, ``held``,
``upload``) no longer count in them until accepted.

Existing data: only studies holding such instances are summarised again; every other
study's counts were already those of its record. And a patient known only from arrivals
waiting for review (another hospital's study of a patient with no record here) is filed under
issuer ``inbox:...``, as such arrivals now are, so that what they say of the patient does not
become the record of its Patient ID (our own images of that ID make their own record; an
acceptance files the study there, or is refused when the two name different people). The
downgrade leaves those issuers as they are.

Revision ID: 0029
"""

import sqlalchemy as sa
from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None

_WAITING = ("inbox", "held", "upload")


def upgrade() -> None:
    _summarise(record_only=True)
    _file_waiting_patients_for_review()


def downgrade() -> None:
    _summarise(record_only=False)


def _summarise(record_only: bool) -> None:
    """Summarise again the studies holding waiting instances: their record alone, or (as
    before this revision) everything they hold."""
    conn = op.get_bind()
    studies = sa.table("studies", sa.column("pk"), sa.column("num_series"),
                       sa.column("num_instances"), sa.column("modalities"))
    series = sa.table("series", sa.column("pk"), sa.column("study_pk"),
                      sa.column("modality"), sa.column("num_instances"))
    instances = sa.table("instances", sa.column("pk"), sa.column("series_pk"),
                         sa.column("retention_class"))
    waiting = conn.execute(sa.select(series.c.study_pk).distinct().join(
        instances, instances.c.series_pk == series.c.pk).where(
        instances.c.retention_class.in_(_WAITING))).scalars().all()
    counts = instances.c.series_pk == series.c.pk
    if record_only:
        counts = sa.and_(counts, instances.c.retention_class.not_in(_WAITING))
    for study_pk in waiting:
        counted = conn.execute(
            sa.select(series.c.pk, series.c.modality, sa.func.count(instances.c.pk))
            .select_from(series.outerjoin(instances, counts))
            .where(series.c.study_pk == study_pk)
            .group_by(series.c.pk, series.c.modality)).all()
        for series_pk, _modality, count in counted:
            conn.execute(sa.update(series).where(series.c.pk == series_pk)
                         .values(num_instances=count))
        shown = [(modality, count) for _pk, modality, count in counted if count]
        conn.execute(sa.update(studies).where(studies.c.pk == study_pk).values(
            num_series=len(shown), num_instances=sum(count for _m, count in shown),
            modalities="\\".join(sorted({m for m, _c in shown if m}))[:128]))


def _file_waiting_patients_for_review() -> None:
    """Patients known only from arrivals waiting for review go under issuer inbox:."""
    conn = op.get_bind()
    patients = sa.table("patients", sa.column("pk"), sa.column("patient_id"),
                        sa.column("issuer"))
    studies = sa.table("studies", sa.column("pk"), sa.column("patient_pk"))
    series = sa.table("series", sa.column("pk"), sa.column("study_pk"))
    instances = sa.table("instances", sa.column("series_pk"), sa.column("retention_class"))
    of_patient = sa.and_(studies.c.patient_pk == patients.c.pk,
                         series.c.study_pk == studies.c.pk,
                         instances.c.series_pk == series.c.pk)
    waiting_only = conn.execute(
        sa.select(patients.c.pk, patients.c.patient_id, patients.c.issuer)
        .where(~patients.c.issuer.startswith("held:"), ~patients.c.issuer.startswith("review:"),
               ~patients.c.issuer.startswith("inbox:"),
               sa.exists().where(of_patient, instances.c.retention_class.in_(_WAITING)),
               ~sa.exists().where(of_patient, instances.c.retention_class.not_in(_WAITING)))
    ).all()
    for pk, patient_id, issuer in waiting_only:
        review = ("inbox:" + issuer)[:64]
        if conn.execute(sa.select(patients.c.pk).where(
                patients.c.patient_id == patient_id, patients.c.issuer == review)).first():
            continue  # one is there already: a person decides these arrivals as they are
        conn.execute(sa.update(patients).where(patients.c.pk == pk).values(issuer=review))
