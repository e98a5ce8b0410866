"""C-FIND answers in the requester's character set when every value fits it (a workstation
that knows only Latin-1 reads its own), in UTF-8 otherwise."""

from __future__ import annotations

import pytest

from tests.factory import ct_series
from tests.listener import listening
from tests.unit.test_cfind_conformance import CALLING, JAPANESE, _c_find, _store


@pytest.fixture
def listener(archive, tmp_path):
    _store(archive, ct_series(tmp_path / "de", count=1, patient_id="DE1",
                              patient_name="Müller^Jürgen"))
    _store(archive, ct_series(tmp_path / "jp", count=1, patient_id="JP1",
                              patient_name=JAPANESE, SpecificCharacterSet="ISO_IR 192"))
    _store(archive, ct_series(tmp_path / "en", count=1, patient_id="EN1",
                              patient_name="Doe^Jane"))
    with listening(archive, CALLING) as served:
        yield served


def _answer(listener, charset, patient_id: str):
    [found], final = _c_find(listener, "STUDY", charset=charset, PatientID=patient_id,
                             PatientName="")
    assert final.Status == 0x0000
    return found


def test_a_latin1_requester_gets_a_latin1_answer_it_can_read(listener):
    found = _answer(listener, "ISO_IR 100", "DE1")
    assert found.SpecificCharacterSet == "ISO_IR 100"
    assert str(found.PatientName) == "Müller^Jürgen"


def test_a_name_the_requesters_set_cannot_write_comes_in_utf8(listener):
    found = _answer(listener, "ISO_IR 100", "JP1")
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == JAPANESE


@pytest.mark.parametrize(("asked", "patient", "expected"), [
    ("", "EN1", None),                        # the default repertoire: no set named
    ("", "DE1", "ISO_IR 192"),                # ... unless a value needs more
    ("ISO_IR 192", "DE1", "ISO_IR 192"),
    ("ISO_IR 144", "DE1", "ISO_IR 192"),      # Cyrillic has no ü
    (["", "ISO 2022 IR 87"], "EN1", "ISO_IR 192"),  # code extensions: UTF-8
])
def test_the_answer_names_the_set_it_is_written_in(listener, asked, patient, expected):
    found = _answer(listener, asked, patient)
    assert found.get("SpecificCharacterSet") == expected
