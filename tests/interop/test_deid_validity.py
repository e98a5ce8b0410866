"""Every de-identified output stays valid DICOM: pydicom reads it and dciodvfy (dicom3tools)
reports no error that the input did not already have, for one file of every object type in
pydicom's test files and for every file of the adversarial corpus, under every profile."""

from __future__ import annotations

import re
import subprocess
import warnings
from functools import cache
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import CHECK_PIXELS, TRUST_PIXELS, Deidentifier
from imageshare.verify import Verifier
from tests import corpus
from tests.conftest import require_tool

pytestmark = pytest.mark.interop
SECRET = b"validity-secret-0123456789abcdef"
# One file of every object type (SOP class) in pydicom's test files (and pydicom-data).
PYDICOM_FILES = (
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm",
    "color3d_jpeg_baseline.dcm", "emri_small.dcm", "eCT_Supplemental.dcm", "RG1_UNCR.dcm",
    "SC_rgb.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm", "rtplan.dcm", "test-SR.dcm",
    "reportsi.dcm", "waveform_ecg.dcm",
)


def _message(line: str) -> str:
    """A dciodvfy message without the values it quotes (changed values are not new errors);
    element and module names are kept."""
    line = re.sub(r'"[^"]*"', "#", line.strip())
    line = re.sub(r"(?<!Element=)(?<!Module=)<[^>]*>", "#", line)
    return re.sub(r"(?<!Type )(?<![0-9.])\d+(\.\d+)*", "#", line)


@cache
def errors(path: Path) -> frozenset[str]:
    dciodvfy = require_tool("dciodvfy")
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    return frozenset(_message(line) for line in lines if line.strip().startswith("Error"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    made = [c.path for c in corpus.build(tmp_path_factory.mktemp("corpus"))
            if not c.held_back]
    return [Path(get_testdata_file(name)) for name in PYDICOM_FILES] + made


# Images whose pixels the de-identifier rewrites (burned-in text blanked): small ones of each
# photometric kind (palette, RGB, YBR JPEG, monochrome) go through the pixel path too.
PIXEL_PATH_FILES = ("US1_UNCR.dcm", "OBXXXX1A.dcm", "SC_rgb.dcm", "us.dcm", "sc.dcm")


@pytest.mark.parametrize("profile", ["basic", "teaching", "research", "accreditation"])
def test_outputs_have_no_new_dciodvfy_errors(tmp_path, sources, profile):
    """Attributes under every profile (pixel data copied as stored), and the pixel path for
    images of every photometric kind under the Basic Profile."""
    require_tool("dciodvfy")
    burned_in = TRUST_PIXELS if profile != "basic" else CHECK_PIXELS
    deidentifier = Deidentifier(DEFAULT_PROFILES[profile], Pseudonyms(SECRET),
                                verifier=Verifier(ocr="never"), burned_in=burned_in)
    checked = 0
    for source in sources:
        if burned_in == CHECK_PIXELS and source.name not in PIXEL_PATH_FILES and dcmread(
                source, stop_before_pixels=True).get("Modality") in ("US", "CR", "SC", "OT"):
            continue  # large images: their attributes are checked under the other profiles
        out = tmp_path / f"{profile}-{source.name}"
        with open(source, "rb") as fp, open(out, "w+b") as target, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = deidentifier.write(fp, target)
        if outcome.held_back:
            reason = outcome.report.get("reason", "")
            # the corpus's PDF, and its JPEG comment when pixels are not decoded
            assert "encapsulated" in reason or "comment" in reason, (source.name, reason)
            continue
        checked += 1
        back = dcmread(out)
        assert back.PatientIdentityRemoved == "YES"
        if "PixelData" in back:
            _ = back.pixel_array  # pixels still decode
        new = errors(out) - errors(source)
        assert not new, (source.name, sorted(new))
    assert checked >= (len(sources) - 3 if burned_in == TRUST_PIXELS else len(PIXEL_PATH_FILES))
