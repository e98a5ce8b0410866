"""Conformance defects found in session 37 by sending the same requests to ImageShare and to
Orthanc with the same data (each test failed before its fix):

- a request sent on a presentation context negotiated for another SOP class was served:
  a C-STORE of a CT image on an association that negotiated only Verification, or only MR
  Image Storage, was stored and answered Success, and a Patient Root C-FIND, C-GET or
  C-MOVE sent on the Study Root context (the only one negotiated) was answered as if its
  model had been negotiated (pynetdicom serves a message by its Affected SOP Class UID,
  whatever the context). PS3.7 9.1 and PS3.8 7.1.1.13: the context's abstract syntax is
  the SOP class of what is sent on it. Now refused with 0122 (Refused: SOP Class not
  supported) and an Error Comment, nothing stored or sent;
- the final response of a C-GET or C-MOVE (Success, Warning) carried a Number of Remaining
  Sub-operations (0), which PS3.4 C.4.2.1.6 and C.4.3.1.3 reserve for Pending and Canceled
  responses (Orthanc leaves it out);
- QIDO-RS answered a search with exactly as many matches as one answer holds with a Warning
  that there were more (a viewer then offers a next page that is empty).

One ImageShare server serves the module; pynetdicom (the requester, the C-MOVE destination)
and DCMTK's findscu are the peers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer, free_port

pytestmark = pytest.mark.interop

NOT_SUPPORTED = 0x0122
COMMENT = "the SOP class was not negotiated on this presentation context"
MOST = 3  # IMAGESHARE_QIDO_MAX_LIMIT of the module's server


@dataclass
class Site:
    server: RunningServer
    study: str  # patient S37CT: two CT instances
    folder: Path
    destination_port: int  # where the C-MOVE destination S37DEST is registered


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    require_tool("findscu")
    folder = tmp_path_factory.mktemp("conformance37")
    server = RunningServer(folder / "server-data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "1", "IMAGESHARE_QIDO_MAX_LIMIT": str(MOST)}).start()
    try:
        destination_port = free_port()
        server.cli("node", "add", "S37SCU", "--host", "127.0.0.1", "--port", "104")
        server.cli("node", "add", "S37DEST", "--host", "127.0.0.1",
                   "--port", str(destination_port))
        files = ct_series(folder / "ct", count=2, size=8, patient_id="S37CT")
        for n in range(MOST):  # exactly as many studies of patient S37MANY as one answer holds
            files += ct_series(folder / f"many{n}", count=1, size=8, patient_id="S37MANY")
        ae = AE("PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
        yield Site(server, str(dcmread(files[0]).StudyInstanceUID), folder, destination_port)
    finally:
        server.stop()


def _associate(site: Site, ae_title: str, *contexts: str, **kwargs: Any) -> Any:
    ae = AE(ae_title)
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title,
                         **kwargs)
    assert assoc.is_established
    return assoc


def _on_first_context(assoc: Any) -> Any:
    """Make pynetdicom send every request on the association's first accepted context,
    whatever its SOP class (as a requester confusing its contexts does)."""
    context = assoc.accepted_contexts[0]
    assoc._get_valid_context = lambda *_args, **_kwargs: context
    return context


def _studies_of(site: Site, patient_id: str, out: Path) -> list[str]:
    """The Study Instance UIDs findscu finds for ``patient_id``."""
    out.mkdir()
    result = subprocess.run(
        ["findscu", "-aet", "S37SCU", "-aec", site.server.ae_title, "-S", "-X", "-od",
         str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_id}",
         "-k", "StudyInstanceUID", "127.0.0.1", str(site.server.dicom_port)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(str(dcmread(p).StudyInstanceUID) for p in out.iterdir())


@pytest.mark.parametrize("negotiated", [Verification, MRImageStorage])
def test_a_c_store_of_a_sop_class_not_negotiated_is_refused_and_not_stored(
        site, tmp_path, negotiated):
    """A sender that negotiated only Verification (or only MR Image Storage) and sends a CT
    image on that context gets 0122 with a comment, and the image is not in the archive
    (findscu finds no study of its patient)."""
    image = ct_series(tmp_path / "ct", count=1, size=8, patient_id="S37OFF")[0]
    assoc = _associate(site, "PYNETDICOM", negotiated)
    _on_first_context(assoc)
    status = assoc.send_c_store(dcmread(image))
    assoc.release()
    assert status.Status == NOT_SUPPORTED
    assert status.ErrorComment == COMMENT
    assert _studies_of(site, "S37OFF", tmp_path / "found") == []
    # The refusal is audited, and the caller listed for administrators with the reason.
    refused = site.server.cli("node", "refused").stdout
    assert "PYNETDICOM" in refused and COMMENT[:40] in refused
    events = site.server.cli("audit", "export", "--limit", "200").stdout
    assert '"outcome": "refused"' in events and "not negotiated" in events


def test_a_c_store_on_its_own_context_is_still_stored(site, tmp_path):
    image = ct_series(tmp_path / "ct", count=1, size=8, patient_id="S37OWN")[0]
    assoc = _associate(site, "PYNETDICOM", MRImageStorage, CTImageStorage)
    status = assoc.send_c_store(dcmread(image))
    assoc.release()
    assert status.Status == 0x0000
    assert _studies_of(site, "S37OWN", tmp_path / "found") == [
        str(dcmread(image).StudyInstanceUID)]


def test_a_c_find_of_a_model_not_negotiated_is_refused(site):
    """A Patient Root C-FIND sent on the Study Root context (the only one negotiated):
    refused with 0122, no match; the same query as Study Root finds the study."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "S37CT"
    query.StudyInstanceUID = ""
    assoc = _associate(site, "S37SCU", StudyRootQueryRetrieveInformationModelFind)
    answers = [(status.Status, identifier) for status, identifier in
               assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    assert answers[-1][0] == 0x0000 and answers[0][1].StudyInstanceUID == site.study
    _on_first_context(assoc)
    refused = list(assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [(s.Status, s.ErrorComment, i) for s, i in refused] == [
        (NOT_SUPPORTED, COMMENT, None)]


def test_a_c_get_of_a_model_not_negotiated_is_refused_and_sends_nothing(site):
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = site.study
    assoc = _associate(site, "S37SCU", StudyRootQueryRetrieveInformationModelGet, CTImageStorage,
                       ext_neg=[build_role(CTImageStorage, scp_role=True)],
                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
    _on_first_context(assoc)
    answers = list(assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert answers[-1][0].Status == NOT_SUPPORTED
    assert answers[-1][0].ErrorComment == COMMENT
    assert received == []


@contextmanager
def _destination(site: Site) -> Iterator[list[str]]:
    """The C-MOVE destination S37DEST listening; yields the SOP Instance UIDs it receives."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    destination = AE("S37DEST")
    for storage in (CTImageStorage, SecondaryCaptureImageStorage):  # (what a refusal proposes)
        destination.add_supported_context(storage)
    listening = destination.start_server(("127.0.0.1", site.destination_port), block=False,
                                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield received
    finally:
        listening.shutdown()


def _study_key(site: Site) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = site.study
    return query


def test_a_c_move_of_a_model_not_negotiated_is_refused_and_sends_nothing(site):
    with _destination(site) as received:
        assoc = _associate(site, "S37SCU", StudyRootQueryRetrieveInformationModelMove)
        _on_first_context(assoc)
        answers = list(assoc.send_c_move(_study_key(site), "S37DEST",
                                         PatientRootQueryRetrieveInformationModelMove))
        assoc.release()
    assert answers[-1][0].Status == NOT_SUPPORTED
    assert answers[-1][0].ErrorComment == COMMENT
    assert received == []


def _counts(status: Dataset) -> dict[str, int]:
    return {e.keyword: int(e.value) for e in status if e.keyword.startswith("NumberOf")}


def test_the_final_c_move_response_counts_no_remaining_sub_operations(site):
    """Pending responses count the sub-operations left; the final Success gives the
    completed, failed and warning counts only."""
    with _destination(site) as received:
        assoc = _associate(site, "S37SCU", StudyRootQueryRetrieveInformationModelMove)
        answers = [status for status, _ in assoc.send_c_move(
            _study_key(site), "S37DEST", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
    assert len(received) == 2
    assert [_counts(s)["NumberOfRemainingSuboperations"] for s in answers[:-1]] == [1, 0]
    assert answers[-1].Status == 0x0000
    assert _counts(answers[-1]) == {"NumberOfCompletedSuboperations": 2,
                                    "NumberOfFailedSuboperations": 0,
                                    "NumberOfWarningSuboperations": 0}


def test_the_final_c_get_response_counts_no_remaining_sub_operations(site):
    """A C-GET whose requester takes the SCP role for CT only, of a study with CT images:
    Success, and its final response has no Remaining count; one taking nothing gets the
    failure (A702) without one either."""
    for roles, final, completed, failed in (
            ([build_role(CTImageStorage, scp_role=True)], 0x0000, 2, 0),
            ([build_role(MRImageStorage, scp_role=True)], 0xA702, 0, 2)):
        assoc = _associate(site, "S37SCU", StudyRootQueryRetrieveInformationModelGet,
                           CTImageStorage, MRImageStorage, ext_neg=roles,
                           evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)])
        answers = [status for status, _ in assoc.send_c_get(
            _study_key(site), StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        assert answers[-1].Status == final
        assert _counts(answers[-1]) == {"NumberOfCompletedSuboperations": completed,
                                        "NumberOfFailedSuboperations": failed,
                                        "NumberOfWarningSuboperations": 0}


def test_qido_warns_only_when_matches_were_left_out(site):
    """QIDO-RS with exactly as many matches as one answer holds: all returned and no
    Warning; one more match: the answer is cut and the Warning says so."""
    with site.server.http() as http:
        exact = http.get("/dicomweb/studies", params={"PatientID": "S37MANY"})
        more = http.get("/dicomweb/studies", params={"PatientID": "S37*"})
    assert exact.status_code == 200 and len(exact.json()) == MOST
    assert "warning" not in exact.headers
    assert more.status_code == 200 and len(more.json()) == MOST
    assert more.headers["warning"].startswith(f'299 imageshare "There are more than {MOST}')
