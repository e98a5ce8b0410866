"""Names the archive acts under are never given to an account; every CSV the archive writes
(the audit export, the review logbook) quotes what a spreadsheet would run as a formula."""

from __future__ import annotations

import csv

import pytest

from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ImageShareError
from tests.conftest import make_archive


@pytest.mark.parametrize("name", ["system", "System", "imageshare", "anonymous"])
def test_the_names_imageshare_acts_under_are_reserved(archive, name):
    with pytest.raises(ImageShareError, match="reserved"):
        archive.users.add(name, "a-long-password", "clinician")


def test_the_audit_export_as_csv_quotes_formulas(tmp_path, imageshare):
    built = make_archive(tmp_path)
    try:
        built.audit.record(AuditEvent(cli_actor(), "study.view", "success",
                                      patient_id="\t=HYPERLINK(\"http://x\")",
                                      study_uid="1.2.3"))
    finally:
        built.close()
    out = tmp_path / "audit.csv"
    ran = imageshare(tmp_path / "data", "audit", "export", "--format", "csv", "--out",
                     str(out))
    assert ran.returncode == 0, ran.stderr
    rows = list(csv.DictReader(out.open()))
    [viewed] = [r for r in rows if r["action"] == "study.view"]
    assert viewed["patient_id"].startswith("'")
