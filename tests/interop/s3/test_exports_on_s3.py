"""Exports (tests/unit/test_exports.py) with the blobs on S3."""

from tests.unit.test_exports import (  # noqa: F401 - collected here with the S3 fixtures
    _tesseract,
    study,
    test_cine_exports_as_mp4_at_its_frame_rate,
    test_deidentified_zip_export_holds_no_patient_data,
)
