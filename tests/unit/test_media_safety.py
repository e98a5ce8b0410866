"""Importing media (DICOMDIR, folders, zip files) opens nothing outside the media and follows
no symbolic link; refusals name the entry as the media writes it, never what it points at."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet

from imageshare.archive.importing import Importer
from imageshare.deid.service import deidentify_inputs
from imageshare.domain.actors import cli_actor
from tests.conftest import ROOT
from tests.factory import ct_series

ACTOR = cli_actor()


def _media_pointing_at(tmp_path: Path, *references: list[str]) -> Path:
    """CD media with two good instances whose DICOMDIR also lists ``references``."""
    media = tmp_path / "cdrom"
    fileset = FileSet()
    for path in ct_series(tmp_path / "src", count=2, patient_id="MEDIA1"):
        fileset.add(dcmread(path))
    fileset.write(media)
    ds = dcmread(media / "DICOMDIR")
    records = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    template = records[0]
    for reference in references:
        from copy import deepcopy

        record = deepcopy(template)
        record.ReferencedFileID = reference
        ds.DirectoryRecordSequence.append(record)
    ds.save_as(media / "DICOMDIR", enforce_file_format=True)
    return media


def _secret_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    secret = ct_series(outside, count=1, patient_id="SECRET1")[0]
    return secret.rename(outside / "secret.dcm")


def _patients(archive) -> set[str]:
    from sqlalchemy import select

    from imageshare.storage.index.schema import patients

    with archive.engine.connect() as conn:
        return set(conn.execute(select(patients.c.patient_id)).scalars())


def test_dicomdir_references_outside_the_media_are_refused_without_opening_them(
        archive, tmp_path):
    secret = _secret_outside(tmp_path)
    media = _media_pointing_at(
        tmp_path, ["..", "outside", "secret.dcm"], "../outside/secret.dcm",
        ["..", "..", "..", "..", "..", "..", "etc", "passwd"], "/etc/passwd", ["", "x"])
    report = Importer(archive.ingest).run([media], ACTOR)
    assert report.stored == 2
    assert _patients(archive) == {"MEDIA1"}
    refused = dict(report.refused)
    assert len(refused) == 5
    assert refused[f"{media / 'DICOMDIR'}: ..\\outside\\secret.dcm"] == (
        "outside the media (refused)")
    assert f"{media / 'DICOMDIR'}: ..\\..\\..\\..\\..\\..\\etc\\passwd" in refused
    text = repr(report.refused)
    assert str(secret) not in text and "root:" not in text


def test_a_dicomdir_path_through_a_symbolic_link_is_not_followed(archive, tmp_path):
    _secret_outside(tmp_path)
    media = _media_pointing_at(tmp_path, ["LINKED", "secret.dcm"], ["ALIAS.DCM"])
    (media / "LINKED").symlink_to(tmp_path / "outside", target_is_directory=True)
    (media / "ALIAS.DCM").symlink_to(tmp_path / "outside" / "secret.dcm")
    report = Importer(archive.ingest).run([media], ACTOR)
    assert _patients(archive) == {"MEDIA1"}
    refused = dict(report.refused)
    assert refused[f"{media / 'DICOMDIR'}: LINKED\\secret.dcm"].startswith("a symbolic link")
    assert refused[f"{media / 'DICOMDIR'}: ALIAS.DCM"] == "a symbolic link (not followed)"


def test_symbolic_links_in_a_folder_are_refused_by_name_and_not_followed(archive, tmp_path):
    secret = _secret_outside(tmp_path)
    folder = tmp_path / "usb"
    ct_series(folder / "study", count=1, patient_id="USB1")
    (folder / "study" / "link.dcm").symlink_to(secret)
    (folder / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    report = Importer(archive.ingest).run([folder], ACTOR)
    assert _patients(archive) == {"USB1"}
    refused = dict(report.refused)
    assert refused[str(folder / "study" / "link.dcm")] == "a symbolic link (not followed)"
    assert refused[str(folder / "elsewhere")] == "a symbolic link (not followed)"
    assert str(secret) not in repr(report.refused)


def test_special_files_are_refused_without_hanging(archive, tmp_path):
    folder = tmp_path / "usb"
    ct_series(folder, count=1, patient_id="USB2")
    os.mkfifo(folder / "pipe.dcm")
    report = Importer(archive.ingest).run([folder], ACTOR)
    assert report.stored == 1
    assert dict(report.refused)[str(folder / "pipe.dcm")] == "not a regular file (refused)"


def test_zip_members_that_are_links_or_escape_are_refused(archive, tmp_path):
    good = ct_series(tmp_path / "src", count=1, patient_id="ZIP1")[0]
    bundle = tmp_path / "study.zip"
    with zipfile.ZipFile(bundle, "w") as out:
        out.write(good, "DICOM/IM1")
        out.writestr("../escape.dcm", good.read_bytes())
        link = zipfile.ZipInfo("DICOM/LINK")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        out.writestr(link, "/etc/passwd")
    report = Importer(archive.ingest).run([bundle], ACTOR)
    assert report.stored == 1
    refused = dict(report.refused)
    assert refused[f"{bundle}!../escape.dcm"] == "unsafe path in zip file (refused)"
    assert refused[f"{bundle}!DICOM/LINK"] == "a symbolic link in the zip file (not followed)"


def test_deidentify_walks_media_with_the_same_care(tmp_path):
    from imageshare.deid.setup import deidentifier_for
    from imageshare.export.writers import FolderWriter
    from imageshare.settings import load_settings

    _secret_outside(tmp_path)
    media = _media_pointing_at(tmp_path, ["..", "outside", "secret.dcm"])
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    deidentify_inputs([media], deidentifier_for(settings, "basic"),
                      FolderWriter(tmp_path / "out"))
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2


def test_the_import_command_names_the_entry_and_never_the_target(tmp_path):
    secret = _secret_outside(tmp_path)
    media = _media_pointing_at(tmp_path, ["..", "outside", "secret.dcm"],
                               ["..", "..", "..", "..", "..", "..", "etc", "passwd"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESHARE_")}
    env["IMAGESHARE_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "imageshare", "import", "--quiet", str(media)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 1
    assert "refused: " in done.stdout and "..\\outside\\secret.dcm" in done.stdout
    assert "..\\etc\\passwd: outside the media (refused)" in done.stdout
    assert str(secret) not in done.stdout + done.stderr
    assert "root:" not in done.stdout + done.stderr
