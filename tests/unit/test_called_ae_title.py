"""A scanner set up with another archive's AE title (two archives on one host, a typo) is
refused at association with "called AE title not recognised" (PS3.8 9.3.4, reason 7) instead
of storing here by mistake; the refusal is listed for administrators with the reason, and an
installation that wants the old behaviour turns the check off."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.listener import listening


def _listener(archive, check_called_ae: bool = True):
    return listening(archive, "SCANNER", refusals=archive.refused_callers,
                     check_called_ae=check_called_ae)


def _echo(port: int, called: str) -> tuple[bool, int | None]:
    """(established, reject reason) of a C-ECHO association to ``called``."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        reason = assoc.acceptor.primitive.diagnostic if assoc.is_rejected else None
        return False, reason
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0
    return True, None


def test_a_call_to_another_ae_title_is_rejected_and_listed(archive) -> None:
    with _listener(archive) as served:
        assert _echo(served.port, "OTHERPACS") == (False, 7)
        assert _echo(served.port, "IMAGESHARE") == (True, None)
    refused = archive.refused_callers.all()
    assert [(r.ae_title, r.service) for r in refused] == [("SCANNER", "association")]
    assert "OTHERPACS" in refused[0].reason and "IMAGESHARE" in refused[0].reason


def test_the_check_can_be_turned_off(archive) -> None:
    with _listener(archive, check_called_ae=False) as served:
        assert _echo(served.port, "ANY-SCP") == (True, None)
    assert archive.refused_callers.all() == []


def test_the_setting_reaches_the_listener(tmp_path, monkeypatch) -> None:
    from imageshare.app import _make_listener, build_archive
    from imageshare.settings import load_settings

    monkeypatch.setenv("IMAGESHARE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("IMAGESHARE_CHECK_CALLED_AE", "false")
    archive = build_archive(load_settings())
    assert _make_listener(archive, shared_port=False).ae.require_called_aet is False
    monkeypatch.setenv("IMAGESHARE_CHECK_CALLED_AE", "true")
    archive = build_archive(load_settings())
    assert _make_listener(archive, shared_port=False).ae.require_called_aet is True
