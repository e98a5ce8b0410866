"""A form that creates something, sent twice (a double click, a resend), creates it once:
one share link and one e-mail, one teaching case."""

from __future__ import annotations

import re
import threading
import time

from fastapi.testclient import TestClient

from imageshare.domain.actors import Actor
from imageshare.storage.submissions import new_form_key
from imageshare.web.server import create_app
from tests.factory import us_cine
from tests.unit.test_trust_web import mailing  # noqa: F401 - the fixture
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
PASSWORD = "a-long-password"


def form_key_of(html: str, action: str) -> str:
    """The form key of the form posting to ``action`` on the page."""
    form = html[html.index(f'action="{action}"'):]
    return re.search(r'name="form_key" value="([^"]+)"', form[:form.index("</form>")]).group(1)


def test_a_share_form_sent_twice_makes_one_share_and_one_email(mailing):
    archive, sink, uid = mailing
    with TestClient(create_app(archive)) as sender:
        browser_sign_in(sender, "sono")
        page = sender.get(f"/studies/{uid}", headers=HTML)
        form = {"csrf_token": csrf_of(page.text),
                "form_key": form_key_of(page.text, f"/studies/{uid}/share"),
                "recipient_email": "mentor@elsewhere.example"}
        first = sender.post(f"/studies/{uid}/share", headers=HTML, data=form)
        again = sender.post(f"/studies/{uid}/share", headers=HTML, data=form,
                            follow_redirects=False)
        [share] = archive.shares.owned("sono")
        assert first.status_code == 200 and "passcode" in first.text.lower()
        assert again.status_code == 303
        assert again.headers["location"] == f"/shares/{share.public_id}?notice=share-made-once"
        shown = sender.get(again.headers["location"], headers=HTML)
        assert "sent twice" in shown.text and "first answer only" in shown.text
        # A new rendering of the form makes a new share.
        page = sender.get(f"/studies/{uid}", headers=HTML)
        other = sender.post(f"/studies/{uid}/share", headers=HTML, data={
            **form, "form_key": form_key_of(page.text, f"/studies/{uid}/share")})
        assert other.status_code == 200 and len(archive.shares.owned("sono")) == 2
    archive.shares.mailer.flush()
    assert len(sink.bodies("mentor@elsewhere.example")) == 2


def test_a_refused_share_form_can_be_corrected_and_sent_again(mailing):
    archive, _sink, uid = mailing
    with TestClient(create_app(archive)) as sender:
        browser_sign_in(sender, "sono")
        page = sender.get(f"/studies/{uid}", headers=HTML)
        form = {"csrf_token": csrf_of(page.text),
                "form_key": form_key_of(page.text, f"/studies/{uid}/share")}
        refused = sender.post(f"/studies/{uid}/share", headers=HTML,
                              data={**form, "days": "100000"})
        assert refused.status_code >= 400 and archive.shares.owned("sono") == []
        made = sender.post(f"/studies/{uid}/share", headers=HTML, data=form)
        assert made.status_code == 200 and len(archive.shares.owned("sono")) == 1


def test_a_repeat_sent_while_the_first_still_runs_waits_for_it(archive):
    calls: list[int] = []
    started = threading.Event()

    def slow() -> str:
        calls.append(1)
        started.set()
        time.sleep(0.5)
        return "made-once"

    key = new_form_key()
    answers: list[tuple[str, bool]] = []
    first = threading.Thread(target=lambda: answers.append(
        archive.submissions.once("sono", "share", key, slow)))
    first.start()
    started.wait(5)
    repeat = archive.submissions.once("sono", "share", key, slow)
    first.join()
    assert calls == [1]
    assert answers == [("made-once", True)] and repeat == ("made-once", False)
    # Another person's (or another form's) key is theirs alone.
    assert archive.submissions.once("clin", "share", key, lambda: "theirs") == ("theirs", True)
    assert archive.submissions.once("sono", "teaching", key, lambda: "case") == ("case", True)


def test_a_teaching_form_sent_twice_makes_one_case(archive, anonymous, tmp_path):
    archive.users.add("edu", PASSWORD, "educator")
    stored = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=2, patient_id="H79",
                                               patient_name="Seacole^Mary"), OWNER)
    anonymous.post("/login", data={"username": "edu", "password": PASSWORD}, headers=HTML)
    action = f"/studies/{stored.study_uid}/teaching"
    page = anonymous.get(f"/studies/{stored.study_uid}", headers=HTML)
    form = {"csrf_token": csrf_of(page.text), "form_key": form_key_of(page.text, action),
            "title": "Effusion", "modality": "US"}
    first = anonymous.post(action, headers=HTML, data=form, follow_redirects=False)
    again = anonymous.post(action, headers=HTML, data=form, follow_redirects=False)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    assert len(archive.teaching.search()) == 1
