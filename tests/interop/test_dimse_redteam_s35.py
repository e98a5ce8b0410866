"""C-FIND defects a real workstation hits, found by red-teaming the listener with DCMTK's
findscu and pynetdicom (each test failed before its fix):

- a requester naming its time zone in the query (Timezone Offset From UTC, which PS3.4
  C.2.2.2.5 defines as the zone of the query's dates and times) found nothing: the offset
  was matched as a key against the stored studies, and most studies store none (QIDO-RS,
  sharing the matching engine, alike);
- SOP Classes in Study as a matching key (find the studies that hold an ultrasound cine, or
  a structured report) never matched anything: it was matched on stored study attributes,
  where it is not kept, instead of on the study's instances;
- a sequence key answered every attribute of the stored items, where PS3.4 C.2.2.2.6 returns
  the item attributes the key's item names (those not stored with zero length); an empty
  item still asks for the whole items.

One ImageShare server serves the module.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, UltrasoundMultiFrameImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tests.conftest import require_tool
from tests.factory import ct_series, us_cine
from tests.peers import RunningServer

pytestmark = pytest.mark.interop


@dataclass
class Site:
    server: RunningServer
    ct_study: str  # patient S35CT: three CT instances, a Procedure Code Sequence of two items
    us_study: str  # patient S35US: one CT and one ultrasound cine


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "LN"
    item.CodeMeaning = meaning
    return item


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    for tool in ("findscu", "storescu"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("redteam35")
    server = RunningServer(folder / "server-data",
                           extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    try:
        server.cli("node", "add", "FINDSCU", "--host", "127.0.0.1", "--port", "104")
        ct = ct_series(folder / "ct", count=3, size=16, patient_id="S35CT",
                       StudyDate="20240105", StudyTime="083000",
                       ProcedureCodeSequence=[_code("CT100", "CT chest"),
                                              _code("CT200", "CT abdomen")])
        mixed = ct_series(folder / "mixed", count=1, size=16, patient_id="S35US",
                          StudyDate="20240301")
        cine = us_cine(folder / "us", frames=2, rows=8, cols=8, patient_id="S35US",
                       patient_name="Doe^Jane", study_uid=str(dcmread(mixed[0]).StudyInstanceUID))
        result = _run("storescu", "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1",
                      str(server.dicom_port), *map(str, [*ct, *mixed, cine]))
        assert result.returncode == 0, result.stderr
        yield Site(server, str(dcmread(ct[0]).StudyInstanceUID),
                   str(dcmread(mixed[0]).StudyInstanceUID))
    finally:
        server.stop()


def _findscu(site: Site, out: Path, *keys: str) -> list[Dataset]:
    """findscu on the Study Root model at STUDY level; the answers it wrote (-X)."""
    out.mkdir()
    args = ["findscu", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-S", "-X",
            "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID"]
    for key in keys:
        args += ["-k", key]
    result = _run(*args, "127.0.0.1", str(site.server.dicom_port))
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr, result.stderr
    return [dcmread(p) for p in sorted(out.iterdir())]


def _patients(answers: list[Dataset]) -> list[str]:
    return sorted(str(ds.PatientID) for ds in answers if str(ds.PatientID).startswith("S35"))


@pytest.mark.parametrize("offset", ["+0100", "-0500", "+0000"])
def test_a_query_naming_the_requesters_time_zone_still_finds_the_studies(
        site, tmp_path, offset):
    """A workstation that sends its Timezone Offset From UTC with every query (the zone of
    its date and time keys) finds the study by date, time and patient as one that does
    not; the offset is returned as stored (none here), never matched."""
    plain = _findscu(site, tmp_path / "plain", "PatientID=S35*", "StudyDate=20240101-20240131")
    zoned = _findscu(site, tmp_path / "zoned", "PatientID=S35*", "StudyDate=20240101-20240131",
                     "StudyTime=0800-0900", f"TimezoneOffsetFromUTC={offset}")
    assert _patients(plain) == _patients(zoned) == ["S35CT"]
    assert zoned[0].TimezoneOffsetFromUTC in ("", None)
    with site.server.http() as http:
        found = http.get("/dicomweb/studies", params={
            "PatientID": "S35CT", "TimezoneOffsetFromUTC": offset})
    assert found.status_code == 200, found.text
    assert [s["0020000D"]["Value"] for s in found.json()] == [[site.ct_study]]


@pytest.mark.parametrize(("classes", "expected"), [
    (UltrasoundMultiFrameImageStorage, ["S35US"]),
    (CTImageStorage, ["S35CT", "S35US"]),
    (f"1.2.840.10008.5.1.4.1.1.88.22\\{UltrasoundMultiFrameImageStorage}", ["S35US"]),
    ("1.2.840.10008.5.1.4.1.1.88.22", []),
])
def test_sop_classes_in_study_matches_the_classes_of_the_studys_instances(
        site, tmp_path, classes, expected):
    """SOP Classes in Study as a key (a list of UIDs: any of them) finds the studies holding
    an instance of that class, and answers all of the study's classes."""
    answers = _findscu(site, tmp_path / "found", "PatientID=S35*",
                       f"SOPClassesInStudy={classes}")
    assert _patients(answers) == expected
    for ds in answers:
        if ds.PatientID == "S35US":
            assert sorted(ds.SOPClassesInStudy) == sorted(
                [CTImageStorage, UltrasoundMultiFrameImageStorage])


def test_a_sequence_key_returns_only_the_item_attributes_it_names(site, tmp_path):
    """Procedure Code Sequence with an item naming Code Value (matched, wild card) and Coding
    Scheme Version (not stored): every stored item comes back with those two attributes
    only, the second with zero length; no Coding Scheme Designator, no Code Meaning."""
    (answer,) = _findscu(site, tmp_path / "found", "PatientID=S35CT",
                         "ProcedureCodeSequence[0].CodeValue=CT*",
                         "ProcedureCodeSequence[0].CodingSchemeVersion")
    items = answer.ProcedureCodeSequence
    assert [item.CodeValue for item in items] == ["CT100", "CT200"]
    for item in items:
        assert sorted(element.keyword for element in item) == [
            "CodeValue", "CodingSchemeVersion"]
        assert item.CodingSchemeVersion in ("", None)


def test_an_empty_sequence_item_still_asks_for_whole_items(site):
    """pynetdicom as the requester: a sequence key with one empty item returns the stored
    items whole; a key item that does not match any stored item finds nothing."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title)
    assert assoc.is_established
    try:
        def find(item: Dataset) -> list[Dataset]:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = "S35CT"
            ds.ProcedureCodeSequence = [item]
            answers = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
            assert answers[-1][0].Status == 0x0000
            return [identifier for _status, identifier in answers if identifier is not None]

        (whole,) = find(Dataset())
        assert [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning)
                for i in whole.ProcedureCodeSequence] == [
            ("CT100", "LN", "CT chest"), ("CT200", "LN", "CT abdomen")]
        other = Dataset()
        other.CodeValue = "MR100"
        assert find(other) == []
    finally:
        assoc.release()
