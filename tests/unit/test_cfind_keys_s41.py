"""Optional C-FIND / QIDO keys of PS3.4 Table C.6-1 and C.6-5 that real clients send: the
Referenced Study Sequence and Referenced Patient Sequence (a RIS matching an order's study),
and Occupation. They were not indexed: asked for, they came back empty although the instances
held them, and a value given matched nothing."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series

ORDER_STUDY = "1.2.826.0.1.3680043.10.543.41.1"
PATIENT_REF = "1.2.826.0.1.3680043.10.543.41.2"


def _reference(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = uid
    return item


def _stored(archive, tmp_path) -> str:
    [path] = ct_series(tmp_path / "ct", count=1, patient_id="K41")
    ds = dcmread(path)
    ds.ReferencedStudySequence = Sequence([_reference(ORDER_STUDY)])
    ds.ReferencedPatientSequence = Sequence([_reference(PATIENT_REF)])
    ds.Occupation = "Engineer"
    ds.save_as(path)
    archive.ingest.store_copy(path, cli_actor())
    [other] = ct_series(tmp_path / "other", count=1, patient_id="K42")
    archive.ingest.store_copy(other, cli_actor())
    return str(ds.StudyInstanceUID)


REF_STUDY, REF_PATIENT, OCCUPATION = "00081110", "00081120", "00102180"
REF_SOP = "00081155"


def _studies(client, **params: str) -> list[dict]:
    answer = client.get("/dicomweb/studies", params=params)
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else []


def test_referenced_study_and_patient_sequences_are_returned_and_matched(archive, client,
                                                                        tmp_path):
    study = _stored(archive, tmp_path)

    [answer] = [a for a in _studies(client, includefield="00081110,00081120,00102180",
                                    PatientID="K41")]
    assert answer[REF_STUDY]["Value"][0][REF_SOP]["Value"] == [ORDER_STUDY]
    assert answer[REF_PATIENT]["Value"][0][REF_SOP]["Value"] == [PATIENT_REF]
    assert answer[OCCUPATION]["Value"] == ["Engineer"]

    [matched] = _studies(client, **{"ReferencedStudySequence.ReferencedSOPInstanceUID":
                                    ORDER_STUDY})
    assert matched["0020000D"]["Value"] == [study]
    assert _studies(client, **{"ReferencedStudySequence.ReferencedSOPInstanceUID":
                               "1.2.3.4.5"}) == []
    [by_job] = _studies(client, Occupation="Engin*")
    assert by_job["0020000D"]["Value"] == [study]
