"""docs/conformance.md is generated from the code's own tables and cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_conformance_statement_is_generated_from_the_code():
    documented = (ROOT / "docs" / "conformance.md").read_text()
    generated = subprocess.run([sys.executable, "-m", "imageshare", "conformance"],
                               capture_output=True, text=True, check=True).stdout
    assert documented == generated, "regenerate: imageshare conformance > docs/conformance.md"
    for needle in ("Explicit VR Big Endian", "C-FIND | `C001`", "`0111`", "Multiple value",
                   "/rendered", "application/dicom+xml"):
        assert needle in documented
    assert "docs/conformance.md" in (ROOT / "README.md").read_text()
