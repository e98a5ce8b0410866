"""Matching as PS3.4 C.2.2.2 says, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from imageshare.archive.query import Query
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import InvalidQuery
from tests.factory import ct_series, us_cine

ACTOR = cli_actor()


@pytest.fixture
def loaded(any_archive, tmp_path):
    """Three patients: accents, other IDs (an NHS number), dates and modalities differ."""
    made = {}
    made["muller"] = ct_series(
        tmp_path / "a", count=2, patient_id="H100", patient_name="Müller^Jürgen",
        StudyDate="20240105", AccessionNumber="ACC-1", StudyDescription="CT Head",
        OtherPatientIDsSequence=[_other_id("9434765919", "NHS")],
    )
    made["smith"] = ct_series(
        tmp_path / "b", count=1, patient_id="H200", patient_name="Smith^Anna",
        StudyDate="20240610", AccessionNumber="ACC-2", StudyDescription="CT Chest",
    )
    study = dcmread(made["smith"][0]).StudyInstanceUID
    made["smith_us"] = [us_cine(tmp_path / "c", frames=2, patient_id="H200",
                                patient_name="Smith^Anna", study_uid=study)]
    made["o_brien"] = ct_series(
        tmp_path / "d", count=1, patient_id="H300", patient_name="O'Brien^Sean",
        StudyDate="20231231", AccessionNumber="X_1",
    )
    for paths in made.values():
        for p in paths:
            any_archive.ingest.store_copy(p, ACTOR)
    return any_archive, made


def _other_id(value: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID = value
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


def find(archive, level, **keys):
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return archive.query.find(Query(level=level, identifier=ds.to_json_dict()), ACTOR)


def values(matches, tag):
    return sorted(str((m.attributes.get(tag, {}).get("Value") or [""])[0]) for m in matches)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("muller*", ["H100"]),
        ("MÜLLER^JÜRGEN", ["H100"]),
        ("mul*^j*", ["H100"]),
        ("*an*", ["H200", "H300"]),
        ("Sm?th*", ["H200"]),
        ("smith", []),
        ("", ["H100", "H200", "H300"]),
    ],
)
def test_patient_name_matching_ignores_case_and_accents(loaded, name, expected):
    archive, _ = loaded
    assert values(find(archive, "STUDY", PatientName=name, PatientID=""), "00100020") == expected


def test_date_ranges_match_inclusively(loaded):
    archive, _ = loaded
    def ids(date):
        return values(find(archive, "STUDY", StudyDate=date, PatientID=""), "00100020")
    assert ids("20240105") == ["H100"]
    assert ids("20240101-20240131") == ["H100"]
    assert ids("20240101-") == ["H100", "H200"]
    assert ids("-20231231") == ["H300"]
    with pytest.raises(InvalidQuery):
        ids("2024-01-05")


def test_wildcards_in_accession_do_not_treat_underscore_as_wildcard(loaded):
    archive, _ = loaded
    assert values(find(archive, "STUDY", AccessionNumber="ACC*"), "00080050") == [
        "ACC-1", "ACC-2"]
    assert values(find(archive, "STUDY", AccessionNumber="X_1"), "00080050") == ["X_1"]
    assert find(archive, "STUDY", AccessionNumber="X%1") == []


def test_modalities_in_study_matches_any_series(loaded):
    archive, _ = loaded
    matches = find(archive, "STUDY", ModalitiesInStudy="US", PatientID="")
    assert values(matches, "00100020") == ["H200"]
    assert matches[0].attributes["00080061"]["Value"] == ["CT", "US"]


def test_uid_list_matching(loaded):
    archive, made = loaded
    uids = [dcmread(made[k][0]).StudyInstanceUID for k in ("muller", "o_brien")]
    matches = find(archive, "STUDY", StudyInstanceUID="\\".join(uids))
    assert sorted(m.study_uid for m in matches) == sorted(uids)


def test_other_patient_ids_sequence_matching_finds_nhs_number(loaded):
    archive, _ = loaded
    ds = Dataset()
    ds.PatientID = ""
    ds.OtherPatientIDsSequence = [_other_id("9434765919", "")]
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = ""
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = ""
    matches = archive.query.find(Query("PATIENT", ds.to_json_dict()), ACTOR)
    assert values(matches, "00100020") == ["H100"]
    returned = matches[0].attributes["00101002"]["Value"][0]
    assert returned["00100020"]["Value"] == ["9434765919"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"InstanceAvailability": "ONLINE"}, ["H100", "H200", "H300"]),
        ({"InstanceAvailability": "OFFLINE"}, []),
        ({"InstanceAvailability": "NEARLINE\\UNAVAILABLE"}, []),
        ({"InstanceAvailability": "OFFLINE\\ONLINE"}, ["H100", "H200", "H300"]),
        ({"RetrieveAETitle": "IMAGESHARE"}, ["H100", "H200", "H300"]),
        ({"RetrieveAETitle": "IMAGE*"}, ["H100", "H200", "H300"]),
        ({"RetrieveAETitle": "OTHERPACS"}, []),
        ({"RetrieveAETitle": "*"}, ["H100", "H200", "H300"]),
    ],
)
def test_availability_and_retrieve_ae_keys_are_matched(loaded, keys, expected):
    """Every instance here is ONLINE and retrieved from this archive's AE title: a search for
    OFFLINE instances or another AE finds nothing instead of everything."""
    archive, _ = loaded
    found = find(archive, "STUDY", PatientID="", **keys)
    assert sorted(set(values(found, "00100020"))) == expected
    tag = "00080056" if "InstanceAvailability" in keys else "00080054"
    for match in found:
        assert match.attributes[tag]["Value"] == ["ONLINE" if tag == "00080056" else "IMAGESHARE"]


def test_patient_level_counts_related_studies_and_instances(loaded):
    archive, _ = loaded
    ds = Dataset()
    ds.PatientID = "H200"
    ds.NumberOfPatientRelatedStudies = ""
    ds.NumberOfPatientRelatedInstances = ""
    (match,) = archive.query.find(Query("PATIENT", ds.to_json_dict()), ACTOR)
    assert match.attributes["00201200"]["Value"] == [1]
    assert match.attributes["00201204"]["Value"] == [2]


def test_series_and_instance_levels_return_requested_keys(loaded):
    archive, made = loaded
    study = dcmread(made["muller"][0]).StudyInstanceUID
    series = find(archive, "SERIES", StudyInstanceUID=study, Modality="", SeriesNumber="",
                  NumberOfSeriesRelatedInstances="")
    assert len(series) == 1
    assert series[0].attributes["00201209"]["Value"] == [2]
    images = find(archive, "IMAGE", StudyInstanceUID=study, InstanceNumber="",
                  SliceThickness="")
    assert values(images, "00200013") == ["1", "2"]
    assert all(m.attributes["00180050"]["Value"] == [1.0] for m in images)


def test_non_indexed_attribute_is_matched_on_stored_values(loaded):
    archive, _ = loaded
    assert values(find(archive, "SERIES", Manufacturer="ImageShare*", Modality=""), "00080060") == [
        "CT", "CT", "CT", "US"]
    assert find(archive, "SERIES", Manufacturer="Nobody") == []


def test_limit_and_offset_page_through_results(loaded):
    archive, _ = loaded
    all_ids = [m.study_uid for m in archive.query.find(Query("STUDY", {}), ACTOR)]
    page = archive.query.find(Query("STUDY", {}, limit=1, offset=1), ACTOR)
    assert [m.study_uid for m in page] == all_ids[1:2]


def test_keys_below_the_query_level_are_refused(loaded):
    archive, _ = loaded
    with pytest.raises(InvalidQuery):
        find(archive, "STUDY", SOPInstanceUID="1.2.3")


def test_scope_limits_results_inside_the_query(loaded):
    archive, made = loaded
    allowed = dcmread(made["o_brien"][0]).StudyInstanceUID
    matches = archive.query.find(Query("STUDY", {}, allowed_studies=[allowed]), ACTOR)
    assert [m.study_uid for m in matches] == [allowed]


def test_every_query_is_audited(loaded):
    archive, _ = loaded
    find(archive, "STUDY", PatientID="H100")
    (event,) = list(archive.audit.events(action="study.query", limit=1))
    assert event["detail"]["keys"] == {"00100020": "H100"}
    assert event["instance_count"] == 1


def _default_instance_keys(**keys: str) -> dict:
    """An instance-level identifier with QIDO-RS's default return keys (PS3.18 Table 10.6.3-5)."""
    ds = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                    "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns",
                    "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict()


