"""A push to another hospital (tests/interop/test_exchange.py, Orthanc as the other site)
from an ImageShare keeping its blobs on S3: the sender reads them as temporary local
copies."""

from collections.abc import Iterator

import pytest

from tests.factory import ct_series
from tests.interop import test_exchange
from tests.interop.s3.conftest import s3_server_env
from tests.peers import RunningServer


@pytest.fixture
def hospitals(tmp_path, orthanc_factory, s3_server) -> Iterator[tuple]:
    """As tests/interop/test_exchange.py's, with this ImageShare's blobs on S3."""
    server = RunningServer(tmp_path / "here", extra_env={
        "IMAGESHARE_EXCHANGE_TIMEOUT": "3", **s3_server_env(s3_server)}).start()
    orthanc = orthanc_factory({"IMAGESHARE": ["IMAGESHARE", "127.0.0.1", server.dicom_port]},
                              plugins=[test_exchange.DICOMWEB_PLUGIN])
    files = ct_series(tmp_path / "ct", 5, patient_id=test_exchange.NHS,
                      patient_name="Curie^Marie")
    with orthanc.http() as client:
        for path in files:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
    server.cli("user", "add", *test_exchange.CLINICIAN[:1], "--role", "clinician",
               "--password", test_exchange.CLINICIAN[1])
    yield server, orthanc, files
    server.stop()
    assert not (tmp_path / "here" / "blobs").exists()
    assert not list((tmp_path / "here" / "staging").glob("copy-*"))  # temporary copies went


def test_a_push_from_s3_to_orthanc_over_dimse_is_delivered(hospitals, tmp_path):
    test_exchange.test_a_push_to_orthanc_arrives_and_is_reported_delivered(
        hospitals, tmp_path, "dimse")

