"""Found by a red team (session 33) sweeping every DICOM file on the machine (pydicom's,
pylibjpeg's and pynetdicom's test data, dicom3tools' examples) and hand-built object types
through the teaching and research profiles, searching each output's raw bytes for every planted
identifier and running the verifier. No identifier leaked; two defects did show. A real 12-lead
ECG lost which lead each channel is and the names of its measurements (PR interval, QRS
duration, fiducial points): their SCP-ECG codes (PS3.16 CID 3001, 3335, 3687) are missing from
pydicom's copy of PS3.16, so every one became "Removed by de-identification". And an ultrasound
image in the retired big endian syntax could not be written once its banner was blanked (pydicom
writes no big endian pixels): the whole file failed instead of being cleaned."""

from __future__ import annotations

import io

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_color_lut
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier, Outcome
from imageshare.verify import Verifier
from tests.factory import ct_header

SECRET = b"s33-sweep-secret-0123456789abcdef"
NAME, PATIENT_ID = "Hargreaves^Winifred", "MRN4471932"
BIRTH_DATE, STUDY_DATE = "19610423", "20240315"
TEACHING = Profile("teaching", frozenset({
    "retain_modified_dates", "retain_patient_characteristics", "clean_descriptors",
    "clean_structured_content", "clean_graphics", "clean_pixel_data"}))
TWELVE_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
LEADS = {"5.6.3-9-1": "Lead I", "5.6.3-9-2": "Lead II", "5.6.3-9-61": "Lead III",
         "5.6.3-9-62": "aVR, augmented voltage, right", "5.6.3-9-3": "Lead V1"}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _written(ds: Dataset) -> tuple[Outcome, bytes]:
    """``ds`` saved as a file and de-identified through the product path (verified)."""
    source = io.BytesIO()
    ds.save_as(source, enforce_file_format=True)
    source.seek(0)
    target = io.BytesIO()
    outcome = Deidentifier(TEACHING, Pseudonyms(SECRET), verifier=Verifier()).write(
        source, target)
    return outcome, target.getvalue()


def _ecg(lead_meaning: str = "Lead I (Einthoven)") -> Dataset:
    """A 12-lead ECG as electrocardiographs send it: leads and measurements coded in SCP-ECG."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(TWELVE_LEAD_ECG)
    ds.Modality = "ECG"
    channels = []
    for value, meaning in LEADS.items():
        channel = Dataset()
        channel.ChannelSourceSequence = Sequence([_code(
            value, "SCPECG", lead_meaning if value == "5.6.3-9-1" else meaning)])
        channel.ChannelSensitivity, channel.ChannelBaseline = 1, 0
        channel.ChannelSensitivityUnitsSequence = Sequence([_code("uV", "UCUM", "uV")])
        channel.ChannelSensitivityCorrectionFactor, channel.ChannelSampleSkew = 1, 0
        channel.WaveformBitsStored = 16
        channels.append(channel)
    group = Dataset()
    group.MultiplexGroupTimeOffset, group.WaveformOriginality = 0, "ORIGINAL"
    group.NumberOfWaveformChannels, group.NumberOfWaveformSamples = len(channels), 10
    group.SamplingFrequency = 500
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated, group.WaveformSampleInterpretation = 16, "SS"
    group.WaveformData = np.zeros((10, len(channels)), np.int16).tobytes()
    ds.WaveformSequence = Sequence([group])
    annotations = []
    for value, meaning, number in (("5.13.5-7", "PR Interval", 162),
                                   ("5.13.5-9", "QRS Duration", 94),
                                   ("5.10.3-1", "P Onset", 120),
                                   ("HARG-1", "Hargreaves rhythm", 1)):
        annotation = Dataset()
        annotation.ConceptNameCodeSequence = Sequence([_code(value, "SCPECG", meaning)])
        annotation.NumericValue = number
        annotation.MeasurementUnitsCodeSequence = Sequence([_code("ms", "UCUM", "ms")])
        annotation.AnnotationGroupNumber = 1
        annotations.append(annotation)
    ds.WaveformAnnotationSequence = Sequence(annotations)
    return ds


def test_a_12_lead_ecg_keeps_which_lead_each_channel_is():
    outcome, data = _written(_ecg())
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    sources = [(c.ChannelSourceSequence[0].CodingSchemeDesignator,
                c.ChannelSourceSequence[0].CodeValue, c.ChannelSourceSequence[0].CodeMeaning)
               for c in out.WaveformSequence[0].ChannelDefinitionSequence]
    assert sources == [("SCPECG", value, meaning) for value, meaning in LEADS.items()]
    assert b"HARGREAVES" not in data.upper() and b"4471932" not in data


def test_an_ecg_keeps_the_names_of_its_measurements_and_replaces_a_local_one():
    outcome, data = _written(_ecg())
    assert not outcome.held_back, outcome.report.get("reason")
    named = [(a.ConceptNameCodeSequence[0].CodeValue, a.ConceptNameCodeSequence[0].CodeMeaning,
              float(a.NumericValue))
             for a in dcmread(io.BytesIO(data)).WaveformAnnotationSequence]
    assert named == [("5.13.5-7", "PR Interval", 162.0), ("5.13.5-9", "QRS Duration", 94.0),
                     ("5.10.3-1", "P wave onset", 120.0),
                     ("REMOVED", "Removed by de-identification", 1.0)]


def test_a_lead_code_whose_meaning_names_the_patient_gets_the_standard_meaning():
    outcome, data = _written(_ecg(lead_meaning="Lead I Hargreaves"))
    assert not outcome.held_back, outcome.report.get("reason")
    first = dcmread(io.BytesIO(data)).WaveformSequence[0].ChannelDefinitionSequence[0]
    assert first.ChannelSourceSequence[0].CodeMeaning == "Lead I"
    assert b"HARGREAVES" not in data.upper()


RAMP = np.arange(48 * 64).reshape(48, 64)
ENTRIES = np.arange(256, dtype=np.uint16)
PALETTE = {"Red": ENTRIES * 256, "Green": 65535 - ENTRIES * 256, "Blue": (ENTRIES % 16) * 4096}


def _big_endian_ultrasound(palette: bool) -> Dataset:
    """A small ultrasound image stored big endian (a palette image with 16-bit LUTs, or 12 of
    16 bits grey): its top banner is blanked by the ultrasound region, whatever it shows."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE, charset="ISO_IR 100")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.6.1")
    ds.Modality = "US"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 48, 64, 1
    ds.PixelRepresentation = 0
    if palette:
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        for colour, lut in PALETTE.items():
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype(">u2").tobytes())
        ds.PixelData = (RAMP % 256).astype(np.uint8).tobytes()
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = (RAMP % 4096).astype(">u2").tobytes()
    return ds


