"""Red team (session 40): the web app, sharing and accounts attacked from outside, each attack
proven against the app as it runs, then closed."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.sharing.links import NewShare
from imageshare.web.server import create_app
from tests.factory import ct_series

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
PASSWORD = "a-long-password"
HTML = {"Accept": "text/html"}
ARROW = [{"kind": "arrow", "points": [[1, 1], [10, 10]]}]


@pytest.fixture
def two_series(archive, tmp_path):
    """A study of two CT series of one patient (Lovelace^Ada, H4040), made by ``sono``."""
    archive.users.add("sono", PASSWORD, "sonographer")
    first = [archive.ingest.store_copy(p, OWNER) for p in ct_series(
        tmp_path / "a", 2, patient_id="H4040", patient_name="Lovelace^Ada")]
    study = first[0].study_uid
    second = [archive.ingest.store_copy(p, OWNER) for p in ct_series(
        tmp_path / "b", 2, patient_id="H4040", patient_name="Lovelace^Ada", study_uid=study)]
    return study, first, second


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def _opened(archive, created) -> None:
    """The named recipient gave the passcode (the share's items now reach their account)."""
    share = archive.shares.by_token(created.token)
    assert archive.shares.check_passcode(share, created.passcode, "127.0.0.1")


# -- marks need the comment right on the image they are drawn on --------------------------------


def test_marks_go_only_on_images_shared_with_the_comment_right(archive, two_series):
    """A reviewer named by two shares of one study, one series with the right to comment and
    the other to view only, could draw marks on the view-only series: the archive's marks
    route checked the comment right on the study, then looked the image up among everything
    the reviewer may *view*, and stored a presentation state in the patient's study."""
    study, first, second = two_series
    archive.users.add("rev", PASSWORD, "reviewer")
    for series, comment in ((first, True), (second, False)):
        _opened(archive, archive.shares.create(NewShare(
            study, series_uids=(series[0].series_uid,), deidentified=False,
            recipient_user="rev", allow_comment=comment), OWNER, None))
    before = len(archive.retrieve.select(OWNER, "test", study_uids=[study], audit=False))
    token = archive.users.create_token("rev", "t", origin="cli")
    with TestClient(create_app(archive)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        allowed = client.post(f"/api/studies/{study}/annotations",
                              json={"sop_uid": first[0].sop_instance_uid, "marks": ARROW})
        assert allowed.status_code == 200, allowed.text
        refused = client.post(f"/api/studies/{study}/annotations",
                              json={"sop_uid": second[0].sop_instance_uid, "marks": ARROW})
    assert refused.status_code == 404
    # one presentation state (for the series the reviewer may comment on), not two
    after = archive.retrieve.select(OWNER, "test", study_uids=[study], audit=False)
    assert len(after) == before + 1
    marks = archive.annotations.for_study(study)
    assert not any(key.startswith(second[0].sop_instance_uid) for key in marks)


# -- a de-identified link never shows the sender's words naming the patient ----------------------


def test_a_de_identified_links_presentation_shows_no_mark_naming_the_patient(
        archive, anonymous, two_series):
    """The sender's own marks are drawn in the link's presentation mode, with their typed
    words: a text mark "Mrs Lovelace" (or "H4040") the sonographer left on the image in the
    archive's viewer reached the reviewer of a *de-identified* share, in the page itself.
    Marks whose words do not name the patient are still shown."""
    study, first, _second = two_series
    sop = first[0].sop_instance_uid
    archive.annotations.save(study, sop, 1, [
        {"kind": "text", "points": [[5, 5]], "label": "Mrs Lovelace"},
        {"kind": "arrow", "points": [[10, 10], [40, 40]], "label": "H4040 left"}],
        OWNER, "sono", None)
    archive.annotations.save(study, first[1].sop_instance_uid, 1, [
        {"kind": "arrow", "points": [[10, 10], [40, 40]], "label": "effusion"}],
        OWNER, "sono", None)
    created = archive.shares.create(NewShare(study, series_uids=(first[0].series_uid,)),
                                    OWNER, None)
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                            follow_redirects=False)
    assert opened.status_code == 303
    shown = anonymous.get(created.path + "/present", headers=HTML)
    assert shown.status_code == 200
    assert "Lovelace" not in shown.text and "H4040" not in shown.text
    assert "effusion" in shown.text  # words that name nobody are still the sender's to show


# -- a name chosen through an invitation cannot pass for another's ---------------------------


@pytest.mark.parametrize("name", [
    "\u0430dmin",  # Cyrillic a
    "adm\u0131n",  # Turkish dotless i
    "d\u03bfc",  # Greek omicron
    "admi\u0307n",  # i with a combining dot above
    "\u1d05oc",  # Latin small capital D
])
def test_an_invited_person_cannot_choose_a_name_that_reads_as_another_accounts(
        archive, anonymous, name):
    """Someone invited (by e-mail, to review a share) chooses their own user name: "аdmin"
    with a Cyrillic "а", "admın" with a dotless "ı" were taken, and read as the administrator
    (or "doc") in share pages, audit reports and the hospital's e-mails. Only case and
    full-width letters were folded."""
    archive.users.add("doc", PASSWORD, "clinician")
    secret = archive.users.invite("x@example.org", "doc")
    made = anonymous.post(f"/invite/{secret}", data={"username": name, "password": PASSWORD},
                          headers=HTML, follow_redirects=False)
    assert made.status_code == 400
    assert "exists already" in made.text
    assert name not in {a.username for a in archive.users.accounts()}
    assert archive.users.invitation(secret) is not None  # still usable with another name


def test_a_reserved_name_in_look_alike_letters_is_refused_and_others_still_taken(archive):
    """"ѕystem" (Cyrillic "ѕ") passed for the archive's own actor; an ordinary name outside
    ASCII that reads as no existing one is still an account."""
    secret = archive.users.invite("x@example.org", "admin")
    with pytest.raises(ImageShareError, match="reserved"):
        archive.users.accept_invitation(secret, "\u0455ystem", PASSWORD)
    archive.users.accept_invitation(secret, "Zoë Müller", PASSWORD)
    assert "Zoë Müller" in {a.username for a in archive.users.accounts()}
