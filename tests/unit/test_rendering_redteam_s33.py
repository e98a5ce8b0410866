"""Rendering and transcoding against the standard and a real peer (DCMTK's dcm2pnm): palettes,
the header's own window and VOI LUT, enhanced multi-frame functional groups, floating-point
pixels, 16-bit colour, codestreams that lie about their size, deflated data sets, lossy
sources sent losslessly, animations over the budget."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import get_encoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from imageshare.archive import pixel_budget
from imageshare.archive.pixel_budget import PixelLimits, decode_frame
from imageshare.archive.rendering import RenderOptions, render_animation, render_frame
from imageshare.archive.transcode import transcode
from imageshare.archive.viewing import is_colour, starting_window
from imageshare.domain.errors import ImageTooLarge, NotAcceptable

DCM2PNM = shutil.which("dcm2pnm")
needs_dcmtk = pytest.mark.skipif(DCM2PNM is None, reason="DCMTK's dcm2pnm is not installed")


@pytest.fixture(autouse=True)
def default_budget():
    """Each test starts, and leaves the process, with the default budget."""
    pixel_budget.configure(PixelLimits())
    yield
    pixel_budget.configure(PixelLimits())


def _image(rows: int = 16, columns: int = 16, **values) -> Dataset:
    """A 16-bit MONOCHROME2 Secondary Capture header; ``values`` override or add attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _ours(path: Path, frame: int = 0, **options) -> np.ndarray:
    with open(path, "rb") as stream:
        png = render_frame(stream, frame, RenderOptions(media_type="image/png", **options))
    return np.asarray(Image.open(io.BytesIO(png)))


def _dcmtk(path: Path, *options: str) -> np.ndarray:
    out = path.with_suffix(".dcmtk.png")
    subprocess.run([DCM2PNM, *options, "+on", str(path), str(out)], check=True,
                   capture_output=True)
    return np.asarray(Image.open(out))


def _palette(path: Path, red_entry: int) -> Path:
    ds = _image(BitsAllocated=8, BitsStored=8, HighBit=7,
                PhotometricInterpretation="PALETTE COLOR")
    pixels = np.zeros((16, 16), np.uint8)
    pixels[:, 8:] = 1
    ds.PixelData = pixels.tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
    ds.RedPaletteColorLookupTableData = np.array([0, red_entry] + [0] * 254, "<u2").tobytes()
    ds.GreenPaletteColorLookupTableData = np.zeros(256, "<u2").tobytes()
    ds.BluePaletteColorLookupTableData = np.zeros(256, "<u2").tobytes()
    return _save(ds, path)


def test_a_palette_colour_image_is_rendered_in_its_palettes_colours(tmp_path):
    """PS3.3 C.7.6.3.1.5: the stored values index a colour palette; shown as grey indices
    before. A 16-bit entry of 32768 is half red."""
    path = _palette(tmp_path / "palette.dcm", 32768)
    ours = _ours(path)
    assert ours.shape == (16, 16, 3)
    assert list(ours[0, 0]) == [0, 0, 0]
    assert abs(int(ours[0, 15, 0]) - 128) <= 1 and list(ours[0, 15, 1:]) == [0, 0]
    if DCM2PNM:
        assert np.abs(ours.astype(int) - _dcmtk(path).astype(int)).max() <= 1


@needs_dcmtk
def test_pydicoms_palette_files_render_as_dcmtk_renders_them(tmp_path):
    for name in ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"):
        path = Path(get_testdata_file(name))
        ours = _ours(path).astype(float)
        theirs = _dcmtk(path, "+Wm").astype(float)
        assert ours.shape == theirs.shape, name
        assert np.abs(ours - theirs).mean() < 1.0, name


