"""De-identification of attributes, generated from PS3.15 Table E.1-1: every attribute under
the Basic Profile and under every option that names it."""

from __future__ import annotations

import datetime as dt
from copy import deepcopy

import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from imageshare.deid.engine import (
    EXACT_RULES,
    KNOWN_ACTIONS,
    MASKED_RULES,
    AttributeCleaner,
    carried_out,
    effective_action,
)
from imageshare.deid.profiles import OPTIONS, Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.table import TABLE

SECRET = b"test-secret-for-pseudonyms-0123456789"
PATIENT = "Doe^Jane"
DATE = "20200115"
INNER_UID = "1.2.826.0.1.3680043.2.1125.999.2"


def _tag_of(line: str) -> int:
    tag = line.split()[0]
    return int(tag.replace("X", "0"), 16)


def _cases():
    for line in TABLE.strip().splitlines():
        tag = _tag_of(line)
        if tag >> 16 in (0x0000, 0x0002, 0xFFFA, 0xFFFC):
            continue  # command group, file meta and padding: tested apart
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        rule = EXACT_RULES.get(tag) or next(r for m, v, r in MASKED_RULES if tag & m == v)
        yield pytest.param(tag, vr, "basic", id=f"{tag:08X}-basic")
        for option in rule.options:
            yield pytest.param(tag, vr, option, id=f"{tag:08X}-{option}")


def _value(vr: str):
    return {
        "PN": "Doe^John", "DA": DATE, "DT": DATE + "101010", "TM": "101010",
        "UI": "1.2.826.0.1.3680043.2.1125.999.1", "CS": "DOE", "AS": "045Y", "IS": "12",
        "DS": "1.5", "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 1.5, "FD": 1.5,
        "OB": b"\x01\x02", "OW": b"\x01\x02", "UN": b"\x01\x02", "AT": 0x00100010,
    }.get(vr.split(" or ")[0], "Doe secret note")


def _base() -> Dataset:
    ds = Dataset()
    ds.PatientName = PATIENT
    ds.PatientID = "H123"
    ds.StudyDate = DATE
    ds.SOPInstanceUID = generate_uid()
    return ds


def _set(ds: Dataset, tag: int, vr: str):
    if vr == "SQ":
        item = Dataset()
        item.PatientName = "Doe^Inner"
        item.ReferencedSOPInstanceUID = INNER_UID
        ds.add_new(tag, "SQ", Sequence([item]))
        return Sequence([item])
    value = _value(vr)
    ds.add_new(tag, vr.split(" or ")[0], value)
    return value


def test_every_action_in_the_table_is_known():
    for line in TABLE.strip().splitlines():
        _tag, basic, *options = line.split()
        assert basic in KNOWN_ACTIONS, line
        for option in options:
            assert option.split("=")[1] in KNOWN_ACTIONS, line
    assert len(EXACT_RULES) + len(MASKED_RULES) >= 450


