"""Share links (tests/unit/test_sharing.py) with the blobs on S3: the de-identified copies
are made from the object store."""

from tests.unit.test_sharing import (  # noqa: F401 - collected here with the S3 fixtures
    _tesseract,
    study,
    test_a_deidentified_share_never_serves_an_identifiable_byte,
    test_only_the_shared_instances_exist_under_the_link,
)
