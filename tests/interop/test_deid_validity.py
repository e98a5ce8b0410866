"""Every de-identified output stays valid DICOM: pydicom reads it and dciodvfy (dicom3tools)
reports no error that the input did not already have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from tests.conftest import require_tool
from tests.factory import ct_series, us_cine

pytestmark = pytest.mark.interop
SECRET = b"validity-secret-0123456789abcdef"


def errors(dciodvfy: str, path: Path) -> set[str]:
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    # messages without the values they quote, so that changed values are not "new" errors
    return {re.sub(r"<[^>]*>|\"[^\"]*\"|'[^']*'|\d+", "#", line.strip())
            for line in lines if line.strip().startswith("Error")}


def _inputs(tmp_path: Path) -> list[Path]:
    made = [ct_series(tmp_path / "ct", 1)[0], us_cine(tmp_path / "us", frames=4)]
    return made + [Path(get_testdata_file(n)) for n in (
        "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "color3d_jpeg_baseline.dcm")]


@pytest.mark.parametrize("profile", ["basic", "teaching", "research", "accreditation"])
def test_outputs_have_no_new_dciodvfy_errors(tmp_path, profile):
    dciodvfy = require_tool("dciodvfy")
    deidentifier = Deidentifier(DEFAULT_PROFILES[profile], Pseudonyms(SECRET))
    for source in _inputs(tmp_path):
        outcome = deidentifier.instance(dcmread(source))
        assert not outcome.held_back, (source.name, outcome.report.get("reason"))
        out = tmp_path / f"{profile}-{source.stem}.dcm"
        outcome.dataset.save_as(out, enforce_file_format=True)
        back = dcmread(out)
        assert back.PatientIdentityRemoved == "YES"
        _ = back.pixel_array  # pixels still decode
        new = errors(dciodvfy, out) - errors(dciodvfy, source)
        assert not new, (source.name, sorted(new))
