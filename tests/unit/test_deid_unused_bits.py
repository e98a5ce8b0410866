"""Bits of native pixel data outside Bits Stored (a retired overlay drawn in bit 15 of a CT)
are cleared in every de-identified copy, and the verifier finds data left there."""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread

from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from imageshare.verify import Verifier
from tests.factory import ct_series

SECRET = b"unused-bits-secret-0123456789abc"


def _ct(folder, signed: bool = False, hidden: bool = True):
    """A 12-bit CT (Burned In Annotation NO) with a block of bit 15 set, as a retired
    overlay in the pixel data would be."""
    (path,) = ct_series(folder, count=1, size=64, BurnedInAnnotation="NO")
    ds = dcmread(path)
    values = np.random.default_rng(3).integers(0, 4096, (64, 64)).astype(np.uint16)
    if signed:
        ds.PixelRepresentation = 1
        values = (values.astype(np.int16) - 2048).astype(np.uint16)  # sign-extended
        if not hidden:
            ds.PixelData = values.tobytes()
            ds.save_as(path)
            return path, values
    expected = values & 0x0FFF if not signed else values
    if hidden:
        values[10:20, 5:50] = (values[10:20, 5:50] & 0x0FFF) | 0x8000
    ds.PixelData = values.tobytes()
    for tag, vr, value in ((0x60000010, "US", 64), (0x60000011, "US", 64),
                           (0x60000040, "CS", "G"), (0x60000050, "SS", [1, 1]),
                           (0x60000100, "US", 16), (0x60000102, "US", 15)):
        ds.add_new(tag, vr, value)
    ds.save_as(path)
    return path, expected


def _deidentifier() -> Deidentifier:
    return Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET), verifier=Verifier())


def _samples(data: bytes) -> np.ndarray:
    return np.frombuffer(dcmread(io.BytesIO(data)).PixelData, "<u2")


def test_a_streamed_copy_clears_bit_15_and_keeps_the_image(tmp_path):
    source, _ = _ct(tmp_path / "in")
    assert np.any(_samples(source.read_bytes()) & 0x8000)
    out = tmp_path / "out.dcm"
    with open(source, "rb") as fp, open(out, "w+b") as target:
        outcome = _deidentifier().write(fp, target)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixel_data"] == "copied with the bits outside Bits Stored cleared"
    assert not np.any(_samples(out.read_bytes()) & 0xF000)
    assert np.array_equal(dcmread(out).pixel_array, dcmread(source).pixel_array)
    assert not any(tag.group == 0x6000 for tag in dcmread(out).keys())


def test_an_instance_in_memory_is_cleared_too(tmp_path):
    source, _ = _ct(tmp_path / "in")
    outcome = _deidentifier().instance(dcmread(source))
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixels"]["unused_bits_cleared"]
    assert not np.any(np.frombuffer(outcome.dataset.PixelData, "<u2") & 0xF000)


def test_signed_values_keep_their_sign_extension_and_are_copied_as_stored(tmp_path):
    source, values = _ct(tmp_path / "in", signed=True, hidden=False)
    out = tmp_path / "out.dcm"
    with open(source, "rb") as fp, open(out, "w+b") as target:
        outcome = _deidentifier().write(fp, target)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixel_data"] == "copied as stored"
    assert np.array_equal(_samples(out.read_bytes()), values.ravel())


def test_the_verifier_finds_data_left_in_the_unused_bits(tmp_path):
    source, _ = _ct(tmp_path / "in")
    identity = Verifier.identity([dcmread(source, stop_before_pixels=True)])
    with open(source, "rb") as fp:
        findings = Verifier(ocr="never").check_dicom(fp, identity, "out.dcm")
    assert any(f.kind == "data hidden in the pixel data's unused bits" for f in findings)
    clean, _ = _ct(tmp_path / "clean", hidden=False)
    with open(clean, "rb") as fp:
        findings = Verifier(ocr="never").check_dicom(fp, identity, "out.dcm")
    assert not any("unused bits" in f.kind for f in findings)
