"""A deletion is filed under the DICOM audit event that says what happened (PS3.15 A.5.3):
a study that went as a whole is a Study Deleted (110105, D); some instances of a study that
stays are DICOM Instances Accessed with action D (110103), not a study deletion a repository
would count as the study gone."""

from __future__ import annotations

import json

from lxml import etree
from sqlalchemy import select, update

from imageshare.audit.atna import AtnaConfig, audit_message
from imageshare.domain.actors import cli_actor
from imageshare.storage.index.schema import instances
from tests.factory import ct_series


def _event_id(row: dict) -> tuple[str, str]:
    message = audit_message({**row, "detail": json.dumps(row["detail"])},
                            AtnaConfig("127.0.0.1", 514))
    ident = etree.fromstring(message).find("EventIdentification")
    return ident.find("EventID").get("csd-code"), ident.get("EventActionCode")


def test_part_of_a_study_is_instances_accessed_and_the_rest_a_study_deleted(archive, tmp_path):
    paths = ct_series(tmp_path / "s", count=3, patient_id="DEL1")
    for path in paths:
        archive.ingest.store_copy(path, cli_actor())
    with archive.engine.begin() as conn:  # in the inbox, which a rejection deletes
        conn.execute(update(instances).values(retention_class="inbox"))
        sops = sorted(conn.execute(select(instances.c.sop_uid)).scalars())
    classes = ["inbox"]

    archive.deletion.instances(sops[:1], cli_actor(), "wrong slice", only_classes=classes)
    [partial] = list(archive.audit.events("instance.delete"))
    assert partial["instance_count"] == 1 and partial["outcome"] == "success"
    assert _event_id(partial) == ("110103", "D")
    assert list(archive.audit.events("study.delete")) == []

    archive.deletion.instances(sops[1:], cli_actor(), "wrong study", only_classes=classes)
    [whole] = list(archive.audit.events("study.delete"))
    assert whole["instance_count"] == 2 and whole["patient_id"] == "DEL1"
    assert _event_id(whole) == ("110105", "D")
