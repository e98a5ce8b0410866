"""Burned-in text that a plain upright read of a few frames misses: written vertically, or
shown on a single frame of a speckled loop. Both are found and blanked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from imageshare.deid.engine import identifiers_of
from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from tests.conftest import require
from tests.unit.test_deid_pixels import FONT, SECRET, read_identifiers, ultrasound_with_text


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


def _text_image(text: str, size: tuple[int, int]) -> np.ndarray:
    font = ImageFont.truetype(FONT, 22)
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).text((6, 4), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def test_a_name_written_up_the_side_of_the_image_is_found_and_blanked():
    ds = ultrasound_with_text("SONOSITE EDGE", manufacturer="Unlisted")
    pixels = ds.pixel_array.copy()
    label = np.rot90(_text_image("GARCIA HX77123", (240, 32)))  # reads bottom to top
    pixels[200:200 + label.shape[0], 590:590 + label.shape[1]] = label
    ds.set_pixel_data(pixels, "RGB", 8, generate_instance_uid=False)
    turned = np.ascontiguousarray(np.rot90(pixels, 3))
    ids = identifiers_of(ds)
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    assert not outcome.held_back, outcome.report.get("reason")
    report = outcome.report["pixels"]
    assert any(f["where"] == "turned a quarter" for f in report["identifiers_found"])
    cleaned = outcome.dataset.pixel_array
    assert int(cleaned[200:440, 590:622].max()) == 0  # the label is gone
    assert cleaned[270, 320].tolist() == [90, 90, 90]  # the scan area is not
    ds.set_pixel_data(np.ascontiguousarray(np.rot90(cleaned, 3)), "RGB", 8,
                      generate_instance_uid=False)
    assert read_identifiers(ds, ids) == []
    ds.set_pixel_data(turned, "RGB", 8, generate_instance_uid=False)
    assert read_identifiers(ds, ids)  # the test's label can be read when upright


def test_a_name_shown_on_one_frame_of_a_speckled_loop_is_found_and_blanked():
    frames = 40
    ds = ultrasound_with_text("SONOSITE EDGE", frames=frames, manufacturer="Unlisted")
    rng = np.random.default_rng(7)
    loop = ds.pixel_array.copy()
    speckle = rng.integers(0, 256, size=(frames, 200, 300), dtype=np.uint8)
    loop[:, 150:350, 170:470] = speckle[..., np.newaxis]
    loop[17, 380:412, 180:420] = _text_image("GARCIA HX77123", (240, 32))
    ds.set_pixel_data(loop, "RGB", 8, generate_instance_uid=False)
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    assert not outcome.held_back, outcome.report.get("reason")
    report = outcome.report["pixels"]
    assert any(f["where"] == "frames where it shows briefly"
               for f in report["identifiers_found"]), report
    assert 18 not in report["frames_read"]  # it was not one of the frames read
    assert int(outcome.dataset.pixel_array[17, 385:407, 185:415].max()) == 0


def _verifier_findings(ds) -> list[str]:
    import io

    from imageshare.verify import Verifier

    identity = Verifier.identity([ds])
    copy = ds.copy()
    copy.PatientName, copy.PatientID, copy.PatientBirthDate = "Anon", "X1", ""
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return [f.where for f in Verifier(ocr="always").check_dicom(buffer, identity, "out.dcm")
            if f.where.startswith("OCR")]


def test_the_verifier_reads_a_name_up_the_side_and_on_one_frame_of_a_loop():
    ds = ultrasound_with_text("SONOSITE EDGE", manufacturer="Unlisted")
    pixels = ds.pixel_array.copy()
    pixels[200:440, 590:622] = np.rot90(_text_image("GARCIA HX77123", (240, 32)))
    ds.set_pixel_data(pixels, "RGB", 8, generate_instance_uid=False)
    assert any("turned a quarter" in where for where in _verifier_findings(ds))

    frames = 40
    ds = ultrasound_with_text("SONOSITE EDGE", frames=frames, manufacturer="Unlisted")
    loop = ds.pixel_array.copy()
    speckle = np.random.default_rng(7).integers(0, 256, size=(frames, 200, 300),
                                                dtype=np.uint8)
    loop[:, 150:350, 170:470] = speckle[..., np.newaxis]
    loop[17, 380:412, 180:420] = _text_image("GARCIA HX77123", (240, 32))
    ds.set_pixel_data(loop, "RGB", 8, generate_instance_uid=False)
    assert any("some frames only" in where for where in _verifier_findings(ds))


def _palette_image():
    """A PALETTE COLOR image whose name is drawn in palette index 1, which the palette shows
    white: the stored indexes look black."""
    ds = ultrasound_with_text("SONOSITE EDGE", manufacturer="Unlisted")
    text = _text_image("GARCIA HX77123", (300, 32))[..., 0]
    indexes = np.zeros((480, 640), np.uint8)
    indexes[200:232, 100:400] = (text > 128).astype(np.uint8)
    indexes[300:420, 150:500] = np.random.default_rng(5).integers(2, 256, (120, 350))
    ds.set_pixel_data(indexes, "MONOCHROME2", 8, generate_instance_uid=False)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = np.arange(256, dtype=np.uint16) * 257
    lut[1] = 65535
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())
    return ds


def _wide_range_image():
    """16-bit grey: the name at 600 over noise up to 300 and one saturated marker; the stored
    window (300/600) shows the name plainly, a minimum-to-maximum stretch does not."""
    ds = ultrasound_with_text("SONOSITE EDGE", manufacturer="Unlisted")
    values = np.random.default_rng(2).integers(0, 300, (480, 640)).astype(np.uint16)
    values[200:232, 100:400][_text_image("GARCIA HX77123", (300, 32))[..., 0] > 128] = 600
    values[470:480, 630:640] = 65535
    ds.set_pixel_data(values, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.WindowCenter, ds.WindowWidth = 300, 600
    return ds


@pytest.mark.parametrize("make", [_palette_image, _wide_range_image])
def test_text_a_viewer_shows_is_read_as_shown_and_blanked(make):
    ds = make()
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixels"]["identifiers_found"], outcome.report["pixels"]
    written = outcome.dataset.pixel_array[200:232, 100:400]
    assert not np.any(written == (1 if make is _palette_image else 600))  # no stroke left


@pytest.mark.parametrize("make", [_palette_image, _wide_range_image])
def test_the_verifier_reads_text_a_viewer_shows(make):
    assert _verifier_findings(make())
