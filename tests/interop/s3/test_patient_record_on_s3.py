"""Corrections and merges of patient details (tests/unit/test_patient_record.py) with the
blobs on S3: every instance rewritten into the object store, digests recorded."""

from tests.unit.test_patient_record import (  # noqa: F401 - collected here with the S3 fixtures
    test_a_correction_records_the_digests_of_the_rewritten_blobs,
    test_a_pdf_report_is_stored_as_encapsulated_pdf_in_the_same_study,
    test_correcting_an_emergency_study_rewrites_headers_and_keeps_history,
    test_merging_two_records_moves_every_study,
)