def test_a_big_endian_ultrasound_is_cleaned_and_written_little_endian_unchanged_below():
    banner = 5  # rows: the ultrasound banner region is 8.5 % of 48, rounded up
    for palette in (True, False):
        outcome, data = _written(_big_endian_ultrasound(palette))
        assert not outcome.held_back, outcome.report.get("reason")
        out = dcmread(io.BytesIO(data))
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        shown: np.ndarray = out.pixel_array
        expected: np.ndarray = RAMP % 4096
        if palette:  # the colours shown, through the LUTs written
            shown = apply_color_lut(shown, out)
            expected = np.stack([lut[RAMP % 256] for lut in PALETTE.values()], axis=-1)
        assert np.array_equal(shown[banner:], expected[banner:]), palette
        assert not out.pixel_array[:4].any()
        assert b"HARGREAVES" not in data.upper()


PHILIPS_CLASS, GE_CLASS = "1.3.46.670589.2.5.1.1", "1.2.840.113619.4.26"


def _private_class() -> Dataset:
    """An instance of a vendor's private SOP class referring to another vendor's object."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(PHILIPS_CLASS)
    reference = Dataset()
    reference.ReferencedSOPClassUID = GE_CLASS
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.4471932.7"
    ds.ReferencedImageSequence = Sequence([reference])
    return ds


def test_a_private_sop_class_is_kept_and_instances_still_get_new_uids():
    source = _private_class()
    instance = str(source.SOPInstanceUID)
    outcome, data = _written(source)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert out.SOPClassUID == out.file_meta.MediaStorageSOPClassUID == PHILIPS_CLASS
    reference = out.ReferencedImageSequence[0]
    assert reference.ReferencedSOPClassUID == GE_CLASS
    assert "4471932" not in reference.ReferencedSOPInstanceUID
    assert out.SOPInstanceUID != instance and instance.encode() not in data


def test_verifier_takes_a_private_sop_class_for_no_original_uid():
    identity = Verifier.identity([_private_class()])
    assert PHILIPS_CLASS not in identity.uids and GE_CLASS not in identity.uids
    assert "1.2.826.0.1.3680043.2.1125.4471932.7" in identity.uids


def test_labels_an_iod_requires_keep_a_value_without_the_name():
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.481.1")
    ds.Modality = "RTIMAGE"
    ds.RTImageLabel = "Hargreaves"
    alternate = Dataset()
    alternate.ContentDescription = "Palette for Hargreaves"
    ds.AlternateContentDescriptionSequence = Sequence([alternate])
    outcome, data = _written(ds)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert out.RTImageLabel and out.AlternateContentDescriptionSequence[0].ContentDescription
    assert b"HARGREAVES" not in data.upper()
