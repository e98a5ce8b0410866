"""Conformance defects a tester found in the DICOM listener and QIDO-RS:

- a date or time key that names no real day or time of day (``StudyDate=20241315``, a range
  of such dates, ``StudyTime=256099``) is refused with the reason: C-FIND A900 with an Error
  Comment (PS3.4 C.4.1), QIDO-RS 400 with a problem document (PS3.18); the legal forms
  (``YYYYMMDD``, the old ``YYYY.MM.DD``, ranges, partial times) are still answered;
- the listener accepts presentation contexts for storage only besides the services it
  offers: Modality Worklist, MPPS, Storage Commitment, print and made-up standard UIDs are
  rejected as "abstract syntax not supported", while storage SOP classes it has never heard
  of (a new standard one, a private one) are still accepted and stored;
- C-GET answers A702 when every sub-operation failed, as the conformance statement says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from imageshare.app import _make_listener
from imageshare.archive.query import Query
from imageshare.dicom import statuses
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import InvalidQuery
from imageshare.exchange.nodes import Node
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, free_port

# pydicom warns about the impossible values these tests send on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")
ACTOR = cli_actor()
STUDY_DATE, STUDY_TIME = "20240105", "143015"
# Keys that name no real date or time, with what the refusal must say.
IMPOSSIBLE = [
    ("StudyDate", "20241315", "month 13"),
    ("StudyDate", "20241301-20241302", "month 13"),
    ("StudyDate", "20240230", "no day 30"),
    ("StudyDate", "20230229", "no day 29"),
    ("StudyDate", "-20241332", "month 13"),
    ("StudyDate", "2024.13.01", "month 13"),
    ("StudyDate", "20240105\\20241315", "month 13"),
    ("StudyTime", "256099", "hour 25"),
    ("StudyTime", "2400", "hour 24"),
    ("StudyTime", "1060", "minute 60"),
    ("StudyTime", "143061", "second 61"),
    ("StudyTime", "1400-2500", "hour 25"),
    ("PatientBirthDate", "19801301", "month 13"),
    ("SeriesDate", "20241315", "month 13"),  # matched on stored values, not in SQL
    ("SeriesTime", "256099", "hour 25"),
    ("AcquisitionDateTime", "2024131512", "month 13"),
    ("AcquisitionDateTime", "2024010525", "hour 25"),
]
# Legal keys (every one finds the stored study) that must still be answered.
LEGAL = [
    ("StudyDate", "20240105"), ("StudyDate", "2024.01.05"), ("StudyDate", "-20240105"),
    ("StudyDate", "20240105-"), ("StudyDate", "20240101-20240131"),
    ("StudyDate", "20240229-20240301\\20240105"), ("StudyTime", "14"), ("StudyTime", "1430"),
    ("StudyTime", "143015"), ("StudyTime", "143014.5-143016"), ("StudyTime", "14:30:15"),
    ("StudyTime", "1400-235960"), ("SeriesDate", "20240105"), ("SeriesTime", "1430-1431"),
    ("AcquisitionDateTime", "202401051430"), ("AcquisitionDateTime", "2024-2025"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    """An archive holding one CT study of 5 January 2024, 14:30:15, served by a listener."""
    tmp = tmp_path_factory.mktemp("dates")
    archive = make_archive(tmp, dicom_port=free_port(), dicom_processes=1)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    (stored,) = ct_series(tmp / "stored", count=1, patient_id="DATES1",
                          StudyDate=STUDY_DATE, StudyTime=STUDY_TIME, SeriesDate=STUDY_DATE,
                          SeriesTime=STUDY_TIME, PatientBirthDate="19800101",
                          AcquisitionDateTime=STUDY_DATE + STUDY_TIME)
    archive.ingest.store_copy(stored, ACTOR)
    archive.nodes.add(Node("TESTER", "127.0.0.1", 104))
    listener = _make_listener(archive, shared_port=False)
    listener.start()
    yield {"archive": archive, "port": listener.port, "stored": dcmread(stored), "tmp": tmp}
    listener.stop()
    archive.close()


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _search(archive, keyword: str, value: str) -> list:
    ds = _identifier("IMAGE", **{keyword: value})
    del ds.QueryRetrieveLevel
    ds.SOPClassUID = ""
    return archive.query.find(Query("IMAGE", ds.to_json_dict()), ACTOR)


def _associate(port: int, *contexts: str, roles: tuple = ()) -> object:
    ae = AE(ae_title="TESTER")
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", ext_neg=list(roles))
    assert assoc.is_established
    return assoc


# -- 1. dates and times ----------------------------------------------------------------------


@pytest.mark.parametrize(("keyword", "value", "reason"), IMPOSSIBLE)
def test_a_key_naming_no_real_date_or_time_is_refused_with_the_attribute_and_reason(
    site, keyword, value, reason
):
    with pytest.raises(InvalidQuery, match=reason) as refused:
        _search(site["archive"], keyword, value)
    assert str(refused.value).startswith(f"{keyword}: "), refused.value


def test_an_impossible_date_is_refused_even_where_nothing_is_stored_to_compare(tmp_path):
    archive = make_archive(tmp_path)
    try:
        with pytest.raises(InvalidQuery, match="month 13"):
            _search(archive, "SeriesDate", "20241315")
        with pytest.raises(InvalidQuery, match="hour 25"):
            _search(archive, "ContentTime", "256099")
    finally:
        archive.close()


@pytest.mark.parametrize(("keyword", "value"), LEGAL)
def test_legal_dates_times_and_ranges_are_still_answered(site, keyword, value):
    assert [m.patient_id for m in _search(site["archive"], keyword, value)] == ["DATES1"]


def test_storage_sop_classes_are_recognised_without_taking_other_services():
    from imageshare.dicom.contexts import is_storage_sop_class

    assert is_storage_sop_class(CTImageStorage)
    assert is_storage_sop_class("1.2.840.10008.5.1.4.1.1.9999.1")  # a storage class to come
    assert is_storage_sop_class("1.3.6.1.4.1.9590.100.1.2.777")  # private
    for uid in (ModalityWorklistInformationFind, ModalityPerformedProcedureStep,
                StorageCommitmentPushModel, "1.2.840.10008.5.1.1.9",  # print
                "1.2.840.10008.5.1.4.1.1.201.2",  # Inventory FIND, under the storage arc
                "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage (no patient)
                "1.2.840.10008.9.9.9", "1.02.3", "x"):
        assert not is_storage_sop_class(uid), uid


def test_c_find_with_an_impossible_date_answers_a900_with_the_reason(site):
    assoc = _associate(site["port"], StudyRootQueryRetrieveInformationModelFind)
    try:
        for keyword, value, reason in (("StudyDate", "20241315", "month 13"),
                                       ("StudyDate", "20241301-20241302", "month 13"),
                                       ("StudyTime", "256099", "hour 25")):
            answers = list(assoc.send_c_find(_identifier("STUDY", **{keyword: value}),
                                             StudyRootQueryRetrieveInformationModelFind))
            ((status, identifier),) = answers
            assert status.Status == statuses.FIND_IDENTIFIER_MISMATCH.code == 0xA900
            assert identifier is None
            assert keyword in status.ErrorComment and reason in status.ErrorComment, (
                status.ErrorComment)
            assert len(status.ErrorComment) <= 64
        answers = list(assoc.send_c_find(_identifier("STUDY", StudyDate="20240101-20240131"),
                                         StudyRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in answers] == [0xFF00, 0x0000]
    finally:
        assoc.release()


def test_qido_with_an_impossible_date_answers_400_with_a_clear_reason(site):
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import act_as_admin

    with TestClient(create_app(site["archive"])) as client:
        act_as_admin(client, site["archive"])
        for keyword, value, reason in (("StudyDate", "20241315", "month 13"),
                                       ("StudyDate", "20241301-20241302", "month 13"),
                                       ("StudyTime", "256099", "hour 25")):
            response = client.get("/dicomweb/studies", params={keyword: value})
            assert response.status_code == 400, (keyword, value)
            assert response.headers["content-type"].startswith("application/problem+json")
            detail = response.json()["detail"]
            assert keyword in detail and reason in detail, detail
        found = client.get("/dicomweb/studies", params={"StudyDate": "20240105"})
        assert found.status_code == 200 and len(found.json()) == 1


# -- 2. presentation contexts ---------------------------------------------------------------


def test_listener_rejects_worklist_and_other_services_it_does_not_offer_but_takes_storage(
    site
):
    new_standard, private = "1.2.840.10008.5.1.4.1.1.9999.1", "1.3.6.1.4.1.9590.100.1.2.777"
    proposed = [ModalityWorklistInformationFind, ModalityPerformedProcedureStep,
                StorageCommitmentPushModel, "1.2.840.10008.5.1.1.9", "1.2.840.10008.9.9.9",
                CTImageStorage, new_standard, private, Verification,
                StudyRootQueryRetrieveInformationModelFind]
    assoc = _associate(site["port"], *proposed)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        assert accepted == {CTImageStorage, new_standard, private, Verification,
                            StudyRootQueryRetrieveInformationModelFind}
        assert rejected == {uid: 0x03 for uid in proposed[:5]}  # abstract syntax not supported
    finally:
        assoc.release()


def _with_sop_class(path: Path, sop_class: str) -> Dataset:
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.9999.1",
                                       "1.3.6.1.4.1.9590.100.1.2.777"])
def test_storage_sop_classes_the_listener_never_heard_of_are_stored(site, sop_class):
    (path,) = ct_series(site["tmp"] / sop_class, count=1, patient_id="UNKNOWNCLASS")
    ds = _with_sop_class(path, sop_class)
    assoc = _associate(site["port"], sop_class)
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    (found,) = _search(site["archive"], "SOPInstanceUID", ds.SOPInstanceUID)
    assert found.attributes["00080016"]["Value"] == [sop_class]


# -- 3. C-GET statuses ----------------------------------------------------------------------


def test_c_get_answers_a702_when_the_requester_refuses_every_instance(site):
    stored = site["stored"]
    ae = AE(ae_title="TESTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", site["port"], ae_title="IMAGESHARE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    assert assoc.is_established
    try:
        answers = list(assoc.send_c_get(
            _identifier("STUDY", StudyInstanceUID=stored.StudyInstanceUID),
            StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final, identifier = answers[-1]
    assert final.Status == statuses.GET_SUB_OPERATIONS_FAILED.code == 0xA702
    assert final.NumberOfFailedSuboperations == 1
    assert identifier.FailedSOPInstanceUIDList == stored.SOPInstanceUID  # one value