@pytest.mark.parametrize(("tag", "vr", "option"), list(_cases()))
def test_table_action_is_applied(tag, vr, option):
    options = frozenset() if option == "basic" else frozenset({option})
    if option == "retain_modified_dates":
        options = frozenset({"retain_modified_dates"})
    profile = Profile("t", options)
    ds = _base()
    original = _set(ds, tag, vr)
    rule = EXACT_RULES.get(tag) or next(r for m, v, r in MASKED_RULES if tag & m == v)
    listed = effective_action(rule, profile)
    action = carried_out(listed, tag, vr)
    assert action in listed.split("/") or (listed, action) in (
        ("X/Z/U*", "U"), ("X", "D"), ("X/Z", "U")), "a choice the standard does not offer"
    cleaner = AttributeCleaner(profile, Pseudonyms(SECRET))
    pseudonym = cleaner.context(ds).pseudonym
    cleaner.apply(ds)
    if tag in (0x00100010, 0x00100020):  # the pseudonym replaces the patient's name and ID
        assert ds[tag].value == pseudonym
        return
    if action == "X":
        assert tag not in ds
        return
    assert tag in ds, f"{action} must keep the attribute"
    value = ds[tag].value
    if vr == "SQ":
        if action == "Z":
            assert len(value) == 0
        else:
            inner = value[0]
            assert "Doe" not in str(inner.get("PatientName", ""))
            if action == "D":  # replaced: no text of the original item is left
                assert all("Doe" not in str(e.value) for e in inner.iterall())
            replaced = inner.ReferencedSOPInstanceUID != INNER_UID
            assert replaced == ("retain_uids" not in options)
        return
    if action == "K":
        if rule.basic != "K" and vr in ("LO", "SH", "ST", "LT", "UT", "UC", "AE"):
            # kept by an option, but never with someone's name in it
            assert value == original.replace("Doe", "*")
        else:
            assert value == original
    elif action == "Z":
        assert value in ("", None, b"", [])
    elif action == "U":
        if "retain_uids" in options:
            assert value == original
        else:
            assert value != original and str(value).startswith("2.25.")
    elif action == "D":
        assert value not in (None, "") and value != original or vr in ("US", "SS", "UL",
                                                                         "SL", "FL", "FD")
    elif action == "C":
        if vr in ("DA", "DT"):
            assert value != original and len(str(value)) == len(str(original))
        elif vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS"):
            assert "Doe" not in str(value) and "DOE" not in str(value)
    else:
        pytest.fail(f"unexpected action {action}")


def test_private_attributes_go_unless_a_safe_one_is_retained():
    ds = _base()
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")  # b-value: safe
    block.add_new(0x10, "LO", "Doe Jane")  # not on the safe list
    other = ds.private_block(0x0029, "ACME 1.0", create=True)
    other.add_new(0x01, "LO", "Doe")
    ds.add_new(0x00311010, "LO", "no creator")  # orphan private element
    item = Dataset()
    item.private_block(0x0041, "ACME 1.0", create=True).add_new(0x01, "LO", "Doe nested")
    ds.ReferencedStudySequence = [item]
    from imageshare.deid.service import SAFE_PRIVATE

    basic = AttributeCleaner(Profile("b", frozenset()), Pseudonyms(SECRET), SAFE_PRIVATE)
    copy = deepcopy(ds)
    basic.apply(copy)
    assert not [e for e in copy.iterall() if e.tag.is_private]
    keep = AttributeCleaner(Profile("s", frozenset({"retain_safe_private"})),
                            Pseudonyms(SECRET), SAFE_PRIVATE)
    report = keep.apply(ds)
    kept = {(e.tag.group, e.tag.element): e.value for e in ds.iterall() if e.tag.is_private}
    assert kept == {(0x0019, 0x0010): "SIEMENS MR HEADER", (0x0019, 0x100C): "1000"}
    assert report.private_kept == 1


def test_uids_are_replaced_consistently_so_references_stay_valid():
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first, second = _base(), _base()
    for ds, own in ((first, sop), (second, generate_uid())):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = own
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = sop
    second.ReferencedImageSequence = [ref]
    cleaner = AttributeCleaner(Profile("b", frozenset()), Pseudonyms(SECRET))
    cleaner.apply(first)
    cleaner.apply(second)
    assert first.StudyInstanceUID == second.StudyInstanceUID != study
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != series
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # well-known UIDs stay
    other = AttributeCleaner(Profile("b", frozenset()), Pseudonyms(b"another-secret-0123456789"))
    third = _base()
    third.StudyInstanceUID = study
    other.apply(third)
    assert third.StudyInstanceUID != first.StudyInstanceUID


