"""Matching of dates, times, lists and wildcards (PS3.4 C.2.2.2), on SQLite and PostgreSQL:
the same answers from the indexed columns (SQL) and from stored headers (Python)."""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset

from imageshare.archive.matching import wildcard_match
from imageshare.archive.query import Query
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import InvalidQuery
from tests.factory import ct_series

ACTOR = cli_actor()

# Study Time (indexed) and Series Time (matched on stored values) carry the same value.
TIMES = {"T1": "143000", "T2": "1430", "T3": "143000.5", "T4": "090000", "T5": "235959",
         "T6": "14:30:15"}

# Each key with the patients it must find, as PS3.4 C.2.2.2 says: values are compared
# normalised; a partial value stands for its whole span; ranges are inclusive.
TIME_KEYS = {
    "143000": {"T1", "T2", "T3"},
    "1430": {"T1", "T2", "T3", "T6"},
    "1430-": {"T1", "T2", "T3", "T5", "T6"},
    "143000-": {"T1", "T2", "T3", "T5", "T6"},
    "143000-150000": {"T1", "T2", "T3", "T6"},
    "-1430": {"T1", "T2", "T3", "T4", "T6"},
    "-143000": {"T1", "T2", "T3", "T4"},
    "143000.5-143000.9": {"T3"},
    "14:30:15": {"T6"},
    "09\\2359": {"T4", "T5"},
    "0000-0859": set(),
}


@pytest.fixture
def timed(any_archive, tmp_path):
    for patient, value in TIMES.items():
        for path in ct_series(tmp_path / patient, count=1, patient_id=patient,
                              StudyTime=value, SeriesTime=value,
                              AcquisitionDateTime="20240105" + value.replace(":", "")):
            any_archive.ingest.store_copy(path, ACTOR)
    return any_archive


def _patients(archive, level: str, **keys: str) -> set[str]:
    ds = Dataset()
    ds.PatientID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    matches = archive.query.find(Query(level, ds.to_json_dict()), ACTOR)
    return {m.patient_id for m in matches}


def test_dates_and_times_match_normalised_with_spans_offsets_and_inclusive_bounds(timed):
    for key, expected in TIME_KEYS.items():
        assert _patients(timed, "STUDY", StudyTime=key) == expected, f"Study Time {key}"
        assert _patients(timed, "SERIES", SeriesTime=key) == expected, f"Series Time {key}"
    # Date-times (matched on stored headers) widen partial values and apply UTC offsets.
    def found(key):
        return _patients(timed, "IMAGE", AcquisitionDateTime=key)

    assert found("20240105143000") == {"T1", "T2", "T3"}
    assert found("202401051430-2024010514") == {"T1", "T2", "T3", "T6"}
    assert found("2024") == set(TIMES)
    assert found("-20240104") == set()
    # 15:30 at UTC+01:00 is 14:30 UTC; stored values without an offset are taken as given.
    assert found("202401051530+0100") == {"T1", "T2", "T3", "T6"}
    # A malformed key is refused with a reason.
    with pytest.raises(InvalidQuery, match="not a DICOM time"):
        _patients(timed, "STUDY", StudyTime="2pm")
    with pytest.raises(InvalidQuery, match="range"):
        _patients(timed, "STUDY", StudyTime="1500-1400")


@pytest.fixture
def modalities(any_archive, tmp_path):
    ct = ct_series(tmp_path / "ct", count=1, patient_id="P-CT", AccessionNumber="abc1")
    us = ct_series(tmp_path / "us", count=1, patient_id="P-US", Modality="US",
                   AccessionNumber="ABC2")
    mr = ct_series(tmp_path / "mr", count=1, patient_id="P-MR", Modality="MR",
                   AccessionNumber="x*y")
    for path in [*ct, *us, *mr]:
        any_archive.ingest.store_copy(path, ACTOR)
    return any_archive


def test_a_list_of_values_matches_any_of_them_and_wildcards_are_case_sensitive(modalities):
    archive = modalities
    assert _patients(archive, "SERIES", Modality="MR\\CT") == {"P-CT", "P-MR"}
    assert _patients(archive, "SERIES", Modality="MR\\U*") == {"P-US", "P-MR"}
    assert _patients(archive, "STUDY", ModalitiesInStudy="MR\\US") == {"P-US", "P-MR"}
    assert _patients(archive, "PATIENT", PatientID="P-CT\\P-US") == {"P-CT", "P-US"}
    assert _patients(archive, "SERIES", Manufacturer="Nobody\\ImageShare*") == {
        "P-CT", "P-US", "P-MR"}
    assert _patients(archive, "SERIES", Modality="MR\\*") == {"P-CT", "P-US", "P-MR"}
    # Wildcards are case-sensitive and other characters stay literal.
    assert _patients(archive, "STUDY", AccessionNumber="abc*") == {"P-CT"}
    assert _patients(archive, "STUDY", AccessionNumber="ABC?") == {"P-US"}
    assert _patients(archive, "STUDY", AccessionNumber="x[*") == set()
    assert _patients(archive, "STUDY", AccessionNumber="x*y") == {"P-MR"}


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [("abc", "a*", True), ("abc", "*c", True), ("abc", "a?c", True), ("abc", "*b*", True),
     ("abc", "*d*", False), ("aXbXc", "a*b*c", True), ("ab", "a*b*c", False),
     ("", "*", True), ("a", "", False), ("abcabc", "*abc", True), ("aaa", "a*a*a*a", False),
     ("x?y", "x?y", True), ("abab", "*a?a*", True), ("abba", "*a?a*", False),
     ("abcab", "*b?a*", True)],
)
def test_wildcard_matcher_agrees_with_the_definition(text, pattern, expected):
    assert wildcard_match(text, pattern) is expected


def test_wildcard_matcher_agrees_with_fnmatch_on_every_small_case():
    import fnmatch
    import itertools

    texts = ["".join(t) for n in range(6) for t in itertools.product("ab", repeat=n)]
    patterns = ["".join(p) for n in range(5) for p in itertools.product("ab*?", repeat=n)]
    for pattern in patterns:
        for text in texts:
            assert wildcard_match(text, pattern) is fnmatch.fnmatchcase(text, pattern), (
                text, pattern)


def test_wildcard_matching_takes_linear_time_on_hostile_patterns():
    text = "a" * 200_000
    started = time.perf_counter()
    for pattern in ("*a*a*a*a*a*a*a*a*b", "*a?a?a*a?a*a*b*", "*" + "a*" * 200 + "b*"):
        assert not wildcard_match(text, pattern)
    assert time.perf_counter() - started < 1.0
