"""Found by a red team (session 32), closed in the de-identifier and caught by the independent
verifier. Recorded sound (Basic Voice Audio, General Audio, mu-law or A-law waveforms): a
dictation speaks the patient's name, and nothing can hear it, so it is held back like an
encapsulated document. Overlay bitmaps where no viewer shows them (60xx groups beyond 601E,
overlays inside sequence items): kept by Clean Graphics without being read, so text drawn in
them left unseen. Colour and Visible Light images whose Burned In Annotation says NO: trusted by
the de-identifier but read by the verifier, so a colour screenshot with a name on it was held back
instead of cleaned. UTF-16 text in OW values (LUT data), which the verifier did not read for
it, nor at all in implicit VR files (LUT Data's "US or OW" was read as numbers). Audio kept
in a curve group (retired Audio Sample Data) by Clean Graphics. A Japanese reading written in
the other kana (hiragana in the name, katakana in the text). A data set stored in implicit VR
under an explicit VR transfer syntax, which could not be written at all."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import TRUST_PIXELS, Deidentifier, Outcome
from imageshare.verify import Verifier
from tests.factory import ct_header

SECRET = b"s32-corpus-secret-0123456789abcd"
NAME, PATIENT_ID = "Hargreaves^Winifred", "MRN4471932"
BIRTH_DATE, STUDY_DATE = "19610423", "20240315"
BASIC = Profile("basic", frozenset({"clean_pixel_data"}))
TEACHING = Profile("teaching", frozenset({
    "retain_modified_dates", "retain_patient_characteristics", "clean_descriptors",
    "clean_structured_content", "clean_graphics", "clean_pixel_data"}))
SECRETS = (b"HARGREAVES", b"WINIFRED", b"4471932")
BASIC_VOICE_AUDIO = "1.2.840.10008.5.1.4.1.1.9.4.1"
GENERAL_AUDIO = "1.2.840.10008.5.1.4.1.1.9.4.2"
GENERAL_ECG = "1.2.840.10008.5.1.4.1.1.9.1.2"


def _source() -> Dataset:
    """A small CT of one patient (blank image, no burned-in text)."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.ReferringPhysicianName = "Quimby^Arthur"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    return ds


def _anonymous(ds: Dataset) -> Dataset:
    """``ds`` with the patient's own attributes replaced (a copy the verifier should pass
    but for what is planted in it)."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ANON", "ANON", ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = "19000101"
    return ds


def _waveform(sop_class: str, interpretation: str, modality: str) -> Dataset:
    """A waveform instance of ``sop_class``: one channel of 800 samples, sampled as
    ``interpretation`` (``MB``/``AB``: mu-law/A-law sound; ``SS``: signed 16-bit)."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.Modality = modality
    size = 2 if interpretation == "SS" else 1
    group = Dataset()
    group.MultiplexGroupTimeOffset = 0
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = 1
    group.NumberOfWaveformSamples = 800
    group.SamplingFrequency = 8000
    channel = Dataset()
    channel.ChannelSampleSkew = 0
    channel.WaveformBitsStored = 8 * size
    group.ChannelDefinitionSequence = Sequence([channel])
    group.WaveformBitsAllocated = 8 * size
    group.WaveformSampleInterpretation = interpretation
    rng = np.random.default_rng(32)
    group.WaveformData = rng.integers(0, 255, 800 * size, dtype=np.uint8).tobytes()
    ds.WaveformSequence = Sequence([group])
    return ds


def _save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, enforce_file_format=True)
    return path


def _deidentify(path: Path, profile: Profile = BASIC) -> tuple[Outcome, bytes]:
    """The outcome of the product's streaming de-identification of ``path``, and the bytes
    written (empty when held back)."""
    deidentifier = Deidentifier(profile, Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                burned_in=TRUST_PIXELS)
    out = path.with_suffix(".out")
    with open(path, "rb") as source, open(out, "w+b") as target:
        outcome = deidentifier.write(source, target)
    return outcome, b"" if outcome.held_back else out.read_bytes()