@needs_dcmtk
def test_the_headers_window_maps_to_the_whole_grey_range_not_to_the_values_present(tmp_path):
    """Values 100 and 200 under a window of 1000/2000 are dark greys (as DCMTK shows them),
    not black and white; a uniform image at the window's centre is mid-grey, not black."""
    ds = _image(WindowCenter=1000, WindowWidth=2000)
    pixels = np.full((16, 16), 100, np.uint16)
    pixels[:, 8:] = 200
    ds.PixelData = pixels.tobytes()
    path = _save(ds, tmp_path / "wide.dcm")
    ours, theirs = _ours(path), _dcmtk(path, "+Wi", "1")
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert 5 < ours[0, 0] < ours[0, 15] < 40

    ds = _image(WindowCenter=1000, WindowWidth=400)
    ds.PixelData = np.full((16, 16), 1000, np.uint16).tobytes()
    assert abs(int(_ours(_save(ds, tmp_path / "flat.dcm"))[0, 0]) - 128) <= 1


@needs_dcmtk
@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR"])
def test_the_headers_voi_lut_function_and_first_window_are_used(tmp_path, function):
    ds = _image(WindowCenter=[2000, 100], WindowWidth=[1500, 10], VOILUTFunction=function)
    ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).tobytes()
    path = _save(ds, tmp_path / f"{function}.dcm")
    assert np.abs(_ours(path).astype(int) - _dcmtk(path, "+Wi", "1").astype(int)).max() <= 1


def test_a_voi_lut_sequence_without_a_window_is_applied(tmp_path):
    """PS3.3 C.11.2.1.1: an inverting VOI LUT shows 0 white and 1 black."""
    ds = _image()
    pixels = np.zeros((16, 16), np.uint16)
    pixels[:, 8:] = 1
    ds.PixelData = pixels.tobytes()
    item = Dataset()
    item.LUTDescriptor = [2, 0, 8]
    item.LUTData = np.array([255, 0], "<u2").tobytes()
    ds.VOILUTSequence = [item]
    path = _save(ds, tmp_path / "voilut.dcm")
    ours = _ours(path)
    assert (ours[0, 0], ours[0, 15]) == (255, 0)
    if DCM2PNM:
        assert np.array_equal(ours, _dcmtk(path, "+Wl", "1"))


def _enhanced(path: Path) -> Path:
    """Two frames of 0 HU and 100 HU (stored + 1024, the rescale in the Shared Functional
    Groups) with a window of their own each (Per-frame Functional Groups)."""
    ds = _image(NumberOfFrames=2)
    pixels = np.full((2, 16, 16), 1024, np.uint16)
    pixels[:, :, 8:] = 1124
    ds.PixelData = pixels.tobytes()
    shared, transform = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for center in (0, 100):
        group, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 200
        group.FrameVOILUTSequence = [voi]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    return _save(ds, path)


def test_each_frame_of_an_enhanced_instance_uses_its_own_rescale_and_window(tmp_path):
    path = _enhanced(tmp_path / "enhanced.dcm")
    first, second = _ours(path, 0), _ours(path, 1)
    assert abs(int(first[0, 0]) - 128) <= 1 and first[0, 15] == 255
    assert second[0, 0] == 0 and abs(int(second[0, 15]) - 128) <= 1
    assert starting_window(dcmread(path)) == [0.0, 200.0]


def test_floating_point_pixels_with_nan_render_and_keep_the_range_of_the_rest(tmp_path):
    ds = _image()
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    pixels = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    pixels[0, 0] = np.nan
    ds.FloatPixelData = pixels.tobytes()
    ours = _ours(_save(ds, tmp_path / "float.dcm"))
    assert ours[0, 0] == 0 and ours[15, 15] == 255 and 100 < ours[8, 0] < 155


