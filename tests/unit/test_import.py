"""`imageshare import`: folders, zip files and CD/DVD media with a DICOMDIR."""

from __future__ import annotations

import zipfile

from pydicom import dcmread
from pydicom.fileset import FileSet

from imageshare.archive.importing import Importer
from imageshare.domain.actors import cli_actor
from tests.factory import ct_series, us_cine


def test_cd_media_with_dicomdir_imports_every_listed_instance(archive, tmp_path):
    source = ct_series(tmp_path / "src", count=3, patient_id="CD1")
    cine = us_cine(tmp_path / "src", frames=5, patient_id="CD1", patient_name="Doe^Jane",
                   study_uid=dcmread(source[0]).StudyInstanceUID)
    media = tmp_path / "cdrom"
    fileset = FileSet()
    for path in [*source, cine]:
        fileset.add(dcmread(path))
    fileset.write(media)
    (media / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    report = Importer(archive.ingest).run([media], cli_actor())
    assert (report.stored, report.refused) == (4, [])
    assert len(report.studies) == 1


def test_import_of_a_dicomdir_file_reads_its_media(archive, tmp_path):
    media = tmp_path / "media"
    fileset = FileSet()
    for path in ct_series(tmp_path / "src", count=2, patient_id="CD2"):
        fileset.add(dcmread(path))
    fileset.write(media)
    report = Importer(archive.ingest).run([media / "DICOMDIR"], cli_actor())
    assert report.stored == 2


def test_folder_walk_skips_non_dicom_files_and_counts_duplicates(archive, tmp_path):
    folder = tmp_path / "export"
    ct_series(folder / "a", count=2, patient_id="W1")
    (folder / "readme.txt").write_text("not an image")
    first = Importer(archive.ingest).run([folder], cli_actor())
    again = Importer(archive.ingest).run([folder], cli_actor())
    assert (first.stored, first.skipped) == (2, 1)
    assert (again.stored, again.duplicates) == (0, 2)


def test_zip_members_are_imported_without_extracting(archive, tmp_path):
    paths = ct_series(tmp_path / "src", count=2, patient_id="Z1")
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as bundle:
        for p in paths:
            bundle.write(p, f"DICOM/{p.name}")
    report = Importer(archive.ingest).run([tmp_path / "study.zip"], cli_actor())
    assert report.stored == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src", "study.zip"]
