"""Every file of pydicom's test set and of pydicom-data (the valid and the deliberately broken
ones) stored, then asked for in every way: no answer may fail because of a stored value.

QIDO-RS at study, series and instance level with includefield=all, WADO-RS metadata (JSON
and XML), C-FIND at every level over one real listener, and /rendered for every stored
instance: no 500, no failed C-FIND, no dropped association; whatever ingest refuses, it
refuses with a reason.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import pydicom.data
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from imageshare.dicom.scp import DicomListener
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ConflictingInstance, InvalidInstance
from imageshare.exchange.nodes import Node

ACTOR = cli_actor()
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Return keys asked at each level (indexed ones and ones read from stored headers).
KEYS = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "OtherPatientIDsSequence", "PatientWeight"),
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "ReferringPhysicianName", "PatientAge"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDate",
               "OperatorsName", "SoftwareVersions"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames", "Rows",
              "ImageComments", "SliceThickness", "WindowCenter", "AcquisitionDateTime",
              "ImageType", "PixelSpacing"),
}


def _test_files() -> list[Path]:
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # pydicom-data

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())


def _store_all(archive) -> tuple[list, list]:
    stored, refused = [], []
    for path in _test_files():
        try:
            result = archive.ingest.store_copy(path, ACTOR)
        except (InvalidInstance, ConflictingInstance) as exc:
            refused.append((path.name, str(exc)))
            continue
        if result.outcome in ("stored", "replaced"):
            stored.append(result)
    return stored, refused


def test_every_pydicom_test_file_is_refused_with_a_reason_or_answered_everywhere(
    archive, client
):
    started = time.monotonic()
    files = _test_files()
    assert len(files) > 200, "pydicom's test files and pydicom-data must be installed"
    stored, refused = _store_all(archive)
    assert len(stored) > 100
    assert all(reason.strip() for _, reason in refused), refused

    studies = {r.study_uid for r in stored}
    series = {(r.study_uid, r.series_uid) for r in stored}
    failures = []

    def check(response, what):
        if response.status_code >= 500:
            failures.append((what, response.status_code))

    for level in ("studies", "series", "instances"):
        for offset in range(0, len(stored) + 1000, 1000):
            check(client.get(f"/dicomweb/{level}", params={
                "includefield": "all", "limit": 1000, "offset": offset}), level)
    for study in studies:
        check(client.get(f"/dicomweb/studies/{study}/instances",
                         params={"includefield": "all"}), f"instances of {study}")
        check(client.get(f"/dicomweb/studies/{study}/metadata"), f"metadata {study}")
        check(client.get(f"/dicomweb/studies/{study}/metadata",
                         headers={"Accept": "application/dicom+xml"}), f"xml {study}")
    for study, one in series:
        check(client.get(f"/dicomweb/studies/{study}/series/{one}/instances",
                         params={"includefield": "all"}), f"series {one}")
    rendered = {}
    for result in stored:
        response = client.get(
            f"/dicomweb/studies/{result.study_uid}/series/{result.series_uid}/instances/"
            f"{result.sop_instance_uid}/rendered")
        check(response, f"rendered {result.sop_instance_uid}")
        rendered[response.status_code] = rendered.get(response.status_code, 0) + 1
    assert failures == []
    assert rendered.get(200, 0) > 60, rendered

    find_failures = _c_find_everything(archive, studies)
    assert find_failures == []
    assert time.monotonic() - started < 120


def _c_find_everything(archive, studies) -> list:
    archive.nodes.add(Node("SWEEP", "127.0.0.1", 104))
    temporary_folder = tempfile.tempdir  # the listener points it at its staging folder
    listener = DicomListener(
        "IMAGESHARE", 0, "127.0.0.1", archive.ingest, archive.query, archive.retrieve,
        archive.nodes, archive.policy,
    )
    listener.start()
    failures = []
    try:
        ae = AE(ae_title="SWEEP")
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="IMAGESHARE")
        assert assoc.is_established

        def find(model, level: str, **keys) -> int:
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            for key_level, keywords in KEYS.items():
                if LEVELS.index(key_level) > LEVELS.index(level):
                    continue
                for keyword in keywords:
                    setattr(ds, keyword, keys.get(keyword, ""))
            count = 0
            for status, _identifier in assoc.send_c_find(ds, model):
                if status is None or status.Status not in (0xFF00, 0xFF01, 0x0000):
                    failures.append((level, keys, status and hex(status.Status)))
                    return count
                count += 1
            return count

        assert find(PatientRootQueryRetrieveInformationModelFind, "PATIENT") > 0
        assert find(StudyRootQueryRetrieveInformationModelFind, "STUDY") > 0
        for study in studies:
            find(StudyRootQueryRetrieveInformationModelFind, "SERIES", StudyInstanceUID=study)
            find(StudyRootQueryRetrieveInformationModelFind, "IMAGE", StudyInstanceUID=study)
        assert assoc.is_established, "the association was dropped"
        assoc.release()
    finally:
        # DicomListener.stop raises ValueError for a server pynetdicom did not register
        # (issue 10, item 20, mended separately); the server is shut down all the same.
        with contextlib.suppress(ValueError):
            listener.stop()
        tempfile.tempdir = temporary_folder
    return failures

