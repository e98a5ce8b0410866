"""Answers built from stored data sets cannot fail on a stored value (issue 20): DICOM JSON,
DICOM XML and C-FIND identifiers; and the Accept parser stays linear."""

from __future__ import annotations

import io
import logging
import time
import xml.etree.ElementTree as ET

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from imageshare.archive.dicom_json import dataset_json, native_dicom_xml, safe_json
from imageshare.dicom.scp import response_identifier
from imageshare.web.negotiation import parse_accept, parse_media_type

NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
UID = "1.2.826.0.1.3680043.8.498.1"


def _stored(ds: Dataset) -> Dataset:
    """``ds`` written and read back, as a stored file is read."""
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = UID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = UID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return dcmread(out)


def test_values_invalid_for_their_vr_are_sent_as_stored_or_left_out_with_a_warning(caplog):
    ds = Dataset()
    ds.SOPInstanceUID = UID
    ds.PatientName = "Secret^Patient"
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    ds[0x00101020] = RawDataElement(Tag(0x00101020), "DS", 4, b"1.7m", 0, False, True)
    ds[0x00189087] = RawDataElement(Tag(0x00189087), "FD", 8,
                                    b"\x00\x00\x00\x00\x00\x00\xf8\x7f", 0, False, True)
    with caplog.at_level(logging.WARNING, logger="imageshare.dicom_json"):
        result = dataset_json(_stored(ds), instance=UID)
    assert result["00280008"] == {"vr": "IS", "Value": ["1A"]}
    assert result["00101020"] == {"vr": "DS", "Value": ["1.7m"]}
    assert "00189087" not in result  # NaN: JSON cannot carry it
    assert result["00100010"]["Value"] == [{"Alphabetic": "Secret^Patient"}]
    warnings = [r.getMessage() for r in caplog.records if r.name == "imageshare.dicom_json"]
    assert any(UID in w and "00189087" in w for w in warnings), warnings
    assert "Secret" not in caplog.text
    assert safe_json({"00101030": {"vr": "DS", "Value": [float("inf")]}}) == {}


def test_binary_values_inside_sequences_become_bulk_data_uris_by_path():
    item = Dataset()
    item.WaveformBitsAllocated = 16
    item.WaveformData = b"\x01\x02" * 40_000
    ds = Dataset()
    ds.WaveformSequence = [item]
    ds.RedPaletteColorLookupTableData = b"\x00\x01" * 10
    result = dataset_json(_stored(ds), bulk_uri=lambda path: f"bulk/{path}")
    assert result["54000100"]["Value"][0]["54001010"] == {
        "vr": "OW", "BulkDataURI": "bulk/54000100/1/54001010"}
    assert result["00281201"]["InlineBinary"]


def test_c_find_identifiers_always_encode_and_keep_what_was_stored():
    attrs = {
        "00080018": {"vr": "UI", "Value": [UID]},
        "00280008": {"vr": "IS", "Value": ["1A"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Brontë^Emily"}]},
        "00101030": {"vr": "DS", "Value": ["NaN?"]},
        "00280009": {"vr": "AT", "Value": ["not a tag"]},
    }
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        identifier = response_identifier(attrs, "IMAGE", syntax)
        data = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian)
        assert data is not None
        back = decode(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
        assert back.get_item(0x00280008).value == b"1A"
        assert str(back.PatientName) == "Brontë^Emily"
        assert 0x00280009 not in back or not back[0x00280009].value


def test_dicom_xml_follows_the_native_dicom_model():
    attrs = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane^M"}]},
        "00200013": {"vr": "IS", "Value": [3]},
        "00400275": {"vr": "SQ", "Value": [{"00401001": {"vr": "SH", "Value": ["RP1"]}}]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk"},
        "00291010": {"vr": "OB", "InlineBinary": "AAE="},
        "00290010": {"vr": "LO", "Value": ["ACME 1.0"]},
        "00081030": {"vr": "LO", "Value": ["bell \x07 in text"]},
    }
    root = ET.fromstring(native_dicom_xml(attrs))
    assert root.tag == f"{NATIVE}NativeDicomModel"

    def attribute(tag: str) -> ET.Element:
        found = root.find(f"{NATIVE}DicomAttribute[@tag='{tag}']")
        assert found is not None, tag
        return found

    name = attribute("00100010").find(f"{NATIVE}PersonName/{NATIVE}Alphabetic")
    assert [c.tag.removeprefix(NATIVE) for c in name] == [
        "FamilyName", "GivenName", "MiddleName"]
    assert attribute("00200013").find(f"{NATIVE}Value").text == "3"
    item = attribute("00400275").find(f"{NATIVE}Item")
    assert item.get("number") == "1"
    assert item.find(f"{NATIVE}DicomAttribute").get("keyword") == "RequestedProcedureID"
    assert attribute("7FE00010").find(f"{NATIVE}BulkData").get("uri") == "http://x/bulk"
    assert attribute("00291010").get("privateCreator") == "ACME 1.0"
    assert root.find(f"{NATIVE}DicomAttribute[@tag='00081030']") is None  # not XML text


def test_accept_headers_are_parsed_in_preference_order_and_in_linear_time():
    ranges = parse_accept('text/html;q=0.5, multipart/related; type="application/dicom+xml", '
                          "application/dicom+json;q=0, */*;q=0.1")
    assert [r.media for r in ranges] == ["multipart/related", "text/html", "*/*"]
    assert ranges[0].param("type") == "application/dicom+xml"
    assert parse_media_type('multipart/related; type="a;b"; boundary=x') == (
        "multipart/related", {"type": "a;b", "boundary": "x"})
    hostile = "a/b" + ';c="' * 50_000 + ";" * 50_000
    started = time.perf_counter()
    parse_accept(hostile)
    parse_media_type(hostile)
    assert time.perf_counter() - started < 1.0