def _findings(source: Dataset, output: bytes) -> list[str]:
    """The verifier's findings in ``output`` (a de-identified copy) of ``source``."""
    identity = Verifier.identity([source])
    return [str(f) for f in Verifier(ocr="never").check_dicom(io.BytesIO(output), identity,
                                                              "out.dcm")]


# -- recorded sound ---------------------------------------------------------------------------


@pytest.mark.parametrize(("sop_class", "interpretation", "modality"), [
    (BASIC_VOICE_AUDIO, "MB", "AU"),  # a dictation
    (GENERAL_AUDIO, "SS", "AU"),  # any sound, linear samples
    (GENERAL_ECG, "AB", "ECG"),  # A-law samples are sound whatever the class says
])
@pytest.mark.parametrize("profile", [BASIC, TEACHING], ids=["basic", "teaching"])
def test_recorded_sound_is_held_back(tmp_path, sop_class, interpretation, modality, profile):
    """A voice recording was written with its samples as they were: the patient's name
    spoken in it left, and nothing (no text search, no OCR) could find it."""
    path = _save(_waveform(sop_class, interpretation, modality), tmp_path / "audio.dcm")
    outcome, data = _deidentify(path, profile)
    assert outcome.held_back
    assert outcome.report["reason"].startswith("recorded sound")  # not left to the verifier
    assert data == b""


def test_recorded_sound_is_held_back_in_memory():
    deidentifier = Deidentifier(BASIC, Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                burned_in=TRUST_PIXELS)
    outcome = deidentifier.instance(_waveform(BASIC_VOICE_AUDIO, "MB", "AU"))
    assert outcome.held_back and outcome.report["reason"].startswith("recorded sound")


@pytest.mark.parametrize("profile", [BASIC, TEACHING], ids=["basic", "teaching"])
def test_an_image_that_shows_the_patients_face_is_held_back(tmp_path, profile):
    """Recognizable Visual Features YES (a face photograph, a head surface rendering): only
    the Clean Recognizable Visual Features Option removes them (PS3.15 E.1), which no profile
    offers; the image went out as it was. A NO image is de-identified as before."""
    face = _source()
    face.RecognizableVisualFeatures = "YES"
    outcome, data = _deidentify(_save(face, tmp_path / "face.dcm"), profile)
    assert outcome.held_back and "recognisable features" in outcome.report["reason"]
    assert data == b""
    plain = _source()
    plain.RecognizableVisualFeatures = "NO"
    outcome, data = _deidentify(_save(plain, tmp_path / "plain.dcm"), profile)
    assert not outcome.held_back and data


def test_an_ecg_is_still_de_identified(tmp_path):
    path = _save(_waveform(GENERAL_ECG, "SS", "ECG"), tmp_path / "ecg.dcm")
    outcome, data = _deidentify(path)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert len(out.WaveformSequence[0].WaveformData) == 1600
    assert [s for s in SECRETS if s in data.upper()] == []


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(("sop_class", "interpretation"), [
    (BASIC_VOICE_AUDIO, "MB"), (GENERAL_ECG, "AB")])
def test_verifier_finds_recorded_sound(tmp_path, syntax, sop_class, interpretation):
    source = _waveform(sop_class, interpretation, "AU")
    copy = _anonymous(_waveform(sop_class, interpretation, "AU"))
    written = _save(copy, tmp_path / "written.dcm", syntax)
    assert any("recorded sound" in f for f in _findings(source, written.read_bytes()))


def test_verifier_finds_recorded_sound_in_big_endian(tmp_path):
    """Read with pydicom (the raw reader takes little endian only)."""
    source = _waveform(BASIC_VOICE_AUDIO, "MB", "AU")
    copy = _anonymous(_waveform(BASIC_VOICE_AUDIO, "MB", "AU"))
    copy.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.2")
    path = tmp_path / "written.dcm"
    copy.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    assert any("recorded sound" in f for f in _findings(source, path.read_bytes()))


def test_an_ecg_is_no_sound_to_the_verifier(tmp_path):
    source = _waveform(GENERAL_ECG, "SS", "ECG")
    written = _save(_anonymous(_waveform(GENERAL_ECG, "SS", "ECG")), tmp_path / "ecg.dcm")
    assert not any("sound" in f for f in _findings(source, written.read_bytes()))


