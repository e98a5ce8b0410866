"""Red team of session 41's new surfaces: the Study, Series and Instance Bulkdata resources
never cut an answer off half-way (a value that cannot be made is refused before the answer
starts, or left out once it has); the upload invitation's two name fields neither cut a
long name to fit (filing the patient under another name) nor keep the invisible
bidirectional controls that make a name show as another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series
from tests.multipart_helpers import parse_multipart
from tests.unit.test_upload_forms_s41 import HTML, _clerk
from tests.unit.test_web_pages import csrf_of

ACTOR = cli_actor()
# An RLE frame whose one segment claims more bytes than it holds: the decoder fails on it.
_DAMAGED_RLE = b"\x01\x00\x00\x00\x40\x00\x00\x00" + b"\x00" * 56 + b"\x7f\x01"


@pytest.fixture
def damaged(archive, tmp_path: Path) -> dict[str, Any]:
    """A study of two RLE Lossless CT slices; the second one's pixel data does not decode."""
    paths = ct_series(tmp_path / "ct", count=2, patient_id="RT41D")
    for number, path in enumerate(paths):
        ds = dcmread(path)
        ds.compress(RLELossless)
        if number == 1:
            ds.PixelData = encapsulate([_DAMAGED_RLE])
        ds.save_as(path)
    stored = [archive.ingest.store_copy(p, ACTOR) for p in paths]
    good, bad = (dcmread(p) for p in paths)
    assert [s.sop_instance_uid for s in stored] == [good.SOPInstanceUID, bad.SOPInstanceUID]
    return {"study": good.StudyInstanceUID, "good": good, "bad": bad}


def _instance(ds: Any) -> str:
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def test_a_study_bulkdata_answer_is_never_cut_off_by_pixels_that_do_not_decode(
        client, damaged):
    """The parts were made while the body was being sent: the second slice's pixels, which
    do not decode, broke the answer off after its 200 status (the client got a truncated
    multipart body and no reason). The body is now whole: the first slice's decoded pixels,
    and no part for the value that cannot be made."""
    response = client.get(f"/dicomweb/studies/{damaged['study']}/bulkdata")
    assert response.status_code == 200
    assert response.content.rstrip().endswith(b"--")  # the closing boundary is there
    parts = parse_multipart(response)
    good = damaged["good"]
    assert [h["content-location"].rsplit("/instances/", 1)[1] for h, _b in parts] == [
        f"{good.SOPInstanceUID}/bulkdata/7FE00010"]
    assert parts[0][1] == good.pixel_array.astype("<i2").tobytes()


@pytest.mark.parametrize("suffix", ["/bulkdata", "/bulkdata/"])
def test_an_instance_bulkdata_whose_pixels_do_not_decode_is_refused_before_the_answer(
        client, damaged, suffix):
    """The Instance Bulkdata resource of the damaged slice started a 200 answer and broke
    off; it is now refused with its reason, as the pixel data's own BulkDataURI is."""
    response = client.get(_instance(damaged["bad"]) + suffix)
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/problem+json"
    assert "cannot be decoded" in response.json()["detail"]
    own = client.get(_instance(damaged["bad"]) + "/bulkdata/7FE00010")
    assert own.status_code == 406


def _invite(clerk: Any, family: str, given: str = "") -> Any:
    page = clerk.get("/uploads", headers=HTML)
    return clerk.post("/uploads/invite", data={
        "csrf_token": csrf_of(page.text), "family_name": family, "given_name": given,
        "hospital_number": "RT41N", "email": "patient@home.example", "days": "14"},
        headers=HTML)


def test_a_family_name_longer_than_a_person_name_holds_is_refused_not_cut(tmp_path):
    """A family name of 70 characters was cut to its first 64 and the invitation made: the
    patient's uploads were then filed under a name that is not theirs, and nobody was told.
    It is refused with the reason, and the form comes back with the name as typed."""
    archive, clerk = _clerk(tmp_path)
    long_name = "Wolfeschlegelsteinhausenbergerdorff Featherstonehaugh-Cholmondeley Xyz"
    assert len(long_name) == 70
    try:
        sent = _invite(clerk, long_name)
        assert sent.status_code == 400, sent.text[-500:]
        assert "too long" in sent.text
        assert f'name="family_name" value="{long_name}"' in sent.text
        assert archive.uploads.invitations.all() == []
    finally:
        clerk.close()
        archive.close()


def test_bidirectional_controls_in_a_typed_name_are_not_kept(tmp_path):
    """U+202E (right-to-left override) typed or pasted into the family name was kept: the
    invitation list and every page then showed "Lovelace" for a record named "ecalevoL"
    (searches and matching to the patient's studies see the latter)."""
    archive, clerk = _clerk(tmp_path)
    try:
        sent = _invite(clerk, "\u202eecalevoL\u202c", "\u2067Ada\u2069")
        assert sent.status_code == 200, sent.text[-500:]
        [invitation] = archive.uploads.invitations.all()
        assert invitation.patient_name == "ecalevoL^Ada"
    finally:
        clerk.close()
        archive.close()
