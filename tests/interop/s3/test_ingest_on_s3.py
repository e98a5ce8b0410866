"""The ingest pipeline's tests (tests/unit/test_ingest.py) with the blobs on S3, on SQLite and
PostgreSQL: byte-identical storage, digests, duplicates by digest, recovery on start."""

from tests.unit.test_ingest import (  # noqa: F401 - collected here with the S3 fixtures
    test_a_failing_index_write_stores_nothing_and_is_audited,
    test_every_stored_blob_has_its_size_and_sha256_in_the_index,
    test_instances_stored_before_digests_were_recorded_are_still_recognised,
    test_new_content_under_known_uid_keeps_the_first_and_is_audited,
    test_pipeline_leaves_no_staging_files,
    test_same_instance_twice_is_a_success_that_changes_nothing,
    test_start_up_recovery_looks_only_at_blobs_made_since_the_previous_start,
    test_stored_instance_is_indexed_and_byte_identical,
    test_unindexed_blob_is_recovered_on_start,
)