# -- overlays where no viewer shows them ---------------------------------------------------


def _overlay_in(ds: Dataset, group: int) -> Dataset:
    """``ds`` with an 8x8 overlay plane in ``group``: a bitmap (text drawn in it would be
    read only by OCR)."""
    ds.add_new((group << 16) | 0x0010, "US", 8)
    ds.add_new((group << 16) | 0x0011, "US", 8)
    ds.add_new((group << 16) | 0x0040, "CS", "G")
    ds.add_new((group << 16) | 0x0050, "SS", [1, 1])
    ds.add_new((group << 16) | 0x0100, "US", 1)
    ds.add_new((group << 16) | 0x0102, "US", 0)
    ds.add_new((group << 16) | 0x3000, "OW", bytes([0x5A, 0xA5] * 4))
    return ds


def _nested_overlay(ds: Dataset) -> Dataset:
    """``ds`` with an overlay plane inside an item of the Referenced Image Sequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.2.1143.32.1"
    ds.ReferencedImageSequence = Sequence([_overlay_in(item, 0x6000)])
    return ds


def _groups(data: bytes) -> set[int]:
    """The 60xx groups of a written data set, at any depth."""
    return {e.tag.group for e in dcmread(io.BytesIO(data)).iterall()
            if e.tag.group & 0xFF00 == 0x6000}


@pytest.mark.parametrize("group", [0x6020, 0x6022, 0x60FE])
def test_an_overlay_beyond_the_overlay_groups_does_not_leave(tmp_path, group):
    """Clean Graphics kept every 60xx,3000 (the table's repeating group), but read with OCR
    only the sixteen overlay groups 6000-601E: a bitmap in 6022 left unread."""
    path = _save(_overlay_in(_source(), group), tmp_path / "stray.dcm")
    outcome, data = _deidentify(path, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    assert group not in _groups(data)


@pytest.mark.parametrize("profile", [BASIC, TEACHING], ids=["basic", "teaching"])
def test_an_overlay_in_a_sequence_item_does_not_leave(tmp_path, profile):
    path = _save(_nested_overlay(_source()), tmp_path / "nested.dcm")
    outcome, data = _deidentify(path, profile)
    assert not outcome.held_back, outcome.report.get("reason")
    assert _groups(data) == set()
    assert "ReferencedImageSequence" in dcmread(io.BytesIO(data))


def test_a_top_level_overlay_is_still_kept_by_clean_graphics(tmp_path):
    path = _save(_overlay_in(_source(), 0x6002), tmp_path / "overlay.dcm")
    outcome, data = _deidentify(path, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    assert dcmread(io.BytesIO(data)).overlay_array(0x6002).shape == (8, 8)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("where", ["group 6022", "sequence item"])
def test_verifier_finds_overlays_no_viewer_shows(tmp_path, syntax, where):
    source = _source()
    copy = _anonymous(_source())
    copy = _overlay_in(copy, 0x6022) if where == "group 6022" else _nested_overlay(copy)
    written = _save(copy, tmp_path / "written.dcm", syntax)
    assert any("overlay data outside" in f for f in _findings(source, written.read_bytes()))


def test_verifier_takes_a_top_level_overlay_for_an_overlay(tmp_path):
    source = _source()
    written = _save(_overlay_in(_anonymous(_source()), 0x6000), tmp_path / "written.dcm")
    assert not any("overlay data outside" in f for f in _findings(source, written.read_bytes()))


# -- captures that say they carry no text ---------------------------------------------------


def _screenshot(flag: str = "NO", text: str = "HARGREAVES MRN4471932") -> Dataset:
    """A workstation's colour screenshot of a CT (Secondary Capture, Modality CT) with the
    patient's name and ID drawn on it, whose Burned In Annotation says ``flag``."""
    from PIL import Image, ImageDraw, ImageFont

    from tests.unit.test_deid_pixels import FONT

    ds = _source()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.BurnedInAnnotation = flag
    image = Image.new("RGB", (480, 160), (0, 0, 0))
    ImageDraw.Draw(image).text((10, 60), text, fill=(255, 255, 255),
                               font=ImageFont.truetype(FONT, 28))
    ds.set_pixel_data(np.asarray(image), "RGB", 8, generate_instance_uid=False)
    return ds


@pytest.mark.parametrize(("sop_class", "samples"), [
    ("1.2.840.10008.5.1.4.1.1.77.1.1", 1),  # VL Endoscopic, grey
    ("1.2.840.10008.5.1.4.1.1.7.4", 3),  # Multi-frame True Colour Secondary Capture
    ("1.2.840.10008.5.1.4.1.1.77.1.4", 3),  # VL Photographic
    ("1.2.840.10008.5.1.4.1.1.4", 3),  # a colour MR (a workstation's fusion)
])
def test_colour_and_visible_light_images_are_read_for_text_whatever_their_flag(sop_class,
                                                                              samples):
    """The verifier reads these with OCR whatever Burned In Annotation says; the
    de-identifier trusted a NO and copied them as they were, so one with a name drawn on it
    was held back instead of cleaned. (A grey Secondary Capture that says NO is still
    trusted: the verifier reads it, so one with text is held back, not cleaned.)"""
    from imageshare.deid.pixels import may_have_burned_in_text

    ds = _source()
    ds.Modality = "CT" if samples == 1 else "MR"
    ds.SOPClassUID = sop_class
    ds.SamplesPerPixel = samples
    assert may_have_burned_in_text(ds)
    ds.SOPClassUID, ds.SamplesPerPixel = "1.2.840.10008.5.1.4.1.1.2", 1
    assert not may_have_burned_in_text(ds)  # a grey CT that says NO: trusted


def test_a_screenshot_that_says_no_text_is_cleaned_not_held_back(tmp_path):
    import shutil

    from tests.conftest import require

    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    source = _screenshot()
    path = _save(source, tmp_path / "screenshot.dcm")
    deidentifier = Deidentifier(BASIC, Pseudonyms(SECRET), verifier=Verifier())
    out = tmp_path / "screenshot.out"
    with open(path, "rb") as stream, open(out, "w+b") as target:
        outcome = deidentifier.write(stream, target)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixels"]["blanked_lines"] >= 1


# -- text two bytes a letter in kept words --------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_verifier_reads_utf16_text_in_words_kept_as_they_are(tmp_path, encoding, syntax):
    """LUT data (OW) is kept as it is; the verifier read OB and UN values for UTF-16 text but
    not OW ones, so a name written two bytes a letter in a LUT was not found."""
    source = _source()
    copy = _anonymous(_source())
    lut = Dataset()
    lut.LUTDescriptor = [16, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.LUTData = (" HARGREAVES WINIFRED ".encode(encoding) + b"\0" * 32)[:32]
    lut["LUTData"].VR = "OW"
    copy.ModalityLUTSequence = Sequence([lut])
    written = _save(copy, tmp_path / "written.dcm", syntax)
    assert any("patient name" in f for f in _findings(source, written.read_bytes()))


# -- a data set stored in implicit VR under an explicit VR transfer syntax -----------------------


def _implicit_under_explicit(path: Path, ds: Dataset) -> Path:
    """``ds`` written as a file whose file meta says Explicit VR Little Endian but whose data
    set is in implicit VR (a fault of some writers; pydicom reads such files)."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        out = DicomFileLike(fp)
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)
        out.is_implicit_VR, out.is_little_endian = True, True
        write_dataset(out, ds)
    return path


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in memory"])
def test_an_implicit_data_set_under_an_explicit_syntax_is_de_identified(tmp_path, in_memory):
    """Such a file failed ("could not be de-identified (TypeError)"): its elements, read
    without a VR, could not be written in explicit VR; streamed, its pixel data element (in
    implicit VR) would have been copied into an explicit VR file."""
    source = _source()
    source.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    path = _implicit_under_explicit(tmp_path / "mixed.dcm", source)
    if in_memory:
        deidentifier = Deidentifier(BASIC, Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                    burned_in=TRUST_PIXELS)
        outcome = deidentifier.instance(dcmread(path))
        assert not outcome.held_back, outcome.report.get("reason")
        assert outcome.dataset is not None
        buffer = io.BytesIO()
        outcome.dataset.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    else:
        outcome, data = _deidentify(path)
        assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, np.arange(64, dtype=np.uint16).reshape(8, 8))
    assert [s for s in SECRETS if s in data.upper()] == []


# -- sound kept in a curve group (retired Audio Sample Data) --------------------------------


def _curve_with_audio(ds: Dataset) -> Dataset:
    """``ds`` with a curve group (5000) holding retired audio: a curve and its sound."""
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50000010, "US", 4)
    ds.add_new(0x50000020, "CS", "TAC")
    ds.add_new(0x50003000, "OW", bytes(range(16)))
    ds.add_new(0x50002000, "US", 1)
    ds.add_new(0x5000200C, "OW", np.random.default_rng(5).integers(0, 255, 64, np.uint8)
               .tobytes())
    return ds


@pytest.mark.parametrize("profile", [BASIC, TEACHING], ids=["basic", "teaching"])
def test_audio_in_a_curve_group_does_not_leave(tmp_path, profile):
    """Clean Graphics keeps curves (50xx) as they are, and with them the retired Audio Sample
    Data (50xx,200C): recorded sound."""
    path = _save(_curve_with_audio(_source()), tmp_path / "curve.dcm")
    outcome, data = _deidentify(path, profile)
    assert not outcome.held_back, outcome.report.get("reason")
    assert 0x5000200C not in dcmread(io.BytesIO(data))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_verifier_finds_audio_in_a_curve_group(tmp_path, syntax):
    source = _source()
    written = _save(_curve_with_audio(_anonymous(_source())), tmp_path / "written.dcm", syntax)
    assert any("recorded sound" in f for f in _findings(source, written.read_bytes()))


# -- a Japanese reading written in the other kana ----------------------------------------------


@pytest.mark.parametrize(("charset", "name", "written"), [
    (["", "ISO 2022 IR 87", "ISO 2022 IR 13"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ"),
    ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう", "ヤマダ タロウ"),
    ("ISO_IR 192", "Yamada^Tarou=山田^太郎=ヤマダ^タロウ", "やまだ"),
])
def test_a_reading_in_the_other_kana_is_cleaned(tmp_path, charset, name, written):
    """The phonetic group holds the reading in hiragana, the text in katakana (half-width,
    as JIS X 0201 writes it, or full-width), or the other way round: the same name, which
    neither the de-identifier nor the verifier took for it."""
    source = _source()
    source.SpecificCharacterSet = charset
    source.PatientName = name
    source.ImageComments = f"{written} 様"
    source.StudyDescription = f"CT {written}"
    outcome, data = _deidentify(_save(source, tmp_path / "kana.dcm"), TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert written not in str(out.get("ImageComments", ""))
    assert written not in str(out.get("StudyDescription", ""))


@pytest.mark.parametrize(("name", "written"), [
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ"),
    ("Yamada^Tarou=山田^太郎=ヤマダ^タロウ", "やまだ"),
])
def test_verifier_reads_a_reading_in_the_other_kana(tmp_path, name, written):
    source = _source()
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = name
    copy = _anonymous(_source())
    copy.ImageComments = f"{written} 様"
    written_path = _save(copy, tmp_path / "written.dcm")
    assert any("patient name" in f for f in _findings(source, written_path.read_bytes()))


def test_an_unreadable_number_of_frames_is_refused_with_a_reason(tmp_path):
    """Number of Frames "1A" (pydicom keeps it as text): the length check compared a number
    with a string and the file failed with a TypeError instead of a reason."""
    from imageshare.deid.service import IncompleteInstance

    source = _source()
    source.NumberOfFrames = "1"
    path = _save(source, tmp_path / "frames.dcm")
    path.write_bytes(path.read_bytes().replace(b"IS\x02\x001 ", b"IS\x02\x001A"))
    with pytest.raises(IncompleteInstance, match="unreadable"):
        _deidentify(path)