def test_dates_move_by_one_offset_per_patient_and_keep_intervals():
    profile = Profile("m", frozenset({"retain_modified_dates"}))
    cleaner = AttributeCleaner(profile, Pseudonyms(SECRET))
    a, b, other = _base(), _base(), _base()
    a.StudyDate, a.AcquisitionDate = "20200115", "20200125"
    b.StudyDate = "20210301"
    other.PatientID = "H999"
    other.StudyDate = "20200115"
    for ds in (a, b, other):
        cleaner.apply(ds)

    def day(text):
        return dt.datetime.strptime(text, "%Y%m%d").date()

    assert (day(a.AcquisitionDate) - day(a.StudyDate)).days == 10
    assert (day(b.StudyDate) - day(a.StudyDate)).days == (
        dt.date(2021, 3, 1) - dt.date(2020, 1, 15)).days
    assert a.StudyDate != "20200115" and other.StudyDate != a.StudyDate
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_age_is_kept_with_patient_characteristics():
    ds = _base()
    ds.PatientBirthDate = "19800601"
    ds.PatientSex = "F"
    AttributeCleaner(Profile("p", frozenset({"retain_patient_characteristics"})),
                     Pseudonyms(SECRET)).apply(ds)
    assert ds.PatientAge == "039Y" and ds.PatientSex == "F" and ds.PatientBirthDate == ""


def test_free_text_is_removed_or_cleaned_of_identifiers():
    ds = _base()
    ds.PatientBirthDate = "19700312"
    ds.StudyDescription = "CT chest for Jane Doe born 12/03/1970, NHS 943 476 5919, H123"
    ds.ImageComments = "call doe.jane@example.org"
    ds.add_new(0x00189999, "LO", "unknown text Doe")  # not in the dictionary: removed
    clean = deepcopy(ds)
    AttributeCleaner(Profile("d", frozenset({"clean_descriptors"})),
                     Pseudonyms(SECRET)).apply(clean)
    assert clean.StudyDescription.startswith("CT chest for")
    for leaked in ("Jane", "Doe", "1970", "943", "H123"):
        assert leaked not in clean.StudyDescription
    assert "example.org" not in clean.ImageComments
    assert 0x00189999 not in clean
    AttributeCleaner(Profile("b", frozenset()), Pseudonyms(SECRET)).apply(ds)
    assert "StudyDescription" not in ds and "ImageComments" not in ds


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 192", "Müller^Jürgen"),
    ("ISO_IR 100", "Pérez^José"),
    ("\\ISO 2022 IR 87", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
])
def test_names_in_any_character_set_are_replaced(charset, name, tmp_path):
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    ds = _base()
    ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.PatientName = name
    ds.StudyDescription = f"Scan of {name.split('^')[0]}"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    AttributeCleaner(Profile("d", frozenset({"clean_descriptors"})),
                     Pseudonyms(SECRET)).apply(ds)
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert str(back.PatientName).startswith("ANON")
    family = name.split("^")[0]
    assert family not in str(back.StudyDescription)


def test_identity_removed_and_method_are_recorded():
    ds = _base()
    AttributeCleaner(Profile("r", frozenset({"retain_device_identity", "clean_pixel_data"})),
                     Pseudonyms(SECRET)).apply(ds)
    assert ds.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", OPTIONS["retain_device_identity"][0],
                     OPTIONS["clean_pixel_data"][0]}
    assert all(i.CodingSchemeDesignator == "DCM" for i in ds.DeidentificationMethodCodeSequence)
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_anyone_named_anywhere_is_cleaned_out_of_free_text():
    ds = _base()
    reader = Dataset()
    reader.PersonName = "Watson^James"
    ds.add_new(0x00081062, "SQ", Sequence([reader]))  # Physicians Reading Study Id. Sequence
    ds.AdmissionID = "ADM-77341"
    ds.RequestingPhysician = "Crick^Francis"
    ds.StudyDescription = "Read by Watson, requested by Crick, admission ADM-77341"
    AttributeCleaner(Profile("d", frozenset({"clean_descriptors"})),
                     Pseudonyms(SECRET)).apply(ds)
    for leaked in ("Watson", "Crick", "ADM-77341"):
        assert leaked not in ds.StudyDescription
    assert ds.StudyDescription.startswith("Read by")
