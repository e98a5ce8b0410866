"""C-FIND conformance (PS3.4 C.2.2.2, C.4.1): person names matched on every component
group, an answer cut at the maximum ending with Out of Resources, and return keys that carry
the stored value or nothing (never an invented default), over DIMSE with pynetdicom."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from imageshare.archive.query import Query
from imageshare.domain.actors import cli_actor
from tests.conftest import ADMIN_PASSWORD, make_started_archive
from tests.factory import ct_series, us_cine
from tests.listener import listening

ACTOR = cli_actor()
CALLING = "FINDSCU"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _c_find(listener, level: str, model=StudyRootQueryRetrieveInformationModelFind,
            charset: str | list[str] = "ISO_IR 192",
            **keys: str) -> tuple[list[Dataset], Dataset]:
    """The identifiers of every pending response and the final status of one C-FIND."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="IMAGESHARE")
    assert assoc.is_established
    query = Dataset()
    query.SpecificCharacterSet = charset
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    found, final = [], None
    try:
        for status, identifier in assoc.send_c_find(query, model):
            assert status is not None, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
            else:
                final = status
    finally:
        assoc.release()
    assert final is not None
    return found, final


def _store(archive, paths: list[Path]) -> str:
    for path in paths:
        archive.ingest.store_copy(path, ACTOR)
    return str(dcmread(paths[0]).StudyInstanceUID)


# -- D1: person names with ideographic and phonetic groups --------------------------------


@pytest.fixture
def japanese(archive, tmp_path):
    """Two patients: one with all three component groups, stored in ISO 2022 IR 87 (JIS),
    and one with an alphabetic name only."""
    study = _store(archive, ct_series(
        tmp_path / "jp", count=1, patient_id="JP1", patient_name=JAPANESE,
        SpecificCharacterSet=["", "ISO 2022 IR 87"]))
    _store(archive, ct_series(tmp_path / "doe", count=1, patient_id="DOE1",
                              patient_name="Doe^Jane"))
    with listening(archive, CALLING) as listener:
        yield listener, study


@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 87"], "ISO_IR 192"])
def test_the_whole_name_in_every_group_finds_its_study(japanese, charset):
    listener, study = japanese
    found, final = _c_find(listener, "STUDY", charset=charset, PatientName=JAPANESE,
                           PatientID="")
    assert final.Status == 0x0000
    assert [str(ds.StudyInstanceUID) for ds in found] == [study]
    assert str(found[0].PatientName) == JAPANESE


@pytest.mark.parametrize(("name", "expected"), [
    ("=山田^太郎", {"JP1"}),               # the ideographic group alone
    ("=山田*", {"JP1"}),                   # a wild card within the ideographic group
    ("==やまだ^たろう", {"JP1"}),          # the phonetic group alone
    ("Yamada^Tarou=山田^太郎", {"JP1"}),   # two of three groups
    ("yamada^tarou=山田^太郎=やまだ^たろう", {"JP1"}),  # person names ignore case
    ("=佐藤^花子", set()),                 # another ideographic name: nothing
    ("Yamada^Tarou=佐藤^花子", set()),     # one group differs: nothing
    ("Doe^Jane=山田^太郎", set()),         # the groups of two names never mix
])
def test_each_given_group_matches_its_own_group(japanese, name, expected):
    listener, _ = japanese
    found, final = _c_find(listener, "PATIENT", PatientRootQueryRetrieveInformationModelFind,
                           PatientName=name, PatientID="")
    assert final.Status == 0x0000
    assert {str(ds.PatientID) for ds in found} == expected


def test_qido_and_c_find_agree_on_component_groups(japanese, client):
    listener, study = japanese
    for name in ("=山田^太郎", JAPANESE, "=佐藤^花子"):
        found, _ = _c_find(listener, "STUDY", PatientName=name)
        answer = client.get("/dicomweb/studies", params={"PatientName": name})
        assert answer.status_code == 200
        qido = [s["0020000D"]["Value"][0] for s in answer.json()]
        assert qido == [str(ds.StudyInstanceUID) for ds in found]
    assert qido == []
    assert found == []


# -- D5: more matches than one answer holds ------------------------------------------------


@pytest.fixture
def capped(tmp_path):
    """An archive answering at most three matches, holding four studies (three of P1)."""
    archive = make_started_archive(tmp_path, qido_max_limit=3)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    for n, patient in enumerate(("P1", "P1", "P1", "P2")):
        _store(archive, ct_series(tmp_path / f"s{n}", count=1, patient_id=patient))
    with listening(archive, CALLING) as listener:
        yield listener
    archive.close()


def test_a_cut_answer_ends_with_out_of_resources(capped):
    found, final = _c_find(capped, "STUDY", StudyInstanceUID="")
    assert len(found) == 3
    assert final.Status == 0xA700
    assert final.ErrorComment == "more than 3 matches; narrow the query"
    assert len(final.ErrorComment) <= 64


def test_exactly_the_maximum_ends_with_success(capped):
    found, final = _c_find(capped, "STUDY", PatientID="P1", StudyInstanceUID="")
    assert len(found) == 3
    assert final.Status == 0x0000


# -- D7: return keys carry stored values only ---------------------------------------------


@pytest.fixture
def frames(archive, tmp_path):
    """A CT series without Number of Frames and an ultrasound cine with 5 frames."""
    ct = _store(archive, ct_series(tmp_path / "ct", count=2, patient_id="F1"))
    us = _store(archive, [us_cine(tmp_path / "us", frames=5, patient_id="F2")])
    return archive, ct, us


def test_number_of_frames_is_never_invented_over_c_find(frames):
    archive, ct, us = frames
    with listening(archive, CALLING) as listener:
        found, final = _c_find(listener, "IMAGE", StudyInstanceUID=ct, SeriesInstanceUID="",
                               SOPInstanceUID="", NumberOfFrames="")
        cine, _ = _c_find(listener, "IMAGE", StudyInstanceUID=us, SeriesInstanceUID="",
                          SOPInstanceUID="", NumberOfFrames="")
    assert final.Status == 0x0000
    assert len(found) == 2
    for ds in found:
        assert "NumberOfFrames" in ds  # asked for: returned, with zero length
        assert ds["NumberOfFrames"].value in (None, "")
    assert [int(ds.NumberOfFrames) for ds in cine] == [5]


def test_number_of_frames_is_never_invented_over_qido(frames, client):
    archive, ct, us = frames
    answer = client.get(f"/dicomweb/studies/{ct}/instances")
    assert answer.status_code == 200
    assert [i.get("00280008", {}).get("Value") for i in answer.json()] == [None, None]
    answer = client.get(f"/dicomweb/studies/{us}/instances")
    assert [i["00280008"]["Value"] for i in answer.json()] == [[5]]
    # With the stored header read (every attribute): the stored value, or none.
    everything = archive.query.find(Query("IMAGE", {"0020000D": {"vr": "UI", "Value": [ct]}},
                                          return_all=True), ACTOR)
    assert [m.attributes.get("00280008", {}).get("Value") for m in everything] == [None, None]


@pytest.mark.parametrize("name", ["Yamada^Tarou", "yamada^tarou", "Yamada^T*"])
def test_an_alphabetic_key_finds_a_name_stored_with_more_groups(japanese, client, name):
    listener, study = japanese
    found, final = _c_find(listener, "STUDY", PatientName=name)
    assert final.Status == 0x0000
    assert [str(ds.StudyInstanceUID) for ds in found] == [study]
    answer = client.get("/dicomweb/studies", params={"PatientName": name})
    assert [s["0020000D"]["Value"][0] for s in answer.json()] == [study]