def test_instance_search_with_default_keys_answers_from_the_index_without_opening_files(
        loaded, monkeypatch):
    archive, made = loaded
    opened = []
    read_header = archive.query._instance_header
    monkeypatch.setattr(archive.query, "_instance_header",
                        lambda key: opened.append(key) or read_header(key))
    study = dcmread(made["muller"][0]).StudyInstanceUID
    images = archive.query.find(Query("IMAGE", _default_instance_keys(StudyInstanceUID=study)),
                                ACTOR)
    assert values(images, "00200013") == ["1", "2"]
    assert all(m.attributes["00080201"] == {"vr": "SH"} for m in images)
    assert opened == []
    # an attribute kept only in the instance's own header is still read from its file
    images = archive.query.find(Query("IMAGE", _default_instance_keys(
        StudyInstanceUID=study, SliceThickness="")), ACTOR)
    assert all(m.attributes["00180050"]["Value"] == [1.0] for m in images)
    assert len(opened) == 2


def test_timezone_offset_of_instances_is_answered_as_stored(any_archive, tmp_path):
    paths = ct_series(tmp_path / "tz", count=2, patient_id="H400", patient_name="Tz^Test",
                      TimezoneOffsetFromUTC="+0100")
    for path in paths:
        any_archive.ingest.store_copy(path, ACTOR)
    study = dcmread(paths[0]).StudyInstanceUID
    images = any_archive.query.find(
        Query("IMAGE", _default_instance_keys(StudyInstanceUID=study)), ACTOR)
    assert [m.attributes["00080201"].get("Value") for m in images] == [["+0100"], ["+0100"]]
