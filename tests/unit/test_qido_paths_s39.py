"""QIDO-RS attribute paths into sequences (PS3.18 8.3.4.1 and 8.3.4.3): a path of more than
one sequence asks for (or matches on) the attribute at its own depth, and a path through an
attribute that is not a sequence is refused 400 naming it rather than answered as if it
were one."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series

REQUEST = "00400275"  # Request Attributes Sequence
PROTOCOL = "00400008"  # Scheduled Protocol Code Sequence
CODE_VALUE = "00080100"


def _stored(archive, tmp_path) -> str:
    [path] = ct_series(tmp_path / "ct", count=1, patient_id="Q39")
    ds = dcmread(path)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "P-1", "99LOCAL", "Chest"
    request = Dataset()
    request.RequestedProcedureID = "RP1"
    request.ScheduledProtocolCodeSequence = Sequence([code])
    ds.RequestAttributesSequence = Sequence([request])
    ds.save_as(path)
    archive.ingest.store_copy(path, cli_actor())
    return str(ds.StudyInstanceUID)


def test_includefield_two_sequences_deep_is_answered_at_its_own_depth(archive, client,
                                                                     tmp_path):
    study = _stored(archive, tmp_path)
    answer = client.get(f"/dicomweb/studies/{study}/instances", params={
        "includefield": "RequestAttributesSequence.ScheduledProtocolCodeSequence.CodeValue"})
    assert answer.status_code == 200, answer.text
    [instance] = answer.json()
    [item] = instance[REQUEST]["Value"]
    assert CODE_VALUE not in item  # not put in the outer item
    [code] = item[PROTOCOL]["Value"]
    assert code[CODE_VALUE]["Value"] == ["P-1"]


def test_a_match_two_sequences_deep_matches_at_its_own_depth(archive, client, tmp_path):
    study = _stored(archive, tmp_path)
    key = "RequestAttributesSequence.ScheduledProtocolCodeSequence.CodeValue"
    found = client.get(f"/dicomweb/studies/{study}/instances", params={key: "P-1"})
    missed = client.get(f"/dicomweb/studies/{study}/instances", params={key: "P-2"})
    assert found.status_code == 200 and len(found.json()) == 1
    assert missed.status_code in (200, 204) and not (missed.content and missed.json())


def test_a_path_through_an_attribute_that_is_not_a_sequence_is_refused(archive, client,
                                                                      tmp_path):
    study = _stored(archive, tmp_path)
    for params in ({"includefield": "00101010.00100020"}, {"PatientAge.PatientID": "X"}):
        answer = client.get(f"/dicomweb/studies/{study}/instances", params=params)
        assert answer.status_code == 400, (params, answer.text)
        assert "not a sequence" in answer.text