def test_16_bit_colour_is_scaled_from_its_bit_depth_not_from_its_brightest_pixel(tmp_path):
    ds = _image(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    pixels = np.zeros((16, 16, 3), np.uint16)
    pixels[..., 0] = 1000  # dark red: 1000 of 65535
    ds.PixelData = pixels.tobytes()
    assert _ours(_save(ds, tmp_path / "rgb16.dcm"))[0, 0, 0] <= 5


def _lying_codestream(path: Path, syntax: str, claimed: int) -> Path:
    """A 64 x 64 image whose one compressed frame declares ``claimed`` x ``claimed`` pixels in
    its own header (JPEG-LS SOF55, or JPEG 2000 SIZ)."""
    ds = _image(64, 64, BitsAllocated=8, BitsStored=8, HighBit=7)
    code = bytearray(get_encoder(syntax).encode(
        np.zeros((64, 64), np.uint8).tobytes(), rows=64, columns=64, samples_per_pixel=1,
        bits_allocated=8, bits_stored=8, pixel_representation=0,
        photometric_interpretation="MONOCHROME2", number_of_frames=1))
    if syntax == JPEGLSLossless:
        at = code.find(b"\xff\xf7")
        struct.pack_into(">HH", code, at + 5, claimed, claimed)
    else:
        at = code.find(b"\xff\x51")
        struct.pack_into(">II", code, at + 6, claimed, claimed)
        struct.pack_into(">II", code, at + 22, claimed, claimed)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([bytes(code)])
    ds["PixelData"].VR = "OB"
    return _save(ds, path)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_a_frame_whose_codestream_claims_more_pixels_than_its_header_is_refused_unread(
        tmp_path, syntax):
    """The decoder sizes its buffers from the codestream: 20000 x 20000 claimed in a 64 x 64
    image took 400 MB (JPEG 2000) to 1.7 GB (JPEG-LS, 30000) before it failed."""
    path = _lying_codestream(tmp_path / "liar.dcm", syntax, 20000)
    with pytest.raises(ImageTooLarge, match="20000 × 20000"):
        _ours(path)
    with open(path, "rb") as stream, pytest.raises(ImageTooLarge):
        decode_frame(stream, 0)
    with open(path, "rb") as stream, pytest.raises(NotAcceptable, match="20000"):
        transcode(stream, ExplicitVRLittleEndian)


def test_only_the_lying_frame_of_a_cine_is_refused(tmp_path):
    """Each frame's codestream is checked when it is decoded: frame 1 renders, frame 2
    (claiming 20000 x 20000) is refused, and the whole instance is not transcoded."""
    honest = dcmread(_lying_codestream(tmp_path / "a.dcm", JPEGLSLossless, 64))
    liar = dcmread(_lying_codestream(tmp_path / "b.dcm", JPEGLSLossless, 20000))
    fragments = [next(generate_fragments(ds.PixelData[8 + int.from_bytes(
        ds.PixelData[4:8], "little"):])) for ds in (honest, liar)]  # after the BOT
    honest.PixelData = encapsulate(fragments)
    honest.NumberOfFrames = 2
    path = _save(honest, tmp_path / "cine.dcm")
    assert _ours(path, 0).shape == (64, 64)
    with pytest.raises(ImageTooLarge, match="20000"):
        _ours(path, 1)
    with open(path, "rb") as stream, pytest.raises(NotAcceptable, match="20000"):
        transcode(stream, ExplicitVRLittleEndian)


@needs_dcmtk
@pytest.mark.parametrize("name", ["MR_small.dcm", "RG1_UNCR.dcm", "RG3_UNCI.dcm"])
def test_real_files_render_with_their_own_window_as_dcmtk_renders_them(name):
    """MR with a window (was stretched again to the values present), and MONOCHROME1
    computed radiography (inverted after the window)."""
    path = Path(get_testdata_file(name))
    ours, theirs = _ours(path).astype(int), _dcmtk(path, "+Wi", "1").astype(int)
    assert np.abs(ours - theirs).max() <= 1


def test_an_honest_compressed_frame_still_renders(tmp_path):
    path = _lying_codestream(tmp_path / "honest.dcm", JPEGLSLossless, 64)
    assert _ours(path).shape == (64, 64)


def test_a_lossy_jpeg_sent_in_a_lossless_syntax_still_says_it_was_lossy(tmp_path):
    """PS3.3 C.7.6.1.1.5: once lossy compressed, Lossy Image Compression stays 01."""
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    del ds.LossyImageCompression
    path = _save(ds, tmp_path / "lossy.dcm")
    for target in (JPEG2000Lossless, ExplicitVRLittleEndian):
        with open(path, "rb") as stream:
            out = dcmread(io.BytesIO(transcode(stream, target)))
        assert out.LossyImageCompression == "01", target
        assert "ISO_10918_1" in str(out.LossyImageCompressionMethod), target


def test_a_deflated_instance_renders_and_its_frames_decode():
    path = Path(get_testdata_file("image_dfl.dcm"))
    assert _ours(path).shape == (512, 512)
    with open(path, "rb") as stream:
        assert decode_frame(stream, 0).shape == (512, 512)


def test_an_animation_holding_more_pictures_than_the_budget_is_refused(tmp_path):
    """Every picture of an animated GIF is held until it is written: 10 frames of 64 x 64
    (8 KB decoded each) are within a 16 KB frame budget one by one, not all at once."""
    ds = _image(64, 64, NumberOfFrames=10)
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds.PixelData = np.stack([np.roll(ramp, 7 * i, axis=1) for i in range(10)]).tobytes()
    path = _save(ds, tmp_path / "cine.dcm")
    pixel_budget.configure(PixelLimits(max_frame_bytes=16 * 1024))
    with open(path, "rb") as stream, pytest.raises(ImageTooLarge, match="viewport"):
        render_animation(stream, RenderOptions(media_type="image/gif"))
    with open(path, "rb") as stream:
        small = render_animation(stream, RenderOptions(media_type="image/gif",
                                                       viewport=(16, 16)))
    assert Image.open(io.BytesIO(small)).n_frames == 10


def test_the_viewer_treats_a_palette_as_colour_with_no_window(tmp_path):
    ds = dcmread(_palette(tmp_path / "palette.dcm", 65535))
    assert is_colour(ds)
    assert starting_window(ds) is None


def _video(tmp_path: Path) -> Path:
    """An H.264 MP4 of 320 x 240 in a DICOM instance whose header claims 16 x 16, its
    fragment after a filled Basic Offset Table (as pydicom's ``encapsulate`` writes it)."""
    from pydicom.uid import UID

    from tests.upload_media import mp4

    ds = _image(BitsAllocated=8, BitsStored=8, HighBit=7, SamplesPerPixel=3,
                PhotometricInterpretation="YBR_PARTIAL_420", PlanarConfiguration=0,
                NumberOfFrames=4)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264
    ds.PixelData = encapsulate([mp4(tmp_path / "clip.mp4", frames=4).read_bytes()])
    ds["PixelData"].VR = "OB"
    return _save(ds, tmp_path / "video.dcm")


def test_a_video_with_a_filled_basic_offset_table_plays_and_shows_its_first_picture(
        tmp_path):
    from imageshare.archive.rendering import render_video_still
    from imageshare.archive.transcode import playable_video

    path = _video(tmp_path)
    with open(path, "rb") as stream:
        assert render_video_still(stream, RenderOptions()).startswith(b"\xff\xd8")
    with open(path, "rb") as stream:
        assert playable_video(stream, "1.2.840.10008.1.2.4.102")[4:8] == b"ftyp"


def test_a_video_still_whose_pictures_are_over_the_budget_is_refused_before_decoding(tmp_path):
    """The header of a video instance may claim 16 x 16 while its stream's pictures are
    320 x 240: the stream's own size is checked against the frame budget."""
    from imageshare.archive.rendering import render_video_still

    path = _video(tmp_path)
    pixel_budget.configure(PixelLimits(max_frame_bytes=64 * 1024))
    with open(path, "rb") as stream, pytest.raises(ImageTooLarge, match="320 × 240"):
        render_video_still(stream, RenderOptions())
