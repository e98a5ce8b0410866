"""STOW-RS and WADO-RS (tests/unit/test_dicomweb.py) with the blobs on S3: whole instances,
metadata, frames (ranged reads) as stored and decoded, rendered images."""

from tests.unit.test_dicomweb import (  # noqa: F401 - collected here with the S3 fixtures
    stored,
    test_frames_of_jpeg2000_as_stored_or_decoded,
    test_frames_of_native_cine_are_raw_pixels,
    test_metadata_has_header_and_bulk_data_uri_for_pixels,
    test_missing_frame_is_404,
    test_rendered_window_changes_pixels,
    test_stow_stores_and_reports_each_instance,
    test_wado_default_transfer_syntax_decompresses_jpeg2000,
    test_wado_study_returns_every_instance_byte_identical,
)
