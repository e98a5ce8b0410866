"""Marks (arrows, lengths, text, ellipses) saved on every kind of image in pydicom's test files
are stored as presentation states that dciodvfy (dicom3tools) finds no error in, and are shown
again in the viewer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from imageshare.domain.actors import Actor
from tests.conftest import require_tool
from tests.unit.test_web_pages import HTML, PASSWORD, browser_sign_in, csrf_of

SYSTEM = Actor("system", "tests", "admin", "tests")
GRAYSCALE_PS = "1.2.840.10008.5.1.4.1.1.11.1"
COLOR_PS = "1.2.840.10008.5.1.4.1.1.11.2"

# One file per photometric kind and frame layout, with the presentation state it must get.
IMAGES = {
    "CT_small.dcm": GRAYSCALE_PS,                   # MONOCHROME2, signed, rescaled
    "MR_small.dcm": GRAYSCALE_PS,                   # MONOCHROME2, 16 bit
    "emri_small.dcm": GRAYSCALE_PS,                 # MONOCHROME2, 10 frames (MR, no groups)
    "US1_UNCR.dcm": COLOR_PS,                       # RGB ultrasound with burned-in text
    "US1_J2KR.dcm": COLOR_PS,                       # YBR_RCT (JPEG 2000) ultrasound
    "SC_ybr_full_uncompressed.dcm": COLOR_PS,       # YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm": COLOR_PS,         # YBR_FULL_422 (JPEG baseline)
    "OBXXXX1A.dcm": COLOR_PS,                       # PALETTE COLOR ultrasound
    "color3d_jpeg_baseline.dcm": COLOR_PS,          # 120-frame YBR_FULL_422 echo cine
    "ExplVR_BigEnd.dcm": COLOR_PS,                  # RGB, big endian, old-style date
}


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                          text=True, errors="replace", timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines()
            if line.strip().startswith("Error")]


@pytest.fixture
def signed_in(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    assert browser_sign_in(anonymous, "sono").status_code == 303
    return anonymous


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_marks_on_every_image_type_make_a_valid_presentation_state_shown_again(
        archive, signed_in, tmp_path, name):
    require_tool("dciodvfy")
    source = Path(get_testdata_file(name))
    header = dcmread(source, stop_before_pixels=True)
    stored = archive.ingest.store_copy(source, SYSTEM)
    study = stored.study_uid
    frames = int(header.get("NumberOfFrames", 1) or 1)
    frame = frames  # the last frame: marks are per frame
    cols, rows = int(header.Columns), int(header.Rows)
    marks = [
        {"kind": "arrow", "points": [[cols * 0.6, rows * 0.6], [cols * 0.3, rows * 0.3]],
         "label": "lesion"},
        {"kind": "length", "points": [[cols * 0.1, rows * 0.5], [cols * 0.9, rows * 0.5]]},
        {"kind": "ellipse", "points": [[cols * 0.2, rows * 0.2], [cols * 0.7, rows * 0.5]]},
        {"kind": "text", "points": [[cols * 0.5, rows * 0.8]], "label": "Fluid"},
    ]
    page = signed_in.get(f"/viewer/{study}", headers=HTML)
    saved = signed_in.post(f"/api/studies/{study}/annotations", json={
        "sop_uid": stored.sop_instance_uid, "frame": frame, "marks": marks},
        headers={"X-CSRF-Token": csrf_of(page.text)})
    assert saved.status_code == 200, saved.text
    assert saved.json() == {"marks": 4}

    states = [i for i in archive.retrieve.select(SYSTEM, "study.view", study_uids=[study])
              if i.sop_class_uid in (GRAYSCALE_PS, COLOR_PS)]
    assert [s.sop_class_uid for s in states] == [IMAGES[name]]
    written = tmp_path / "pr.dcm"
    with archive.retrieve.open(states[0]) as fp:
        written.write_bytes(fp.read())
    assert dciodvfy_errors(written) == []
    state = dcmread(written)
    annotation = state.GraphicAnnotationSequence[0]
    reference = annotation.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == stored.sop_instance_uid
    if frames > 1 and name != "emri_small.dcm":  # emri's MR IOD has no frames to name
        assert reference.ReferencedFrameNumber == frame
    kinds = sorted(g.GraphicType for g in annotation.GraphicObjectSequence)
    assert kinds == ["ELLIPSE", "POLYLINE", "POLYLINE", "POLYLINE", "POLYLINE"]
    texts = sorted(t.UnformattedTextValue for t in annotation.TextObjectSequence)
    assert "Fluid" in texts and "lesion" in texts
    assert any(t.endswith(("mm", "px")) for t in texts)            # the length
    assert any(t.endswith(("mm2", "px2")) for t in texts)          # the ellipse's area

    again = signed_in.get(f"/viewer/{study}", headers=HTML)
    manifest = json.loads(again.text.split('<script id="manifest" type="application/json">')[1]
                          .split("</script>")[0])
    shown = manifest["annotations"][f"{stored.sop_instance_uid}|{frame}"]
    assert sorted(m["kind"] for m in shown) == ["arrow", "ellipse", "length", "text"]


def test_a_text_mark_without_text_or_with_a_second_point_is_refused(archive, signed_in):
    source = Path(get_testdata_file("US1_UNCR.dcm"))
    stored = archive.ingest.store_copy(source, SYSTEM)
    page = signed_in.get(f"/viewer/{stored.study_uid}", headers=HTML)
    for mark in ({"kind": "text", "points": [[5, 5]], "label": " "},
                 {"kind": "text", "points": [[5, 5], [6, 6]], "label": "x"},
                 {"kind": "ellipse", "points": [[5, 5]]}):
        refused = signed_in.post(f"/api/studies/{stored.study_uid}/annotations", json={
            "sop_uid": stored.sop_instance_uid, "frame": 1, "marks": [mark]},
            headers={"X-CSRF-Token": csrf_of(page.text)})
        assert refused.status_code == 400
    assert archive.annotations.for_study(stored.study_uid) == {}
