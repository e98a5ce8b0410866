"""dicomweb-client (the reference Python DICOMweb client) against a running ImageShare."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.factory import ct_series, us_cine

pytestmark = pytest.mark.interop


@pytest.fixture
def web_client(server):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {server.admin_token()}"
    return DICOMwebClient(url=server.dicomweb, session=session)


def test_stow_qido_wado_round_trip_keeps_pixels_identical(web_client, tmp_path):
    ct = ct_series(tmp_path / "ct", count=5, size=128, patient_id="DWC1")
    cine = us_cine(tmp_path / "us", frames=12, patient_id="DWC1",
                   patient_name="Doe^Jane", study_uid=dcmread(ct[0]).StudyInstanceUID)
    j2k = get_testdata_file("US1_J2KR.dcm")
    originals = [dcmread(p) for p in [*ct, cine, j2k]]
    web_client.store_instances(originals)

    studies = web_client.search_for_studies(search_filters={"PatientID": "DWC1"})
    assert len(studies) == 1
    study_uid = studies[0]["0020000D"]["Value"][0]
    series = web_client.search_for_series(study_uid)
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "US"]

    retrieved = {ds.SOPInstanceUID: ds for ds in web_client.retrieve_study(study_uid)}
    assert len(retrieved) == 6
    for original in originals[:6]:
        assert np.array_equal(retrieved[original.SOPInstanceUID].pixel_array,
                              original.pixel_array)

    j2k_ds = originals[-1]
    got = web_client.retrieve_instance(
        j2k_ds.StudyInstanceUID, j2k_ds.SeriesInstanceUID, j2k_ds.SOPInstanceUID,
        media_types=(("application/dicom", "*"),),
    )
    assert got.file_meta.TransferSyntaxUID == j2k_ds.file_meta.TransferSyntaxUID
    assert got.PixelData == j2k_ds.PixelData


def test_metadata_and_frames_through_the_client(web_client, tmp_path):
    cine = dcmread(us_cine(tmp_path / "us", frames=8, patient_id="DWC2"))
    web_client.store_instances([cine])
    meta = web_client.retrieve_instance_metadata(
        cine.StudyInstanceUID, cine.SeriesInstanceUID, cine.SOPInstanceUID)
    assert meta["00280008"]["Value"] == [8]
    frames = web_client.retrieve_instance_frames(
        cine.StudyInstanceUID, cine.SeriesInstanceUID, cine.SOPInstanceUID, frame_numbers=[3, 8])
    assert frames == [cine.pixel_array[2].tobytes(), cine.pixel_array[7].tobytes()]
    rendered = web_client.retrieve_instance_rendered(
        cine.StudyInstanceUID, cine.SeriesInstanceUID, cine.SOPInstanceUID,
        media_types=("image/png",))
    assert rendered[:8] == b"\x89PNG\r\n\x1a\n"
