"""What is part of the patient record.

Instances received from outside — another hospital's studies in the inbox, arrivals held for
reconciliation — are not part of the record until a person accepted them: every search,
query and retrieval leaves them out, and only the inbox (and its viewer) shows them.

An instance's retention class says whether it is part of the record; a series' or a study's
count of instances (kept by :mod:`imageshare.archive.indexing`, of the record's instances
alone) says whether it holds any, read from the row rather than looked for among instances.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists

from imageshare.storage.index.schema import instances, series, studies

# Retention classes of instances waiting for a person's decision ("upload": sent by a patient
# or partner, or imported by staff in the browser, waiting for quality control).
REVIEW_CLASSES = ("inbox", "held", "upload")


def instance_in_record() -> Any:
    """SQL condition: the instance row (``instances``) is part of the record."""
    return instances.c.retention_class.not_in(REVIEW_CLASSES)


def series_in_record() -> Any:
    """SQL condition: the series row (``series``) holds an instance of the record (its count
    is of the record's instances alone: see :mod:`imageshare.archive.indexing`)."""
    return series.c.num_instances > 0


def study_in_record() -> Any:
    """SQL condition: the study row (``studies``) holds an instance of the record."""
    return studies.c.num_instances > 0


def patient_in_record(patient_pk: Any) -> Any:
    """SQL condition: the patient (by its key column) has a study of the record."""
    outer = studies.alias("record_studies")
    return exists().where(outer.c.patient_pk == patient_pk, outer.c.num_instances > 0)
