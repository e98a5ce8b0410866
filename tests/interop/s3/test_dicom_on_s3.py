"""C-STORE, C-GET and concurrent associations (tests/interop/test_dcmtk.py and
test_durability.py, real DCMTK tools) against ``imageshare serve`` keeping its blobs on S3."""

from collections.abc import Iterator

import pytest

from tests.interop.s3.conftest import s3_server_env
from tests.interop.test_dcmtk import (  # noqa: F401 - collected here with the S3 fixtures
    registered,
    test_getscu_retrieves_over_the_same_association,
    test_storescu_and_dcmsend_store_real_files_as_received,
)
from tests.interop.test_durability import (  # noqa: F401
    test_concurrent_associations_into_one_new_study_all_succeed,
)
from tests.peers import RunningServer


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server) -> Iterator[RunningServer]:
    """One server for these tests (they use different patients): starting one costs most."""
    data = tmp_path_factory.mktemp("s3-server") / "data"
    running = RunningServer(data, extra_env=s3_server_env(s3_server)).start()
    yield running
    running.stop()
    assert not (data / "blobs").exists()
