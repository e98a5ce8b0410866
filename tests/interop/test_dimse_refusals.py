"""Refusals real DCMTK tools get from the listener (a tester's conformance defects): an
impossible date or time in a C-FIND key is answered A900 with the reason (PS3.4 C.4.1); a
Modality Worklist context is rejected as "abstract syntax not supported" while storage SOP
classes nobody registered with the listener (a private one, a standard one newer than the
listener) are still accepted and stored; a C-GET whose every sub-operation fails ends A702.

One ImageShare server serves every test of this module.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer

pytestmark = pytest.mark.interop

PRIVATE_STORAGE = "1.3.6.1.4.1.9590.100.1.2.777"
NEWER_STORAGE = "1.2.840.10008.5.1.4.1.1.9999.1"  # under the storage arc, in no list yet
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
# A storescu profile proposing a worklist context beside the two storage classes.
PROFILE = f"""\
[[TransferSyntaxes]]

[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]

[Mixed]
PresentationContext1 = {WORKLIST_FIND}\\Uncompressed
PresentationContext2 = {PRIVATE_STORAGE}\\Uncompressed
PresentationContext3 = {NEWER_STORAGE}\\Uncompressed

[[Profiles]]

[Mixed]
PresentationContexts = Mixed
"""


@dataclass
class Site:
    server: RunningServer
    folder: Path
    profile: Path
    study_date: str


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    for tool in ("findscu", "getscu", "storescu"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("refusals")
    server = RunningServer(folder / "server-data",
                           extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    try:
        for ae in ("FINDSCU", "GETSCU"):
            server.cli("node", "add", ae, "--host", "127.0.0.1", "--port", "104")
        stored = ct_series(folder / "dated", count=1, patient_id="DATED",
                           StudyDate="20240105", StudyTime="143015")
        result = _run("storescu", "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1",
                      str(server.dicom_port), *map(str, stored))
        assert result.returncode == 0, result.stderr
        profile = folder / "mixed.cfg"
        profile.write_text(PROFILE)
        yield Site(server, folder, profile, "20240105")
    finally:
        server.stop()


def _findscu(site: Site, *keys: str) -> subprocess.CompletedProcess[str]:
    args = ["findscu", "-d", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID"]
    for key in keys:
        args += ["-k", key]
    return _run(*args, "127.0.0.1", str(site.server.dicom_port))


def _private_instance(site: Site, name: str, sop_class: str) -> Path:
    (path,) = ct_series(site.folder / name, count=1, patient_id=name.upper())
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(path)
    return path


def _store_with_profile(site: Site, *paths: Path) -> subprocess.CompletedProcess[str]:
    return _run("storescu", "-d", "-xf", str(site.profile), "Mixed", "-aet", "STORESCU",
                "-aec", site.server.ae_title, "127.0.0.1", str(site.server.dicom_port),
                *map(str, paths))


def test_findscu_with_an_impossible_date_or_time_gets_a900_naming_it(site):
    for key, reason in (("StudyDate=20241315", "StudyDate: '20241315' is not a date: there "
                         "is no month 13"),
                        ("StudyDate=20241301-20241302", "there is no month 13"),
                        ("StudyTime=256099", "StudyTime: '256099' is not a time: hour 25")):
        refused = _findscu(site, key)
        assert "0xa900" in refused.stderr, (key, refused.stderr)
        assert reason in refused.stderr, (key, refused.stderr)
    legal = _findscu(site, "StudyDate=20240101-20240131", "StudyTime=14")
    assert legal.returncode == 0 and "0xa900" not in legal.stderr, legal.stderr
    assert "[DATED" in legal.stderr, legal.stderr  # the one match, dumped by -d


def test_qido_with_an_impossible_date_is_answered_400_by_the_running_server(site):
    with site.server.http() as http:
        refused = http.get("/dicomweb/studies", params={"StudyDate": "20241315"})
        found = http.get("/dicomweb/studies", params={"StudyDate": "2024.01.05"})
    assert refused.status_code == 400
    assert "StudyDate" in refused.json()["detail"] and "month 13" in refused.json()["detail"]
    assert [s["00100020"]["Value"] for s in found.json()] == [["DATED"]]


def test_findscu_worklist_query_is_refused_as_an_abstract_syntax_not_supported(site):
    result = _run("findscu", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-W",
                  "-k", "PatientID", "127.0.0.1", str(site.server.dicom_port))
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stderr, result.stderr


def test_storescu_stores_private_and_newer_storage_classes_beside_a_rejected_worklist(site):
    private = _private_instance(site, "private", PRIVATE_STORAGE)
    newer = _private_instance(site, "newer", NEWER_STORAGE)
    result = _store_with_profile(site, private, newer)
    assert result.returncode == 0, result.stderr
    log = result.stderr.replace("\r", "")
    assert "(Abstract Syntax Not Supported)\nD:     Abstract Syntax: =FINDModalityWorklist" in log
    for uid in (PRIVATE_STORAGE, NEWER_STORAGE):
        assert f"(Accepted)\nD:     Abstract Syntax: {uid}" in log, log
    assert log.count("DIMSE Status                  : 0x0000: Success") == 2, log
    with site.server.http() as http:
        for path in (private, newer):
            ds = dcmread(path, stop_before_pixels=True)
            (found,) = http.get("/dicomweb/instances", params={
                "SOPInstanceUID": ds.SOPInstanceUID}).json()
            assert found["00080016"]["Value"] == [ds.SOPClassUID]


def test_getscu_of_a_study_it_can_take_nothing_of_ends_a702(site, tmp_path):
    path = _private_instance(site, "ungettable", PRIVATE_STORAGE)
    assert _store_with_profile(site, path).returncode == 0
    study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    result = _run("getscu", "-d", "-aet", "GETSCU", "-aec", site.server.ae_title, "-S",
                  "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "127.0.0.1",
                  str(site.server.dicom_port))
    assert "0xa702" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
    with httpx.Client() as client:  # the server keeps answering
        assert client.get(site.server.url + "/healthz").status_code == 200
